"""The long-prefill paths of the CPU experts: dense GEMMs in CPU torch and experts streamed to the (GPU) device,
each against the plain float64 loop of tests/reference.py on the store's dequantized weights, and end to end
against today's kernel path on the tiny checkpoint (same greedy tokens)."""

import numpy as np
import pytest
import torch
from reference import routed_experts_reference

from cpu_kernels import SKIP, KernelThreads, MoEExperts, dequantize_matrix, parse_format
from cpu_kernels.dequant import dense_matrix, dense_shape
from cpu_kernels.store import PROJECTIONS, projection_shape
from hybrid.generation.generate import Stats, generate
from hybrid.generation.sampling import SamplingParams
from hybrid.run.expert_gemm import DenseScratch, ExpertGemm, first_winning
from hybrid.run.expert_streaming import ExpertStreamer, group_size, unpack
from hybrid.run.experts import HybridExperts
from hybrid.run.loader import load_model
from placement.plan import Plan, Rule, Settings

E, H, I, K = 8, 256, 128, 3
FORMATS = ["bf16", "int8", "int4", "int4-g32"]


@pytest.fixture(scope="module")
def worker():
    threads = KernelThreads(2)
    yield threads
    threads.close()


def weights_of(seed, n_out=I, h=H):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(E, n_out, h, generator=g) * 0.05, torch.randn(E, n_out, h, generator=g) * 0.05,
            torch.randn(E, h, n_out, generator=g) * 0.05)


def layer(fmt, worker, seed=0):
    gate, up, down = weights_of(seed)
    return MoEExperts.from_weights(gate.numpy(), up.numpy(), down.numpy(), parse_format(fmt), threads=worker)


def dequantized(experts):
    """The store's weights as the kernels see them: [E, n_out, n_in] float32 per projection (numpy dequantizer)."""
    store = experts.store
    out = []
    for name in PROJECTIONS:
        n_out, n_in = projection_shape(name, store.hidden, store.width)
        out.append(torch.from_numpy(np.stack([dequantize_matrix(store.values[name][e], store.scales[name][e],
                                                                 store.format_of(name), n_out, n_in)
                                              for e in range(store.n_experts)])))
    return out


