"""Prefix reuse: a prompt that starts with tokens still in the engine's cache prefills only the rest, gives the
same greedy output as a fresh prefill, and reports the reused tokens (OpenAI cached_tokens, Anthropic
cache_read_input_tokens, /metrics) through the real server and the official clients."""

import json
import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest

from conftest import K2_SPEC
from hybrid.generation.engine import Engine
from hybrid.generation.generate import Stats, generate
from hybrid.generation.prefix_cache import MIN_REUSE, PrefixCache, common_prefix
from hybrid.generation.sampling import SamplingParams
from hybrid.read.tiny import make_tiny
from hybrid.server.app import create_app
from hybrid.server.service import load_service
from live_server import Server
from test_engine import collect, drain

KEY = "prefix-key"
MODEL = "kimi-k2-tiny"
NAMES = (MODEL,)
CONTEXT = 4096  # the shared tiny checkpoint has 512 positions: too few for a conversation of ~3K tokens
WORDS = "the a cache slot token prefix agent turn model reply tool file line test patch diff error".split()


def text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "k2-long", replace(K2_SPEC, max_position_embeddings=CONTEXT))


@pytest.fixture(scope="module")
def service(ckpt):
    svc = load_service(ckpt, names=NAMES, max_concurrency=8, max_context=CONTEXT)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(service):
    s = Server(create_app(service, api_key=KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


# --- (a) the bookkeeping alone

def test_common_prefix():
    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 3, 4])) == 4
    assert common_prefix(a, np.array([1, 2, 9, 4])) == 2
    assert common_prefix(a, np.array([1, 2])) == 2
    assert common_prefix(a, np.array([], dtype=np.int64)) == 0
    assert common_prefix(a, np.array([7])) == 0


def test_longest_match_back_off_and_lru():
    p = PrefixCache(3, min_reuse=1)
    assert p.choose(range(3), [1, 2, 3]) == (0, 0)  # nothing cached: the first of the never-used slots
    p.release(0, [1, 2, 3, 4])
    p.release(1, [1, 2, 9])
    assert p.choose(range(3), [1, 2, 3, 5]) == (0, 3)  # the longest match wins over a shorter one
    assert p.choose(range(3), [1, 2, 3, 4, 5]) == (0, 4)  # the whole slot, then one new token
    assert p.choose(range(3), [1, 2, 3, 4]) == (0, 3)  # the whole prompt cached: its last token is prefilled
    assert p.choose(range(3), [1]) == (2, 0)  # only one prompt token: nothing reusable, an unused slot
    assert p.choose([1, 2], [1, 2, 3, 5]) == (1, 2)  # only free slots are candidates
    assert p.choose(range(3), [7, 8]) == (2, 0)  # no match: the least recently used (never used) slot
    p.release(2, [5, 6])
    assert p.choose(range(3), [7, 8]) == (0, 0)  # now slot 0, released first
    p.release(0, [1, 2, 3, 4])
    assert p.choose(range(3), [7, 8]) == (1, 0)
    assert p.choose(range(3), [1, 2, 7]) == (1, 2)  # equal matches: the least recently used of them
    p.take(0, 2)
    assert p.choose([0], [1, 2, 3, 4]) == (0, 2)  # taken: only the kept prefix remains
    p.forget(0)
    assert p.choose([0], [1, 2, 3, 4]) == (0, 0)
    with pytest.raises(ValueError):
        p.choose([], [1, 2])


def test_a_few_shared_template_tokens_do_not_evict_a_history():
    p = PrefixCache(2, min_reuse=4)
    p.release(0, [1, 2, 3, 10, 11, 12, 13, 14])  # a long conversation starting with template tokens 1, 2, 3
    assert p.choose(range(2), [1, 2, 3, 20, 21]) == (1, 0)  # a new one shares only those: the empty slot
    assert p.choose(range(2), [1, 2, 3, 10, 11, 30]) == (0, 5)  # its own next turn reuses it
    assert p.choose([0], [1, 2, 3, 20]) == (0, 3)  # the only free slot: what it shares is still reused


# --- (b) exactness: reused-prefix greedy outputs equal fresh ones

def fresh(model, ids, n) -> list[int]:
    stats = Stats()
    list(generate(model, ids, SamplingParams(max_new_tokens=n), stats=stats))
    return stats.tokens


def run(engine, ids, n) -> tuple[list[int], int]:
    """Greedy tokens and the reused prompt tokens of one request through the engine."""
    req, q = collect(engine, ids, n)
    return drain(q)[0], req.cached_tokens


def test_reused_prefix_equals_fresh_prefill(service):
    model = service.model
    engine = Engine(model, max_batch=2, max_context=CONTEXT, prefill_chunk=128)
    rng = random.Random(0)
    try:
        a = [rng.randrange(256) for _ in range(300)]
        out_a, cached = run(engine, a, 12)
        assert cached == 0 and out_a == fresh(model, a, 12)
        b = a + out_a + [rng.randrange(256) for _ in range(40)]  # the next turn: history + new tokens
        out_b, cached = run(engine, b, 12)
        assert cached == len(a) + len(out_a) - 1  # the last generated token was sampled, never fed
        assert out_b == fresh(model, b, 12)
        c = a[:150] + [rng.randrange(256) for _ in range(90)]  # diverges from the cached sequence midway
        other = [rng.randrange(256) for _ in range(60)]  # unrelated: takes the other slot, evicts nothing
        out_other, cached = run(engine, other, 8)
        assert cached == 0 and out_other == fresh(model, other, 8)
        out_c, cached = run(engine, c, 12)
        assert cached == 150 and out_c == fresh(model, c, 12)
        out_again, cached = run(engine, c, 12)  # the same prompt again: all but its last token reused
        assert cached == len(c) - 1 and out_again == out_c
    finally:
        engine.close()


