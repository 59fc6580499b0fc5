"""Attention over long contexts in key blocks (hybrid.run.attention_core): the online softmax against a plain
per-query softmax, the tiny model's greedy tokens with several blocks per forward, and the prefill chunk the
planner can then afford at 128K on a 24 GB card."""

import pytest
import torch

from hybrid.generation.generate import Stats, generate, new_cache
from hybrid.generation.sampling import SamplingParams
from hybrid.run.attention_core import UPCAST_QUERIES, attend
from hybrid.run.expert_gemm import gemm_dtype
from hybrid.run.loader import load_model
from placement import memory, presets
from placement.hardware import describe
from placement.planner import PlanRequest, make_plan

HEADS, R, P = 3, 16, 8
BLOCK = 8  # small, so a few dozen keys already span several blocks


def reference(q_lat, q_pe, latent, k_pe, positions, scale):
    """Each query's softmax over the keys it sees, one query at a time, in float64."""
    B, T, Hh, _ = q_lat.shape
    out = torch.zeros(B, T, Hh, latent.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            n = int(positions[b, t]) + 1
            for h in range(Hh):
                s = (latent[b, :n].double() @ q_lat[b, t, h].double() + k_pe[b, :n].double() @ q_pe[b, t, h].double())
                out[b, t, h] = torch.softmax(s * scale, dim=0) @ latent[b, :n].double()
    return out


def inputs(starts, T, S, seed=0, dtype=torch.float32):
    """Rows continuing at their own starts (continuous batching) over a cache of S positions."""
    g = torch.Generator().manual_seed(seed)
    B = len(starts)
    q_lat, q_pe = torch.randn(B, T, HEADS, R, generator=g), torch.randn(B, T, HEADS, P, generator=g)
    latent, k_pe = torch.randn(B, S, R, generator=g), torch.randn(B, S, P, generator=g)
    positions = torch.tensor(starts)[:, None] + torch.arange(T)[None, :]
    return *(t.to(dtype) for t in (q_lat, q_pe, latent, k_pe)), positions


def rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("S", [5, BLOCK, BLOCK + 1, 2 * BLOCK, 2 * BLOCK + 3, 5 * BLOCK + 1])
@pytest.mark.parametrize("T", [1, 4])
def test_blocks_match_a_plain_softmax_with_ragged_starts(S, T):
    # The longest row ends at S (as the cache hands it over); the others started later or earlier.
    starts = [S - T, max(0, S - T - 3), 0]
    args = inputs(starts, T, S, seed=S * 10 + T)
    want = reference(*args, scale=0.3)
    got = attend(*args, scale=0.3, block=BLOCK)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) < 1e-5


def test_one_block_is_the_plain_softmax_exactly():
    """Up to one block nothing changes: the same ops in the same order as the model's attention before blocks."""
    q_lat, q_pe, latent, k_pe, positions = inputs([6, 0], 4, 10, dtype=torch.bfloat16)
    scores = torch.einsum("bthr,bsr->bths", q_lat, latent) + torch.einsum("bthp,bsp->bths", q_pe, k_pe)
    mask = torch.arange(10)[None, None, :] > positions[:, :, None]
    scores = (scores.float() * 0.3).masked_fill(mask[:, :, None, :], float("-inf"))
    before = torch.einsum("bths,bsr->bthr", scores.softmax(dim=-1).to(torch.bfloat16), latent)
    assert torch.equal(attend(q_lat, q_pe, latent, k_pe, positions, 0.3), before)  # default block: one block
    assert torch.equal(attend(q_lat, q_pe, latent, k_pe, positions, 0.3, block=10), before)


def test_blocks_past_every_rows_end_are_never_read():
    # Keys from the block after the last query's position are NaN: any read of them would poison the output.
    q_lat, q_pe, latent, k_pe, positions = inputs([9, 2], 4, 40)  # last position 12: block [8, 16) is the last read
    latent[:, 2 * BLOCK:], k_pe[:, 2 * BLOCK:] = float("nan"), float("nan")
    got = attend(q_lat, q_pe, latent, k_pe, positions, 0.3, block=BLOCK)
    assert torch.isfinite(got).all()
    assert rel_err(got, reference(q_lat, q_pe, latent, k_pe, positions, 0.3)) < 1e-5