def routing(n_tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n_tokens)])
    ids[: n_tokens // 2, 0] = 5  # one expert with many tokens, others with few
    weights = torch.rand(n_tokens, K, generator=g)
    hidden = torch.randn(n_tokens, H, generator=g)
    return hidden, ids, weights


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("fmt", ["bf16", "int8-g32", "int4-g32", "int4"])
def test_dense_matrices_equal_the_store_dequantizer(fmt, worker):
    # A width of 160 leaves gate's and up's last 128-row tile part padding (formats with 32-input groups); the
    # torch unpacking (the GPU path's) must agree too.
    width = 128 if fmt == "int4" else 160
    g = torch.Generator().manual_seed(3)
    gate, up, down = torch.randn(2, width, H, generator=g), torch.randn(2, width, H, generator=g), torch.randn(2, H, width, generator=g)
    experts = MoEExperts.from_weights(gate.numpy(), up.numpy(), down.numpy(), parse_format(fmt), threads=worker)
    store = experts.store
    for name in PROJECTIONS:
        n_out, n_in = projection_shape(name, store.hidden, store.width)
        fmt_of = store.format_of(name)
        want = dequantize_matrix(store.values[name][1], store.scales[name][1], fmt_of, n_out, n_in)
        shape, transposed = dense_shape(fmt_of, n_out, n_in)
        out = np.full(shape, np.nan, np.float32)
        assert dense_matrix(fmt_of, store.values[name][1], store.scales[name][1], n_out, n_in, out, worker)
        assert np.array_equal(out[:, :n_out].T, want) and not out[:, n_out:].any()
    for name, want in zip(PROJECTIONS, dequantized(experts)):
        values, scales = store.values[name][1], store.scales[name][1]
        values = values.view(np.int16) if values.dtype == np.uint16 else values  # bf16 bits: a dtype torch has
        got = unpack(store.format_of(name).name, torch.from_numpy(values.copy()), torch.from_numpy(scales.copy()),
                     projection_shape(name, store.hidden, store.width)[0], torch.float32)
        assert torch.equal(got, want[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_gemm_path_matches_the_reference(fmt, worker):
    experts = layer(fmt, worker)
    hidden, ids, weights = routing(24)
    gemm = ExpertGemm(experts, 6, DenseScratch(), torch.float32)
    mask = gemm.pairs(ids)
    counts = torch.bincount(ids.flatten(), minlength=E)
    assert torch.equal(mask, counts[ids] >= 6) and mask.any() and not mask.all()
    got = gemm.run(hidden, ids, weights, mask)
    want = routed_experts_reference(hidden, ids, torch.where(mask, weights, 0.0), *dequantized(experts))
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
def test_hybrid_experts_split_pairs_between_gemm_and_kernels(fmt, worker):
    experts = layer(fmt, worker)
    hybrid = HybridExperts(experts, E)
    hybrid.gemm = ExpertGemm(experts, 6, DenseScratch(), torch.float32)
    hidden, ids, weights = routing(24)
    mask = hybrid.gemm.pairs(ids)
    got = hybrid(hidden, ids, weights)
    deq = dequantized(experts)
    quantized = experts.fmt.spec.quantized_inputs  # the kernels' pairs see int8-rounded inputs on AVX2 hosts
    want = (routed_experts_reference(hidden, ids, torch.where(mask, weights, 0.0), *deq)
            + routed_experts_reference(hidden, ids, torch.where(mask, 0.0, weights), *deq, int8_inputs=quantized))
    assert rel_err(got, want) < 1e-5


def test_first_winning_count():
    counts = (8, 16, 32, 64)
    assert first_winning(counts, [False, False, True, True]) == 32
    assert first_winning(counts, [True, True]) == 8
    assert first_winning(counts, [False, True, False, False]) is None  # a win that does not last is noise
    assert first_winning(counts, [True, False, True, True]) == 32


def test_streamed_layers_match_the_reference_in_any_order(worker):
    layers = {1: layer("int4", worker, 1), 2: layer("int8", worker, 2), 4: layer("bf16", worker, 3)}
    per_expert = sum(a.nbytes for a in (*layers[1].store.values.values(), *layers[1].store.scales.values())) // E
    n_group = group_size(layers[1].store, 3 * per_expert + 1)
    assert n_group == 3  # groups of 3, 3 and 2 experts: slots refilled within a layer and across layers
    streamer = ExpertStreamer({i: x.store for i, x in layers.items()}, "cpu", 4, n_group)
    hidden, ids, weights = routing(16)
    ids[3, 1] = SKIP  # a pair computed elsewhere (a GPU-resident expert)
    kept = torch.where(ids == SKIP, 0.0, weights)
    # In model order twice (the copier runs ahead cyclically), then out of order (it restarts where asked).
    for i in (1, 2, 4, 1, 2, 4, 2, 1, 4, 4):
        got = streamer.compute(i, hidden, ids, weights)
        want = routed_experts_reference(hidden, ids.clamp(min=0), kept, *dequantized(layers[i]))
        assert rel_err(got, want) < 1e-5, i
    assert streamer.takes(4) and not streamer.takes(3)


@pytest.mark.gpu
def test_streamed_to_cuda_matches_the_reference(worker):
    layers = {1: layer("int4", worker, 1), 2: layer("bf16", worker, 3)}
    streamer = ExpertStreamer({i: x.store for i, x in layers.items()}, "cuda", 1, 3)
    hidden, ids, weights = routing(16)
    for i in (1, 2, 1, 2, 2):
        got = streamer.compute(i, hidden.cuda(), ids, weights).cpu()
        assert rel_err(got, routed_experts_reference(hidden, ids, weights, *dequantized(layers[i]))) < 1e-4, i


def greedy(model, n=12):
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    stats = Stats()
    list(generate(model, ids, SamplingParams(max_new_tokens=n), stats=stats, chunk=20))
    return stats.tokens


def experts_plan(**settings):
    return Plan("test", Settings(cpu_threads=2, **settings),
                (Rule(r"\.mlp\.experts\.", "cpu", "int4", "cpu_moe"), Rule(".*", "cuda:0", "fp32", "torch")))


def test_streamed_prefill_gives_the_kernel_path_tokens(k2_tiny):
    base = load_model(k2_tiny, plan=experts_plan())
    streamed = load_model(k2_tiny, plan=experts_plan(gpu_prefill_tokens=8))  # cuda:0 runs on the CPU here
    moe = [layer.mlp.experts for layer in streamed.model.layers if isinstance(getattr(layer.mlp, "experts", None),
                                                                              HybridExperts)]
    assert moe and all(m.streamer is moe[0].streamer and m.layer is not None for m in moe)
    assert greedy(streamed) == greedy(base)
    assert moe[0].streamer.layer_calls == 2 * len(moe)  # the two 20-token prefill chunks; decode stayed on the kernels


def test_gemm_prefill_gives_the_kernel_path_tokens(k2_tiny):
    base = load_model(k2_tiny, plan=experts_plan())
    model = load_model(k2_tiny, plan=experts_plan())
    scratch = DenseScratch()
    moe = [layer.mlp.experts for layer in model.model.layers if isinstance(getattr(layer.mlp, "experts", None),
                                                                           HybridExperts)]
    for experts in moe:
        assert experts.gemm is None  # tiny experts: not measured, off
        experts.gemm = ExpertGemm(experts.cpu, 2, scratch, torch.float32)
    assert greedy(model) == greedy(base)
    assert all(experts.gemm.pairs_run > 0 for experts in moe)
