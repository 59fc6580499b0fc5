"""cpu_kernels.MoEExperts against the plain torch loop in reference.py, for every format, on tiny shapes.

Dimension legend: T tokens, H hidden, I expert width, E experts, K top-k. Shapes are chosen so group counts are
odd (H / G and I / G) and H, I are not multiples of the 128-row tile, which exercises the padded last tile.
"""

import numpy as np
import pytest
import torch
from reference import routed_experts_reference

from cpu_kernels import SKIP, Format, KernelThreads, MoEExperts, dequantize_matrix
from cpu_kernels.formats import MATVEC_ERROR_BOUND

N_EXPERTS = 12
# format -> (H, I): H / G and I / G odd where the group allows it.
SHAPES = {
    "bf16": (264, 136),
    "int8-g32": (288, 160),
    "int8-g64": (320, 192),
    "int8-g128": (384, 128),
    "int4-g32": (288, 160),
    "int4-g64": (320, 192),
    "int4-g128": (384, 128),
}
FORMATS = {
    "bf16": Format("bf16"),
    "int8-g32": Format("int8", 32),
    "int8-g64": Format("int8", 64),
    "int8-g128": Format("int8", 128),
    "int4-g32": Format("int4", 32),
    "int4-g64": Format("int4", 64),
    "int4-g128": Format("int4", 128),
}
# (T, K): every token count and every top-k of the issue, without the full cross product.
TOKENS_TOPK = [(1, 1), (2, 2), (7, 8), (64, 2), (300, 8), (1, 8), (64, 1)]


def float_experts(hidden, width, seed=0):
    rng = np.random.default_rng(seed)
    gate = rng.standard_normal((N_EXPERTS, width, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
    up = rng.standard_normal((N_EXPERTS, width, hidden), dtype=np.float32) / np.float32(np.sqrt(hidden))
    down = rng.standard_normal((N_EXPERTS, hidden, width), dtype=np.float32) / np.float32(np.sqrt(width))
    return gate, up, down


def dequantized(experts: MoEExperts):
    """The store's exact weights as float32 torch tensors (gate, up, down)."""
    st, out = experts.store, []
    for name, (n_out, n_in) in (("gate_proj", (st.width, st.hidden)), ("up_proj", (st.width, st.hidden)),
                                ("down_proj", (st.hidden, st.width))):
        mats = [dequantize_matrix(st.values[name][e], st.scales[name][e], st.fmt, n_out, n_in) for e in range(st.n_experts)]
        out.append(torch.from_numpy(np.stack(mats)))
    return out


def routing(n_tokens, top_k, seed=1):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(N_EXPERTS, top_k, replace=False) for _ in range(n_tokens)]).astype(np.int64)
    weights = rng.random((n_tokens, top_k), dtype=np.float32)
    hidden_rng = np.random.default_rng(seed + 100)
    return ids, weights, hidden_rng


def reference(hidden, ids, weights, gate, up, down, int8_inputs=False):
    return routed_experts_reference(torch.from_numpy(hidden), torch.from_numpy(ids), torch.from_numpy(weights),
                                    gate, up, down, int8_inputs).numpy()


def rel_err(got, want):
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.fixture(scope="module", params=list(FORMATS))
def layer(request):
    """(format key, MoEExperts, float weights as torch, dequantized weights as torch) for one format."""
    hidden, width = SHAPES[request.param]
    floats = float_experts(hidden, width)
    experts = MoEExperts.from_weights(*floats, FORMATS[request.param], n_threads=2)
    yield request.param, experts, [torch.from_numpy(w) for w in floats], dequantized(experts)
    experts.close()


@pytest.mark.parametrize("n_tokens,top_k", TOKENS_TOPK)
def test_forward_matches_reference(layer, n_tokens, top_k):
    key, experts, floats, deq = layer
    ids, weights, rng = routing(n_tokens, top_k)
    hidden = rng.standard_normal((n_tokens, experts.hidden), dtype=np.float32)
    out = experts.forward(hidden, ids, weights)
    assert out.shape == (n_tokens, experts.hidden) and out.dtype == np.float32
    # Tight: the kernels against the same (dequantized) weights and inputs, float32 against float64 accumulation.
    # With int8 inputs that difference now and then moves an input across a rounding boundary, one step of its
    # block's scale: more pairs, more such steps (300 x 8 pairs: ~6e-5).
    quantized = experts.fmt.spec.quantized_inputs
    assert rel_err(out, reference(hidden, ids, weights, *deq, quantized)) < (2e-4 if quantized else 2e-5)
    # The format's stated error against the original float weights (three matvecs deep, hence the factor).
    assert rel_err(out, reference(hidden, ids, weights, *floats)) < 3 * MATVEC_ERROR_BOUND[FORMATS[key].name]


def test_duplicates_and_unused_experts(layer):
    _, experts, _, deq = layer
    # Expert 3 chosen by every token (twice by one), experts 0-2 and 6-11 chosen by none.
    ids = np.array([[3, 5], [3, 3], [4, 3], [3, 5], [5, 4]], np.int64)
    weights = np.random.default_rng(2).random(ids.shape, dtype=np.float32)
    hidden = np.random.default_rng(3).standard_normal((5, experts.hidden), dtype=np.float32)
    assert rel_err(experts.forward(hidden, ids, weights),
                   reference(hidden, ids, weights, *deq, experts.fmt.spec.quantized_inputs)) < 2e-5