# --- (c) through the server and the official clients

def reference(service, messages, max_tokens) -> str:
    """The reply a fresh cache gives (no reuse), through the same template, sampling and text decoding."""
    ids = service.prompt(messages)
    params = service.params(len(ids), max_tokens, temperature=0)
    steps = generate(service.model, ids, params, service.stop_ids, tokenizer=service.tokenizer)
    return "".join(s.text for s in steps)


def expected_reuse(service, messages) -> int:
    """What the engine should reuse for this conversation now: the longest match among its (all free) slots when
    it reaches MIN_REUSE tokens, else what the least recently used slot shares."""
    ids = np.asarray(service.prompt(messages))
    table = service.engine.prefixes
    shared = [min(common_prefix(t, ids), len(ids) - 1) for t in table.tokens]
    if max(shared) >= MIN_REUSE:
        return max(shared)
    return shared[min(range(len(shared)), key=lambda s: table.released[s])]


def test_three_turn_conversation_reuses_its_history(service, client):
    # first on this module's server: nothing is cached before turn 1
    messages = [{"role": "system", "content": text(1, 450)}, {"role": "user", "content": text(2, 60)}]
    reused = []
    for turn in range(3):
        want, n_prompt = expected_reuse(service, messages), len(service.prompt(messages))
        if turn < 2:
            r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=12)
            reply, usage = r.choices[0].message.content, r.usage
        else:  # the last turn streamed, its usage in the final chunk
            chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                                         max_tokens=12, stream=True,
                                                         stream_options={"include_usage": True}))
            reply, usage = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].usage
        assert reply == reference(service, messages, 12), f"turn {turn + 1}"
        assert usage.prompt_tokens == n_prompt and usage.prompt_tokens_details.cached_tokens == want
        reused.append(want)
        previous = n_prompt
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": text(10 + turn, 40)}]
    assert reused[0] == 0 and previous > 2500
    assert reused[1] > 500 and reused[2] > reused[1]  # at least the whole previous prompt each time


def test_completions_report_cached_tokens(service, client):
    prompt = [7 + i % 200 for i in range(400)]
    first = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6)
    again = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=6)
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt) - 1
    assert again.choices[0].text == first.choices[0].text


def test_anthropic_reports_cache_reads_and_metrics_count_them(service, server):
    anthropic = pytest.importorskip("anthropic")
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    system, messages = text(3, 300), [{"role": "user", "content": text(4, 30)}]
    conversation = [{"role": "system", "content": system}, *messages]
    n_prompt, want = len(service.prompt(conversation)), expected_reuse(service, conversation)
    first = a.messages.create(model=MODEL, max_tokens=6, system=system, messages=messages)
    assert first.usage.cache_read_input_tokens == want < 50  # what earlier prompts share: the template's start
    assert first.usage.input_tokens + want == n_prompt and first.usage.cache_creation_input_tokens == 0
    events = list(a.messages.create(model=MODEL, max_tokens=6, system=system, messages=messages, stream=True))
    start = events[0].message.usage
    assert start.cache_read_input_tokens == n_prompt - 1 and start.input_tokens == 1
    assert start.cache_creation_input_tokens == 0
    assert events[-2].type == "message_delta" and events[-2].usage.cache_read_input_tokens == n_prompt - 1

    get = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"})
    metrics = urllib.request.urlopen(get).read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("hybrid_")}
    c = service.counters
    assert values["hybrid_cached_prompt_tokens_total"] == c.cached_prompt_tokens >= n_prompt - 1
    assert values["hybrid_prefilled_prompt_tokens_total"] == c.prefilled_prompt_tokens
    assert c.cached_prompt_tokens + c.prefilled_prompt_tokens == c.prompt_tokens


# --- (d) concurrency: conversations sharing the engine equal their solo runs

def conversation(client, seed: int, turns: int = 2) -> list[str]:
    messages = [{"role": "system", "content": text(100 + seed, 120)}, {"role": "user", "content": text(seed, 20)}]
    replies = []
    for turn in range(turns):
        r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8)
        replies.append(r.choices[0].message.content)
        messages += [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": text(seed + turn, 8)}]
    return replies


def solo(service, seed: int, replies: list[str]) -> list[str]:
    """Each turn's fresh reply, given the history the concurrent run produced."""
    messages = [{"role": "system", "content": text(100 + seed, 120)}, {"role": "user", "content": text(seed, 20)}]
    out = []
    for turn, reply in enumerate(replies):
        out.append(reference(service, messages, 8))
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": text(seed + turn, 8)}]
    return out


def test_eight_concurrent_conversations_equal_their_solo_runs(service, client):
    before = service.counters.cached_prompt_tokens
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda seed: conversation(client, seed), range(8)))
    assert service.counters.cached_prompt_tokens - before > 700  # second turns reused (about 700 tokens each)
    assert len({json.dumps(r) for r in together}) > 1  # different conversations, different replies
    for seed, replies in enumerate(together):
        assert replies == solo(service, seed, replies), f"conversation {seed}"
