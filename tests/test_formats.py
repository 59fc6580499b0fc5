"""Every format of the registry against its own dequantizer, its error bound, its sizes, and a store round trip.

Parametrized over cpu_kernels.formats.FORMATS and each format's group sizes, so a format added to the registry
runs all of this without a line of test code: the test docs/formats.md asks a new format to pass.
Dimension legend: T tokens, H hidden, I expert width, E experts, K top-k, R the format's tile_rows, nt tiles.
"""

import json
import math

import numpy as np
import pytest
import torch
from reference import int8_rounded, routed_experts_reference

from cpu_kernels import (
    FORMATS,
    Format,
    LayerStoreWriter,
    MemoryLayerWriter,
    MoEExperts,
    bf16_to_f32,
    bytes_per_weight,
    dequantize_matrix,
    f32_to_bf16,
    load_store,
    matrix_bytes,
    quantize_matrix,
    save_store,
)
from cpu_kernels.formats import scale_shape, spec_of_kind, value_shape
from cpu_kernels.formats.activations import quantize_rows, quantized_inputs
from cpu_kernels.quantize import matvec_error
from cpu_kernels.store import PROJECTIONS, projection_shape

# The formats hybrid writes; the GGUF types (read as released, no quantizer) have tests/test_gguf_kernels.py.
ALL = [Format(name, group) for name, spec in FORMATS.items() if spec.quantize is not None
       for group in spec.group_sizes or (None,)]
E = 6
# Float32 kernels against float64 numpy on the same dequantized weights: accumulation order is the only difference.
KERNEL_TOLERANCE = 2e-5
# What int8 inputs (activations.py: one scale per 32) add to a matvec of Gaussian inputs, with margin (~0.3 %).
INPUT_QUANTIZATION_TOLERANCE = 0.01


def int8_inputs_reference(x: np.ndarray) -> np.ndarray:
    """x [T, n] as the integer kernels see it, in float64 (reference.int8_rounded)."""
    return int8_rounded(torch.from_numpy(x)).numpy()