def test_skipped_pairs_are_left_out(layer):
    _, experts, _, deq = layer
    # A pair with id SKIP is computed elsewhere (GPU experts, the GEMM prefill path): it adds nothing here,
    # exactly as if its weight were zero; a token whose pairs are all skipped gets zeros.
    ids = np.array([[3, SKIP], [SKIP, SKIP], [4, 3], [SKIP, 5]], np.int64)
    weights = np.random.default_rng(4).random(ids.shape, dtype=np.float32)
    hidden = np.random.default_rng(5).standard_normal((4, experts.hidden), dtype=np.float32)
    kept = np.where(ids == SKIP, 0.0, weights).astype(np.float32)
    out = experts.forward(hidden, ids, weights)
    assert not out[1].any()
    assert rel_err(out, reference(hidden, np.where(ids == SKIP, 0, ids), kept, *deq,
                                  experts.fmt.spec.quantized_inputs)) < 2e-5


def test_bf16_hidden_matches_its_float_value(layer):
    _, experts, _, deq = layer
    ids, weights, rng = routing(7, 2)
    x32 = rng.standard_normal((7, experts.hidden), dtype=np.float32)
    x_bf16 = ((x32.view(np.uint32) + np.uint32(0x8000)) >> np.uint32(16)).astype(np.uint16)
    x_back = (x_bf16.astype(np.uint32) << np.uint32(16)).view(np.float32)
    out = experts.forward(x_bf16, ids, weights)
    assert rel_err(out, reference(x_back, ids, weights, *deq, experts.fmt.spec.quantized_inputs)) < 2e-5
    # and within bf16 rounding of the float32 input's result (and, for int8 inputs, two independent roundings of
    # them to int8: ~1.1 % measured)
    assert rel_err(out, experts.forward(x32, ids, weights)) < (3e-2 if experts.fmt.spec.quantized_inputs else 1e-2)


def test_out_accumulates(layer):
    _, experts, _, _ = layer
    ids, weights, rng = routing(7, 2)
    hidden = rng.standard_normal((7, experts.hidden), dtype=np.float32)
    start = rng.standard_normal((7, experts.hidden), dtype=np.float32)
    out = start.copy()
    returned = experts.forward(hidden, ids, weights, out=out)
    assert returned is out
    np.testing.assert_allclose(out, start + experts.forward(hidden, ids, weights), rtol=1e-5, atol=1e-5)


def test_submit_wait_equals_forward(layer):
    _, experts, _, _ = layer
    ids, weights, rng = routing(64, 2)
    hidden = rng.standard_normal((64, experts.hidden), dtype=np.float32)
    experts.submit(hidden, ids, weights)
    with pytest.raises(RuntimeError, match="before wait"):
        experts.submit(hidden, ids, weights)
    got = experts.wait()
    np.testing.assert_array_equal(got, experts.forward(hidden, ids, weights))
    with pytest.raises(RuntimeError, match="without a submit"):
        experts.wait()


def test_one_thread_equals_two(layer):
    _, experts, _, _ = layer
    single = MoEExperts(experts.store, n_threads=1)
    ids, weights, rng = routing(9, 8)
    hidden = rng.standard_normal((9, experts.hidden), dtype=np.float32)
    np.testing.assert_allclose(single.forward(hidden, ids, weights), experts.forward(hidden, ids, weights), rtol=1e-6, atol=1e-6)
    single.close()


def test_int32_ids_and_empty_batch(layer):
    _, experts, _, _ = layer
    ids, weights, rng = routing(3, 2)
    hidden = rng.standard_normal((3, experts.hidden), dtype=np.float32)
    np.testing.assert_array_equal(experts.forward(hidden, ids.astype(np.int32), weights), experts.forward(hidden, ids, weights))
    empty = experts.forward(np.zeros((0, experts.hidden), np.float32), np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32))
    assert empty.shape == (0, experts.hidden)


def test_layers_sharing_one_worker(layer):
    """Two layers on one KernelThreads: both submitted before either is waited for, results as if alone."""
    _, experts, _, _ = layer
    worker = KernelThreads(2)
    first, second = MoEExperts(experts.store, threads=worker), MoEExperts(experts.store, threads=worker)
    ids_a, weights_a, rng = routing(7, 8, seed=5)
    ids_b, weights_b, _ = routing(300, 2, seed=6)
    x_a = rng.standard_normal((7, experts.hidden), dtype=np.float32)
    x_b = rng.standard_normal((300, experts.hidden), dtype=np.float32)
    first.submit(x_a, ids_a, weights_a)
    second.submit(x_b, ids_b, weights_b)
    got_b, got_a = second.wait(), first.wait()
    np.testing.assert_allclose(got_a, experts.forward(x_a, ids_a, weights_a), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got_b, experts.forward(x_b, ids_b, weights_b), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="differs"):
        MoEExperts(experts.store, n_threads=1, threads=worker)
    first.close()
    worker.close()
