"""cpu_kernels formats, quantizers, the on-disk store, and MoEExperts' input validation.

Every format's kernels, error bound and store round trip are tested per registry entry in test_formats.py.

Dimension legend: T tokens, H hidden, I expert width, E experts, K top-k.
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import fp8_dequant_reference, fp8_e4m3_value

from cpu_kernels import (
    Format,
    LayerStoreWriter,
    MoEExperts,
    build_store,
    dequantize_fp8,
    expert_bytes,
    f32_to_bf16,
    fp8_e4m3_table,
    load_store,
    matrix_bytes,
    parse_format,
    physical_cores,
    quantize_fp8_matrix,
    quantize_matrix,
    save_store,
)
from cpu_kernels.threads import split_range

E, H, I = 6, 320, 192


def experts_f32(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((E, I, H), dtype=np.float32), rng.standard_normal((E, I, H), dtype=np.float32),
            rng.standard_normal((E, H, I), dtype=np.float32))


@pytest.fixture(scope="module")
def int4_layer():
    experts = MoEExperts.from_weights(*experts_f32(), Format("int4", 64), n_threads=2)
    yield experts
    experts.close()


def test_fp8_table_matches_the_formula_for_all_bytes():
    table = fp8_e4m3_table()
    for byte in range(256):
        want = fp8_e4m3_value(byte)
        assert (math.isnan(want) and math.isnan(table[byte])) or table[byte] == want, byte
    assert np.array_equal(table, torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy(),
                          equal_nan=True)


def test_fp8_dequant_matches_elementwise_reference_on_ragged_blocks():
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, size=(130, 260), dtype=np.uint8)
    w[(w & 0x7F) == 0x7F] = 0  # keep NaN bytes out of the numeric comparison
    scale_inv = rng.random((2, 3), dtype=np.float32) + 0.5
    want = fp8_dequant_reference(torch.from_numpy(w), torch.from_numpy(scale_inv)).numpy()
    np.testing.assert_array_equal(dequantize_fp8(w, scale_inv), want)
    with pytest.raises(ValueError, match="scale_inv shape"):
        dequantize_fp8(w, scale_inv[:1])


def test_fp8_requantize_is_quantize_of_dequantized():
    rng = np.random.default_rng(1)
    w = rng.integers(0, 0x7E, size=(192, 256), dtype=np.uint8)
    scale_inv = rng.random((2, 2), dtype=np.float32)
    v1, s1 = quantize_fp8_matrix(w, scale_inv, Format("int8", 64))
    v2, s2 = quantize_matrix(dequantize_fp8(w, scale_inv), Format("int8", 64))
    assert np.array_equal(v1, v2) and np.array_equal(s1, s2)


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.inf], np.float32)
    assert np.array_equal(f32_to_bf16(x), torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16))


def test_formats_and_sizes():
    assert parse_format("int4") == Format("int4", 128) and parse_format("int8-g32") == Format("int8", 32)
    assert str(Format("int4", 32)) == "int4-g32"
    for bad in (lambda: Format("int3", 32), lambda: Format("int8", 48), lambda: Format("bf16", 32),
                lambda: parse_format("int8-gx")):
        with pytest.raises(ValueError):
            bad()
    # K2 expert: int4 G=128 is 3 * (2048 * 7168 / 2 bytes + 2048 * 56 float32 scales)
    assert expert_bytes(Format("int4", 128), 7168, 2048) == 3 * (2048 * 7168 // 2 + 2048 * 56 * 4)
    assert matrix_bytes(Format("bf16"), 7168, 2048) == 7168 * 2048 * 2
    store = build_store(*experts_f32(), Format("int8", 32))
    assert store.nbytes == E * expert_bytes(Format("int8", 32), H, I)


def test_store_rejects_incomplete_or_foreign_directories(tmp_path):
    with pytest.raises(ValueError, match="no manifest"):
        load_store(tmp_path)
    writer = LayerStoreWriter(tmp_path / "partial", Format("int8", 64), E, H, I)
    floats = experts_f32()
    writer.write_expert(0, floats[0][0], floats[1][0], floats[2][0])
    with pytest.raises(ValueError, match="never written"):
        writer.close()
    with pytest.raises(ValueError, match="shape"):
        writer.write_expert(1, floats[0][0].T, floats[1][0], floats[2][0])
    with pytest.raises(ValueError, match="no manifest"):
        load_store(tmp_path / "partial")
    save_store(build_store(*floats, Format("int8", 64)), tmp_path / "ok")
    manifest = json.loads((tmp_path / "ok" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format_version"):
        load_store(tmp_path / "ok")


def good_inputs(n_tokens=3, top_k=2):
    rng = np.random.default_rng(4)
    return (rng.standard_normal((n_tokens, H), dtype=np.float32), rng.integers(0, E, size=(n_tokens, top_k)),
            rng.random((n_tokens, top_k), dtype=np.float32))


BAD_INPUTS = [
    ("ids", lambda x, i, w: (x, np.where(i == i[0, 0], E, i), w), "ids must lie in"),
    ("ids", lambda x, i, w: (x, -i - 1, w), "ids must lie in"),
    ("ids", lambda x, i, w: (x, i.astype(np.float32), w), "ids must be int64 or int32"),
    ("hidden", lambda x, i, w: (np.zeros((3, H + 8), np.float32), i, w), "hidden size is"),
    ("hidden", lambda x, i, w: (x.astype(np.float64), i, w), "hidden must be float32 or bf16"),
    ("hidden", lambda x, i, w: (np.zeros((3, 2 * H), np.float32)[:, ::2], i, w), "hidden must be C-contiguous"),
    ("hidden", lambda x, i, w: (x[0], i, w), "hidden must be 2-D"),
    ("hidden", lambda x, i, w: (x.tolist(), i, w), "hidden must be a numpy array"),
    ("weights", lambda x, i, w: (x, i, w.astype(np.float64)), "weights must be float32"),
    ("weights", lambda x, i, w: (x, i, w[:, :1].copy()), r"weights \(3, 1\) must match ids"),
    ("weights", lambda x, i, w: (x, i, np.asfortranarray(np.zeros((3, 2), np.float32))[:, ::-1]), "weights must be C-contiguous"),
    ("T", lambda x, i, w: (x[:2], i, w), "must have T = 2 rows"),
]


@pytest.mark.parametrize("arg,mutate,message", BAD_INPUTS, ids=[f"{a}-{m[:20]}" for a, _, m in BAD_INPUTS])
def test_bad_input_raises_value_error_naming_it(int4_layer, arg, mutate, message):
    with pytest.raises(ValueError, match=message):
        int4_layer.forward(*mutate(*good_inputs()))


def test_bad_out_buffer(int4_layer):
    x, i, w = good_inputs()
    for out in (np.zeros((3, H), np.float64), np.zeros((2, H), np.float32), np.zeros((3, 2 * H), np.float32)[:, ::2]):
        with pytest.raises(ValueError, match="out must be"):
            int4_layer.forward(x, i, w, out=out)
    readonly = np.zeros((3, H), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        int4_layer.forward(x, i, w, out=readonly)


def test_threads_setting():
    assert physical_cores() >= 1
    assert [split_range(10, p, 3) for p in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(ValueError, match="n_threads"):
        MoEExperts(build_store(*experts_f32(), Format("int8", 64)), n_threads=0)


def test_package_imports_neither_torch_nor_rich():
    code = "import sys, cpu_kernels; bad = {'torch', 'rich', 'hybrid', 'placement'} & set(sys.modules); print(sorted(bad))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
