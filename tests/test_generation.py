"""Sampling and the generation loop's contract: greedy, seeds, filters, stops, limits."""

import pytest
import torch

from hybrid.errors import ConfigError, GenerationError
from hybrid.generation.generate import Stats, generate, new_cache
from hybrid.run.kv_cache import MLACache
from hybrid.run.loader import load_model
from hybrid.generation.sampling import SamplingParams, sample
from conftest import K2_FILES
from hybrid.read.config import load_config


def test_greedy_is_argmax_and_filters_reduce_to_it():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    best = int(logits.argmax())
    assert sample(logits, SamplingParams()) == best
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1), torch.Generator().manual_seed(1)) == best
    assert sample(logits, SamplingParams(temperature=1.0, top_p=1e-6), torch.Generator().manual_seed(1)) == best
    assert sample(logits, SamplingParams(temperature=1.0, min_p=0.999), torch.Generator().manual_seed(1)) == best


def test_top_k_never_leaves_the_top_k():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    top = set(logits.topk(5).indices.tolist())
    gen = torch.Generator().manual_seed(2)
    draws = {sample(logits, SamplingParams(temperature=5.0, top_k=5), gen) for _ in range(200)}
    assert draws <= top and len(draws) > 1


def test_bad_sampling_parameters_are_named():
    with pytest.raises(ConfigError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingParams(temperature=-1)


EXTREMES = [dict(temperature=2.0, top_p=1e-300), dict(temperature=1e-300), dict(temperature=5e-324, top_k=3),
            dict(temperature=1e-30, min_p=0.5, top_p=0.5), dict(temperature=2.0, top_k=1, top_p=1e-300, min_p=0.999)]


@pytest.mark.parametrize("kw", EXTREMES, ids=[str(k) for k in EXTREMES])
def test_extreme_parameters_still_sample_the_best_token(kw):
    logits = torch.randn(163840, generator=torch.Generator().manual_seed(3)) * 30
    assert sample(logits, SamplingParams(**kw), torch.Generator().manual_seed(4)) == int(logits.argmax())


def reference_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """The filters written independently in numpy float64: temperature, then top-k, min-p, top-p."""
    import numpy as np

    x = logits.numpy().astype(np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_k:
        p[p < np.sort(p)[-top_k]] = 0
    if min_p:
        p[p < min_p * p.max()] = 0
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        mass_before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])
        p[order[mass_before >= top_p * p.sum()]] = 0
    return p / p.sum()


@pytest.mark.parametrize("kw", [dict(temperature=0.7, top_p=0.8), dict(temperature=1.3, top_k=6, min_p=0.05)])
def test_draw_frequencies_match_an_independent_reference(kw):
    logits = torch.randn(12, generator=torch.Generator().manual_seed(5)) * 2
    want = reference_probs(logits, **kw)
    gen, n = torch.Generator().manual_seed(6), 6000
    counts = torch.bincount(torch.tensor([sample(logits, SamplingParams(**kw), gen) for _ in range(n)]),
                            minlength=12).numpy()
    assert set(counts.nonzero()[0]) <= set(want.nonzero()[0])  # filtered tokens are never drawn
    assert abs(counts / n - want).max() < 0.03


def test_seeds_over_the_whole_64_bit_range_and_not_beyond():
    from hybrid.generation.sampling import SEED_MAX, SEED_MIN

    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    for seed in (SEED_MIN, -1, 0, SEED_MAX):
        params = SamplingParams(temperature=1.0, seed=seed)
        assert sample(logits, params, params.generator()) == sample(logits, params, params.generator())
    for seed in (SEED_MAX + 1, SEED_MIN - 1, 10 ** 23, 1.5, True):
        with pytest.raises(ConfigError, match="seed"):
            SamplingParams(seed=seed)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature"):
            SamplingParams(temperature=bad)


def test_invalid_logits_are_a_generation_error_not_a_crash():
    logits = torch.zeros(10)
    logits[3] = float("nan")
    with pytest.raises(GenerationError, match="invalid logits"):
        sample(logits, SamplingParams(temperature=1.0))


def test_stop_ids_end_generation_with_reason_stop(k2_tiny):
    model = load_model(k2_tiny)
    stats = Stats()
    first = [s.token for s in generate(model, [1, 2, 3], SamplingParams(max_new_tokens=4), stats=stats)]
    assert stats.finish_reason == "length" and len(first) == 4
    stats = Stats()
    steps = list(generate(model, [1, 2, 3], SamplingParams(max_new_tokens=4), stop_ids={first[1]}, stats=stats))
    assert [s.token for s in steps] == first[:2] and steps[-1].finish_reason == "stop"


def test_context_overflow_is_a_clear_error(k2_tiny):
    model = load_model(k2_tiny)
    with pytest.raises(GenerationError, match="context overflow"):
        list(generate(model, [1] * 500, SamplingParams(max_new_tokens=100)))
    cache = new_cache(model, 4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(GenerationError, match="context overflow"):
        model(torch.tensor([[1, 2]]), cache=cache)


def test_k2_cache_costs_68_6_kib_per_token():
    cfg = load_config(K2_FILES / "config_0905.reconstructed.json")
    cache = MLACache(cfg, max_len=1, device="meta", dtype=torch.bfloat16)
    assert cache.nbytes == cfg.kv_cache_bytes_per_token == (512 + 64) * 61 * 2
