"""MLA's attention core over the compressed cache: scores, causal mask, softmax and the weighted latent sum.

In the weight-absorbed form a query is q_lat (its nope half folded through kv_b's key half into the latent
space, R wide) plus q_pe (P wide), and every key and value is the cached latent [S, R] with its roped key
[S, P]. Scores over the whole cache are [B, T, Hh, S] in fp32: at 128K context and a 512-token chunk that is
16 GiB for K2, so past one key block the keys are taken a block at a time with an online softmax (the
flash-attention recurrence, in plain torch so CPU torch and CUDA run the same code): a running max, sum and
fp32 output per query and head; the mask of a block is made from the query positions, never [B, T, S].

Legend: B rows, T new tokens per row, Hh heads, S cached positions (new ones included), R kv_lora_rank,
P rope dims.
"""

import torch

from hybrid.run.expert_gemm import gemm_dtype
from placement.memory import key_block

# From this many queries per row the products are GEMMs, and on a CPU without native bf16 (AVX2, plain AVX-512)
# torch's bf16 GEMMs convert every element and run at under half its fp32 rate (8.5 against 20 GFLOP/s on 2 Zen 3
# cores, docs/performance.md): a prefill chunk's attention is computed in fp32 there. Decode (one query, bound by
# reading the cache) stays in the activations' dtype.
UPCAST_QUERIES = 16


def attend(q_lat, q_pe, latent, k_pe, positions, scale: float, block: int | None = None) -> torch.Tensor:
    """q_lat [B, T, Hh, R], q_pe [B, T, Hh, P]; latent [B, S, R], k_pe [B, S, P]; positions [B, T] int64: the
    query at positions[b, t] sees keys 0..positions[b, t] of its row (rows may start anywhere: continuous
    batching). -> o_lat [B, T, Hh, R] in q_lat's dtype. `block`: keys per block (default key_block(T))."""
    if (q_lat.dtype == torch.bfloat16 and q_lat.device.type == "cpu" and positions.shape[1] >= UPCAST_QUERIES
            and gemm_dtype() == torch.float32):
        return attend(q_lat.float(), q_pe.float(), latent.float(), k_pe.float(), positions, scale,
                      block).to(torch.bfloat16)
    S = latent.shape[1]
    block = block or key_block(positions.shape[1])
    if S <= block:  # one block: the plain softmax, exactly as before blocks existed
        scores = _scores(q_lat, q_pe, latent, k_pe, positions, 0, scale, masked=True)
        return torch.einsum("bths,bsr->bthr", scores.softmax(dim=-1).to(q_lat.dtype), latent)
    return _attend_blocks(q_lat, q_pe, latent, k_pe, positions, scale, block)


def _attend_blocks(q_lat, q_pe, latent, k_pe, positions, scale, block):
    """The online softmax over key blocks. Block 0 holds key 0, which every query sees, so the running max is
    finite from the first block on and a block a row cannot see (all -inf) just adds nothing to it."""
    dtype = q_lat.dtype
    # One host sync per call, worth it past one block: blocks beyond the last query's position are skipped and
    # blocks before the first query's position need no mask.
    first, last = (int(v) for v in positions.aminmax())
    end = min(latent.shape[1], last + 1)
    run_max = torch.full(q_lat.shape[:3], float("-inf"), dtype=torch.float32, device=q_lat.device)
    run_sum = torch.zeros(q_lat.shape[:3], dtype=torch.float32, device=q_lat.device)
    out = torch.zeros(q_lat.shape, dtype=torch.float32, device=q_lat.device)
    for k0 in range(0, end, block):
        k1 = min(k0 + block, end)
        lat = latent[:, k0:k1]
        p = _scores(q_lat, q_pe, lat, k_pe[:, k0:k1], positions, k0, scale, masked=k1 - 1 > first)
        new_max = torch.maximum(run_max, p.amax(dim=-1))
        p.sub_(new_max[..., None]).exp_()  # in place: the block's scores are the largest buffer
        rescale = torch.exp(run_max - new_max)  # exp(-inf) = 0 on the first block
        run_sum.mul_(rescale).add_(p.sum(dim=-1))
        out.mul_(rescale[..., None]).add_(torch.einsum("bths,bsr->bthr", p.to(dtype), lat))
        run_max = new_max
    return out.div_(run_sum[..., None]).to(dtype)


def _scores(q_lat, q_pe, latent, k_pe, positions, k0: int, scale: float, masked: bool) -> torch.Tensor:
    """fp32 scores [B, T, Hh, n] of keys k0..k0+n, key k hidden (-inf) from queries before it. The products run
    in the activations' dtype and are summed before the fp32 cast, as the model always computed them."""
    scores = torch.einsum("bthr,bsr->bths", q_lat, latent)
    scores = scores.add_(torch.einsum("bthp,bsp->bths", q_pe, k_pe)).float().mul_(scale)
    if masked:
        keys = torch.arange(k0, k0 + latent.shape[1], device=positions.device)
        hidden = keys[None, None, :] > positions[:, :, None]  # [B, T, n]: one block's mask, shared by the heads
        scores.masked_fill_(hidden[:, :, None, :], float("-inf"))
    return scores