def test_a_cpu_prefill_chunk_attends_in_fp32_where_bf16_is_slow():
    # 16 queries: GEMM-sized products, computed in fp32 on a CPU without native bf16 (AVX2), in bf16 with it (AMX)
    args = inputs([20, 3], UPCAST_QUERIES, 36, seed=5, dtype=torch.bfloat16)
    got = attend(*args, scale=0.3, block=BLOCK)
    upcast = attend(*(a.float() if a.is_floating_point() else a for a in args), scale=0.3, block=BLOCK)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, upcast.to(torch.bfloat16)) == (gemm_dtype() == torch.float32)


def test_bf16_blocks_stay_close_to_fp32():
    args = inputs([30, 11, 0], 4, 34, seed=7)
    want = reference(*args, scale=0.3)
    got = attend(*(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args), scale=0.3, block=BLOCK)
    assert got.dtype == torch.bfloat16 and rel_err(got.float(), want) < 2e-2


def test_key_block_grows_for_few_queries():
    assert memory.key_block(memory.BLOCK_QUERIES) == memory.key_block(512) == memory.KEY_BLOCK
    # long chunks (GPU prefill): scores no larger than a 512-token chunk's, blocks no shorter than MIN_KEY_BLOCK
    assert memory.key_block(1024) * 1024 == memory.KEY_BLOCK * 512 and memory.key_block(65536) == memory.MIN_KEY_BLOCK
    assert memory.key_block(1) == memory.BLOCK_QUERIES * memory.KEY_BLOCK  # decode at 128K: one block
    assert all(memory.key_block(t) * t <= memory.BLOCK_QUERIES * memory.KEY_BLOCK for t in range(1, 65))


# -- the tiny model: the full-score path against several blocks per forward


@pytest.fixture(scope="module")
def model(k2_tiny):
    return load_model(k2_tiny)


def set_key_block(model, block):
    for layer in model.model.layers:
        layer.self_attn.key_block = block


def greedy(model, ids, block, n=16, chunk=16):
    set_key_block(model, block)
    try:
        stats = Stats()
        list(generate(model, ids, SamplingParams(max_new_tokens=n), stats=stats, chunk=chunk))
        return stats.tokens
    finally:
        set_key_block(model, None)


def test_greedy_tokens_with_small_key_blocks_equal_the_full_scores(model):
    ids = torch.randint(0, 512, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    full = greedy(model, ids, None)  # 86 positions, every forward one block
    assert greedy(model, ids, BLOCK) == full  # 16-token chunks over up to 11 blocks, decode too
    assert len(set(full)) > 1


def test_batched_rows_at_different_lengths_with_small_key_blocks(model):
    """Continuous batching: rows 40 and 13 positions in, one forward of 5 tokens each, blocks of 8 keys."""
    g = torch.Generator().manual_seed(6)
    first, second, new = (torch.randint(0, 512, (1, n), generator=g) for n in (40, 13, 5))
    logits = {}
    for block in (None, BLOCK):
        set_key_block(model, block)
        try:
            cache = new_cache(model, 64, batch=2)
            model(first, cache=cache, slots=[0])
            model(second, cache=cache, slots=[1])
            logits[block] = model(new.expand(2, -1), cache=cache)
        finally:
            set_key_block(model, None)
    assert rel_err(logits[BLOCK], logits[None].double()) < 1e-5


# -- the planner


def test_the_4090_plan_prefills_512_tokens_per_chunk_at_128k():
    k2 = presets.load("kimi-k2-instruct-0905")
    hw = describe(gpu="RTX 4090", ram="768GB", memory="DDR5-4800x8", cores=32)
    r = make_plan(k2, "k2", hw, PlanRequest(context_length=131072, expert_format="int4"))
    assert r.plan.settings.prefill_chunk >= 512
    assert r.budget.total("cuda:0") <= 24 * memory.GIB
    # The workspace it was sized by: one block's scores, not the whole context's.
    chunk = r.plan.settings.prefill_chunk
    assert memory.workspace_bytes(k2, 131072, chunk) < 0.08 * 24 * memory.GIB < memory.workspace_bytes(k2, 131072, 2 * chunk)
