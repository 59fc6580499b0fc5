"""The GGUF block kernels against gguf-py, llama.cpp's own Python reader, on random valid blocks of every type.

Reference: `gguf.quants.dequantize` (numpy, independent of our numba decoders) then a float64 matmul. Our kernels
keep activations in float32 (llama.cpp rounds them to 8 bits), so the only difference is float32 accumulation:
the tolerance is that of a float32 dot product, not of a quantizer.
Dimension legend: R tile rows (16), n_out / n_in matrix size, E experts, H hidden, I expert width.
"""

import gguf
import numpy as np
import pytest
import torch
from reference import routed_experts_reference

from cpu_kernels import MoEExperts, quantize_matrix
from cpu_kernels.formats import FORMATS, GGUF_NAMES, Format
from cpu_kernels.formats.gguf.samples import random_blocks
from cpu_kernels.store import ExpertStore

KERNEL_TOLERANCE = 2e-5


def reference_weights(blocks: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[name]).astype(np.float64)


def rel_err(got, want) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", GGUF_NAMES)
def test_kernels_equal_gguf_dequantize_and_float64(name):
    spec = FORMATS[name]
    rows = spec.tile_rows
    n_out, n_in = 3 * rows, 512
    rng = np.random.default_rng(1)
    blocks = random_blocks(name, n_out, n_in, rng)
    w = reference_weights(blocks, name)
    np.testing.assert_allclose(spec.dequantize(blocks, None, None, n_out, n_in), w, rtol=1e-6,
                               atol=1e-6 * np.abs(w).max())
    tiles = blocks.reshape(spec.value_shape(None, n_out, n_in))
    tiles.flags.writeable = False  # as a memory-mapped file is: one compiled specialisation, the one runs use
    none = np.zeros((0, 0), np.float32)
    no_q, no_d = np.zeros(0, np.int8), np.zeros((2, 0), np.float32)  # GGUF kernels multiply float32 inputs
    x = rng.standard_normal((6, n_in), dtype=np.float32)
    one, four = np.empty((6, n_out), np.float32), np.empty((4, n_out), np.float32)
    y, y4, picked = np.empty(rows, np.float32), np.empty((4, rows), np.float32), [5, 0, 3, 1]
    for t in range(n_out // rows):
        cols = slice(t * rows, (t + 1) * rows)
        for i in range(6):
            spec.tile1(spec.kind, tiles[t], none, x[i], no_q, no_d, y)
            one[i, cols] = y
        spec.tile4(spec.kind, tiles[t], none, x, no_q[None], no_d[None], *picked, y4)
        four[:, cols] = y4
    want = x.astype(np.float64) @ w.T
    assert rel_err(one, want) < KERNEL_TOLERANCE
    assert rel_err(four, want[picked]) < KERNEL_TOLERANCE


def test_sizes_are_ggmls_own():
    for name in GGUF_NAMES:
        qk, bb = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        spec = FORMATS[name]
        assert spec.bits_per_weight(None) == 8 * bb / qk and spec.ggml_type == int(gguf.GGMLQuantizationType[name])
        with pytest.raises(ValueError, match="read from GGUF files as released"):
            quantize_matrix(np.zeros((16, 256), np.float32), Format(name))


@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("IQ2_XXS", "IQ3_XXS", "IQ4_XS"), ("Q8_0",) * 3],
                         ids="-".join)
def test_moe_layer_on_mixed_gguf_blocks_equals_reference(types):
    """A whole MoE layer whose gate, up and down are three different GGUF types, as dynamic quants make them:
    the MoE drivers stream the blocks as a store (zero-copy views) and equal the torch reference on the
    gguf-py-dequantized weights, for decode (1 token) and prefill (37 tokens)."""
    n_experts, hidden, width, rng = 6, 512, 256, np.random.default_rng(3)
    shapes = {"gate_proj": (width, hidden), "up_proj": (width, hidden), "down_proj": (hidden, width)}
    blocks = {p: random_blocks(t, n_experts * n, k, rng).reshape(n_experts, n, -1)
              for (p, (n, k)), t in zip(shapes.items(), types)}
    formats = {p: Format(t) for p, t in zip(shapes, types)}
    store = ExpertStore.from_blocks(formats, n_experts, hidden, width, blocks)
    assert all(np.shares_memory(store.values[p], blocks[p]) for p in shapes)
    dense = {p: np.stack([reference_weights(b[e], t) for e in range(n_experts)]).astype(np.float32)
             for (p, b), t in zip(blocks.items(), types)}
    experts = MoEExperts(store, n_threads=2)
    try:
        for n_tokens in (1, 37):
            hidden_states = rng.standard_normal((n_tokens, hidden), dtype=np.float32)
            ids = np.stack([rng.choice(n_experts, 3, replace=False) for _ in range(n_tokens)])
            weights = rng.uniform(0.1, 1.0, ids.shape).astype(np.float32)
            out = experts.forward(hidden_states, ids, weights)
            want = routed_experts_reference(*map(torch.from_numpy, (hidden_states, ids, weights, dense["gate_proj"],
                                                                   dense["up_proj"], dense["down_proj"])))
            assert rel_err(out, want.numpy()) < 1e-4
    finally:
        experts.close()