def layer_dims(fmt: Format) -> tuple[int, int]:
    """(H, I) near (300, 160): odd multiples of what the format needs of n_in, so group counts are odd and, where
    the step allows it, the last tile is padded."""
    step = fmt.spec.input_multiple(fmt.group_size)
    return step * (max(1, 300 // step) | 1), step * (max(1, 160 // step) | 1)


def float_experts(hidden: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((E, width, hidden), dtype=np.float32),
            rng.standard_normal((E, width, hidden), dtype=np.float32),
            rng.standard_normal((E, hidden, width), dtype=np.float32))


def rel_err(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_registry_names_markers_and_groups():
    assert list(FORMATS) == [spec.name for spec in FORMATS.values()]
    # one marker each: a class of its own, or (GGUF types) a shared class with their own code
    assert len({(type(spec.kind), spec.kind) for spec in FORMATS.values()}) == len(FORMATS)
    for spec in FORMATS.values():
        assert spec_of_kind(type(spec.kind)).tile1 is spec.tile1
        assert (spec.default_group is None) == (not spec.group_sizes)
        assert spec.default_group is None or spec.default_group in spec.group_sizes
    with pytest.raises(ValueError, match="kernel marker"):
        spec_of_kind(tuple)


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_kernels_match_their_dequantizer_and_numpy(fmt):
    """tile1 and tile4 on every tile of one matrix = the format's dequantized weights @ x in float64; for a format
    whose tile1 reads int8-quantized inputs, its x is the input rounded as int8_inputs_reference rounds it."""
    spec, rows = fmt.spec, fmt.spec.tile_rows
    n_out, n_in = rows + 24, layer_dims(fmt)[0]  # a padded last tile
    rng = np.random.default_rng(0)
    values, scales = quantize_matrix(rng.standard_normal((n_out, n_in), dtype=np.float32), fmt)
    w = dequantize_matrix(values, scales, fmt, n_out, n_in).astype(np.float64)
    x = rng.standard_normal((6, n_in), dtype=np.float32)
    n_tiles, picked = values.shape[0], [5, 0, 3, 1]
    one, four = np.empty((6, n_tiles * rows), np.float32), np.empty((4, n_tiles * rows), np.float32)
    y, y4 = np.empty(rows, np.float32), np.empty((4, rows), np.float32)  # C-contiguous, as the drivers' scratch
    xq, xd = quantized_inputs(x, spec.quantized_inputs)
    for t in range(n_tiles):
        cols = slice(t * rows, (t + 1) * rows)
        for i in range(6):
            spec.tile1(spec.kind, values[t], scales[t], x[i], xq[i], xd[i], y)
            one[i, cols] = y
        spec.tile4(spec.kind, values[t], scales[t], x, xq, xd, *picked, y4)
        four[:, cols] = y4
    want = x.astype(np.float64) @ w.T
    x_one = int8_inputs_reference(x) if spec.quantized_inputs else x.astype(np.float64)
    assert rel_err(one[:, :n_out], x_one @ w.T) < KERNEL_TOLERANCE
    assert rel_err(one[:, :n_out], want) < INPUT_QUANTIZATION_TOLERANCE
    assert rel_err(four[:, :n_out], (x_one @ w.T)[picked]) < KERNEL_TOLERANCE
    assert not one[:, n_out:].any() and not four[:, n_out:].any()


def test_int8_inputs_match_a_numpy_rounding():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 256)) * rng.uniform(0.01, 100, (5, 1))).astype(np.float32)
    x[2, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    xq, xd = np.empty(x.shape, np.int8), np.empty((5, 2, 8), np.float32)
    quantize_rows(x, xq, xd)
    d = xd[:, 0, :, None].astype(np.float64)
    np.testing.assert_allclose((xq.reshape(5, 8, 32) * d).reshape(x.shape), int8_inputs_reference(x), rtol=1e-6,
                               atol=1e-6 * np.abs(x).max())
    np.testing.assert_allclose(xd[:, 1], (xq.reshape(5, 8, 32).sum(axis=2) * xd[:, 0]), rtol=1e-6)
    assert np.abs(xq).max() == 127 and not xq[2, 32:64].any()
    x[4, 40] = np.nan  # bad input must show in the result, not round away
    quantize_rows(x, xq, xd)
    assert np.isnan(xd[4, 0, 1]) and np.isfinite(np.delete(xd[:, 0].reshape(-1), 4 * 8 + 1)).all()


@pytest.mark.parametrize("name", [n for n, spec in FORMATS.items() if spec.quantized_inputs])
def test_integer_kernels_hold_the_extremes(name):
    """Every weight at its format's largest code and every input at +-127 in each block: the largest sums the
    integer kernels' int16 and int32 lanes meet (an overflow would wrap to the wrong sign)."""
    spec, n_in = FORMATS[name], 2048
    fmt, rows = Format(name, spec.default_group), spec.tile_rows
    rng = np.random.default_rng(4)
    for sign in (1.0, -1.0):
        w = np.full((rows, n_in), sign, np.float32)
        w[:, ::7] = -sign  # mixed: the codes at both ends of the range
        x = np.full((1, n_in), 3.0, np.float32)
        x[:, 5::32] = -3.0 * rng.uniform(0.5, 1.0)
        values, scales = quantize_matrix(w, fmt)
        wd = dequantize_matrix(values, scales, fmt, rows, n_in).astype(np.float64)
        xq, xd = quantized_inputs(x, True)
        y = np.empty(rows, np.float32)
        spec.tile1(spec.kind, values[0], scales[0], x[0], xq[0], xd[0], y)
        assert rel_err(y, wd @ int8_inputs_reference(x)[0]) < KERNEL_TOLERANCE


@pytest.mark.parametrize("fmt", ALL, ids=str)
@pytest.mark.parametrize("kind", ["normal", "heavy"])
def test_quantizer_error_within_stated_bound(fmt, kind):
    assert matvec_error(fmt, kind, n_out=256, n_in=1024) < fmt.spec.error_bound


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_dequantize_inverts_quantize_layout(fmt):
    n_in = layer_dims(fmt)[0]
    w = np.random.default_rng(2).standard_normal((200, n_in), dtype=np.float32)
    values, scales = quantize_matrix(w, fmt)
    back = dequantize_matrix(values, scales, fmt, 200, n_in)
    assert back.shape == (200, n_in)
    assert np.linalg.norm(back - w) / np.linalg.norm(w) < fmt.spec.error_bound
    if fmt.name == "bf16":
        np.testing.assert_array_equal(back, bf16_to_f32(f32_to_bf16(w)))


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_sizes_follow_the_spec(fmt):
    spec, (hidden, width) = fmt.spec, layer_dims(fmt)
    values, scales = quantize_matrix(np.ones((width, hidden), np.float32), fmt)
    assert values.shape == value_shape(fmt, width, hidden) and values.dtype == np.dtype(spec.value_dtype)
    assert scales.shape == scale_shape(fmt, width, hidden) and scales.dtype == np.dtype(spec.scale_dtype)
    assert values.shape[0] == scales.shape[0] == math.ceil(width / spec.tile_rows)
    assert (scales.size > 0) == spec.has_scales
    assert matrix_bytes(fmt, width, hidden) == values.nbytes + scales.nbytes
    # Without tile padding, bytes per weight times weights is the whole matrix.
    n_in = 8 * spec.input_multiple(fmt.group_size)
    assert matrix_bytes(fmt, spec.tile_rows, n_in) == spec.tile_rows * n_in * bytes_per_weight(fmt)


@pytest.mark.parametrize("fmt", ALL, ids=str)
def test_store_round_trip_through_files(tmp_path, fmt):
    """In memory, saved, streamed to disk and memory-mapped back: the same bytes and the reference's output."""
    hidden, width = layer_dims(fmt)
    floats = float_experts(hidden, width)
    memory = MoEExperts.from_weights(*floats, fmt, n_threads=1)
    save_store(memory.store, tmp_path / "saved")
    with LayerStoreWriter(tmp_path / "streamed", fmt, E, hidden, width) as writer:
        for e in range(E):
            writer.write_expert(e, floats[0][e], floats[1][e], floats[2][e])
    manifest = json.loads((tmp_path / "streamed" / "manifest.json").read_text())
    assert (manifest["format"], manifest["group_size"], manifest["tile_rows"]) == \
        (fmt.name, fmt.group_size, fmt.spec.tile_rows)
    assert manifest["n_experts"] == E and manifest["hidden"] == hidden
    assert any(key.endswith(".scales") for key in manifest["files"]) == fmt.spec.has_scales
    assert not list((tmp_path / "streamed").glob("*.tmp"))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, hidden), dtype=np.float32)
    ids = rng.integers(0, E, size=(5, 2))
    weights = rng.random((5, 2), dtype=np.float32)
    want = memory.forward(x, ids, weights)
    deq = [torch.from_numpy(np.stack([dequantize_matrix(memory.store.values[name][e], memory.store.scales[name][e],
                                                        fmt, *projection_shape(name, hidden, width))
                                      for e in range(E)])) for name in PROJECTIONS]
    reference = routed_experts_reference(torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(weights), *deq,
                                         fmt.spec.quantized_inputs)
    assert rel_err(want, reference.numpy()) < KERNEL_TOLERANCE
    for directory in ("saved", "streamed"):
        loaded = MoEExperts.from_store(tmp_path / directory, n_threads=1)
        assert isinstance(loaded.store.values["gate_proj"], np.memmap)
        for name in PROJECTIONS:
            np.testing.assert_array_equal(loaded.store.values[name], memory.store.values[name])
            np.testing.assert_array_equal(loaded.store.scales[name], memory.store.scales[name])
        np.testing.assert_array_equal(loaded.forward(x, ids, weights), want)
        loaded.close()
    memory.close()


def test_memory_writer_is_the_file_writer_in_memory(tmp_path):
    fmt = Format("int4", 32)
    hidden, width = layer_dims(fmt)
    floats = float_experts(hidden, width, seed=4)
    memory, disk = MemoryLayerWriter(fmt, E, hidden, width), LayerStoreWriter(tmp_path, fmt, E, hidden, width)
    for writer in (memory, disk):
        for e in reversed(range(E)):
            writer.write_expert(e, floats[0][e], floats[1][e], floats[2][e])
    store, _ = memory.close(), disk.close()
    loaded = load_store(tmp_path)
    for name in PROJECTIONS:
        np.testing.assert_array_equal(store.values[name], loaded.values[name])
        np.testing.assert_array_equal(store.scales[name], loaded.scales[name])
    partial = MemoryLayerWriter(fmt, E, hidden, width)
    partial.write_expert(2, floats[0][2], floats[1][2], floats[2][2])
    with pytest.raises(ValueError, match="never written"):
        partial.close()
