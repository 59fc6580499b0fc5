"""Sampling and the generation loop's contract: greedy, seeds, filters, stops, limits."""

import pytest
import torch

from hybrid.errors import ConfigError, GenerationError
from hybrid.generate import Stats, generate, new_cache
from hybrid.kv_cache import MLACache
from hybrid.loader import load_model
from hybrid.sampling import SamplingParams, sample
from conftest import K2_FILES
from hybrid.config import load_config


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
