"""Continuous batching: sequences of different lengths decoded together equal each decoded alone."""

import queue
import threading

import pytest
import torch

from hybrid.engine import Engine, Request
from hybrid.errors import GenerationError
from hybrid.generate import Stats, generate, new_cache
from hybrid.loader import load_model
from hybrid.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(k2_tiny):
    return load_model(k2_tiny)


def test_slots_of_different_lengths_decode_together(model):
    a = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(1))
    b = torch.randint(0, 256, (1, 35), generator=torch.Generator().manual_seed(2))
    cache = new_cache(model, 64, batch=2)
    model(a[:, :-1], cache=cache, slots=[0])
    model(b[:, :-1], cache=cache, slots=[1])
    together = model(torch.cat([a[:, -1:], b[:, -1:]]), cache=cache, slots=[0, 1])
    assert cache.lengths == [20, 35]
    alone_a, alone_b = model(a)[0, -1], model(b)[0, -1]
    assert float((together[0, -1] - alone_a).norm() / alone_a.norm()) < 1e-5
    assert float((together[1, -1] - alone_b).norm() / alone_b.norm()) < 1e-5


def collect(engine, ids, n, **kw):
    q = queue.Queue()
    req = engine.submit(Request(ids, SamplingParams(max_new_tokens=n, **kw), q.put))
    return req, q


def drain(q):
    tokens = []
    while True:
        step = q.get(timeout=60)
        if isinstance(step, Exception):
            raise step
        tokens.append(step.token)
        if step.finish_reason:
            return tokens, step.finish_reason


def alone(model, ids, n):
    stats = Stats()
    list(generate(model, ids, SamplingParams(max_new_tokens=n), stats=stats))
    return stats.tokens


def test_concurrent_requests_equal_their_solo_runs(model):
    engine = Engine(model, max_batch=4, max_context=128)
    try:
        prompts = [list(range(3 + i, 12 + 3 * i)) for i in range(6)]  # 6 requests, 4 slots: some wait
        handles = [collect(engine, p, 8 + i) for i, p in enumerate(prompts)]
        results = [drain(q) for _, q in handles]
        for p, (tokens, reason), i in zip(prompts, results, range(6)):
            assert reason == "length" and tokens == alone(model, p, 8 + i)
        assert engine.steps < sum(8 + i for i in range(6))  # decode steps were shared
    finally:
        engine.close()


def test_cancel_frees_the_slot(model):
    engine = Engine(model, max_batch=1, max_context=128)
    try:
        long_req, q1 = collect(engine, [1, 2, 3], 100)
        q1.get(timeout=60)
        long_req.cancel()
        tokens, reason = drain(collect(engine, [4, 5, 6], 3)[1])  # gets the only slot once it is freed
        assert len(tokens) == 3 and reason == "length"
        with pytest.raises(GenerationError, match="context overflow"):
            collect(engine, [1] * 100, 50)
    finally:
        engine.close()
