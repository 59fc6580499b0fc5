"""Continuous batching: sequences of different lengths decoded together equal each decoded alone."""

import queue

import pytest
import torch

from hybrid.generation.engine import Engine, Request
from hybrid.errors import GenerationError
from hybrid.generation.generate import Stats, generate, new_cache
from hybrid.run.loader import load_model
from hybrid.generation.sampling import SamplingParams


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


class DeviceFault:
    """Fault injection on the real model: once armed, the next batched decode forward raises, as a device
    error (a lost GPU, an out-of-memory) would. Nothing a request sends can do this."""

    def __init__(self, model):
        self.armed = False
        self.handle = model.model.embed_tokens.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.armed and args[0].shape[1] == 1:  # token ids [rows, 1]: a decode step (the prompts are longer)
            raise RuntimeError("simulated device failure")

    def remove(self):
        self.handle.remove()


def test_a_failing_sink_ends_its_request_only(model):
    engine = Engine(model, max_batch=2, max_context=128)
    try:
        def broken(step):
            raise RuntimeError("client's event loop is gone")

        engine.submit(Request([1, 2, 3], SamplingParams(max_new_tokens=50), broken))
        tokens, reason = drain(collect(engine, [4, 5, 6], 5)[1])
        assert len(tokens) == 5 and reason == "length" and engine.healthy
    finally:
        engine.close()


def test_an_engine_failure_ends_every_request_and_refuses_new_ones(model):
    from hybrid.errors import EngineError

    failures = []
    engine = Engine(model, max_batch=2, max_context=128, on_failure=failures.append)
    fault = DeviceFault(model)
    try:
        queues = [collect(engine, [1, 2, 3 + i], 60)[1] for i in range(3)]  # two run, one waits
        queues[0].get(timeout=60)
        fault.armed = True
        for q in queues:
            with pytest.raises(EngineError, match="simulated device failure"):
                drain(q)
        engine.thread.join(timeout=10)
        assert not engine.healthy and isinstance(engine.failure, RuntimeError) and len(failures) == 1
        with pytest.raises(EngineError):
            collect(engine, [1, 2], 2)
    finally:
        fault.remove()
        engine.close()


def test_close_ends_open_requests(model):
    from hybrid.errors import EngineError

    engine = Engine(model, max_batch=1, max_context=128)
    running, waiting = collect(engine, [1, 2, 3], 100)[1], collect(engine, [4, 5], 100)[1]
    running.get(timeout=60)
    engine.close()
    with pytest.raises(EngineError):
        drain(running)
    with pytest.raises(EngineError):
        drain(waiting)
