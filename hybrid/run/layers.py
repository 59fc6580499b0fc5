"""The model's building blocks as plain torch math, with the checkpoint's attribute names.

Legend: B batch, T new tokens, S cached + new positions, H hidden, Hh heads, N nope dims, P rope dims,
V value dims, R kv_lora_rank, E routed experts, K top-k, G expert groups.
"""

import torch
import torch.nn.functional as F
from torch import nn

from hybrid.read import fp8
from hybrid.read.config import ModelConfig
from hybrid.run.attention_core import attend
from hybrid.run.rope import apply_rope
from hybrid.run.timing import NULL_RECORDER


class Fp8Linear(nn.Module):
    """A projection kept in the checkpoint's block-FP8 (half the bytes of bf16), dequantized at each use.
    Same parameter names as the checkpoint: `weight` (float8_e4m3fn) and `weight_scale_inv` (float32)."""

    def __init__(self, weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale_inv, requires_grad=False)
        self.block = block

    def dense_weight(self, dtype) -> torch.Tensor:
        return fp8.dequantize(self.weight, self.weight_scale_inv, self.block, dtype)

    def forward(self, x):
        return F.linear(x, self.dense_weight(x.dtype))


def dense_weight(linear: nn.Module, dtype) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear, Fp8Linear or BlockLinear (hybrid.run.blocks) in `dtype`."""
    if hasattr(linear, "dense_weight"):
        return linear.dense_weight(dtype)
    return linear.weight.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layers' MLP, the shared expert and each routed expert."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, width, bias=False)
        self.up_proj = nn.Linear(hidden, width, bias=False)
        self.down_proj = nn.Linear(width, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores in fp32 (sigmoid or softmax); the correction bias steers the choice only, never the weights."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        if cfg.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(E))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        """x [T, H] -> (weights [T, K] float32, ids [T, K] int64)."""
        cfg = self.cfg
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if cfg.n_group > 1 and cfg.topk_method != "greedy":
            choice = self._keep_top_groups(choice)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * cfg.routed_scaling_factor, ids

    def _keep_top_groups(self, choice):
        """Mask all but the topk_group best groups: a group scores by its top-2 sum (noaux_tc) or its max."""
        cfg = self.cfg
        grouped = choice.view(choice.shape[0], cfg.n_group, -1)
        if cfg.topk_method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_score = grouped.amax(dim=-1)
        keep = group_score.topk(cfg.topk_group, dim=-1).indices
        mask = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, keep, False)
        return grouped.masked_fill(mask[..., None], float("-inf")).view_as(choice)


class Deferred:
    """Routed-expert work one MoE layer hands to the next (expert deferral): its result joins the residual
    stream one layer late, so the CPU keeps computing while the GPU runs the next layer's attention."""

    def __init__(self):
        self._experts = None

    def put(self, experts):
        self._experts = experts

    def take(self):
        experts, self._experts = self._experts, None
        return None if experts is None else experts.wait()


class MoE(nn.Module):
    """Router, routed experts (any object with submit/wait) and the shared expert, summed.

    With `n_defer` > 0 (a plan option, off by default) each token's n_defer lowest-weight experts are computed
    after this layer returns and added at the next MoE layer's output (`carry`, shared by the model)."""

    rec = NULL_RECORDER

    def __init__(self, cfg: ModelConfig, experts, layer: int | None = None):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = experts
        width = cfg.moe_intermediate_size * cfg.n_shared_experts
        self.shared_experts = MLP(cfg.hidden_size, width) if cfg.n_shared_experts else None
        self.n_defer, self.carry, self.layer = 0, None, layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rec, layer = self.rec, self.layer
        flat = x.reshape(-1, x.shape[-1])
        with rec.section("router", layer):
            weights, ids = self.gate(flat)
            now = ids.shape[1] - self.n_defer
            if self.n_defer:  # strongest experts first: the weakest are the ones deferred
                order = weights.argsort(dim=-1, descending=True)
                ids, weights = ids.gather(1, order), weights.gather(1, order)
        with rec.section("routed_submit", layer):
            self.experts.submit(flat, ids[:, :now], weights[:, :now])
        # The shared expert runs while the routed experts compute (on the CPU, when they live there).
        with rec.section("shared_expert", layer):
            shared = self.shared_experts(flat) if self.shared_experts is not None else 0
        with rec.section("routed_wait", layer):
            out = self.experts.wait().to(flat.dtype) + shared
            if self.carry is not None:
                late = self.carry.take()
                out = out if late is None else out + late.to(flat.dtype)
                if self.n_defer:
                    self.experts.submit(flat, ids[:, now:], weights[:, now:])
                    self.carry.put(self.experts)
        return out.view_as(x)


class Attention(nn.Module):
    """Multi-head latent attention in the weight-absorbed form, over the compressed cache."""

    key_block = None  # keys per attention block; None: placement.memory.key_block (tests set a small one)

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        H, Hh, R, P = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(H, Hh * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, Hh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, R + P, bias=False)
        self.kv_a_layernorm = RMSNorm(R, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(R, Hh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(Hh * cfg.v_head_dim, H, bias=False)

    def forward(self, x, cos, sin, positions, cache=None):
        """x [B, T, H]; cos/sin [B, T, P/2]; positions [B, T] int64 (a token sees keys up to its own position)
        -> [B, T, H]."""
        cfg = self.cfg
        B, T, _ = x.shape
        Hh, N, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, Hh, cfg.qk_head_dim).split([N, cfg.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None])
        kv = self.kv_a_proj_with_mqa(x)
        latent = self.kv_a_layernorm(kv[..., :R])
        k_pe = apply_rope(kv[..., R:], cos, sin)
        if cache is not None:
            latent, k_pe = cache.update(self.layer, latent, k_pe)

        absorb_query, absorb_output = self._absorbed(x.dtype)
        q_lat = absorb_query(q_nope)  # absorb the key half of kv_b into q
        o_lat = attend(q_lat, q_pe, latent, k_pe, positions, cfg.softmax_scale, self.key_block)
        out = absorb_output(o_lat)  # and the value half into the output
        return self.o_proj(out.reshape(B, T, Hh * cfg.v_head_dim))

    def _absorbed(self, dtype):
        """kv_b_proj's two per-head products: q_nope [B, T, Hh, N] -> [B, T, Hh, R] and o_lat [B, T, Hh, R] ->
        [B, T, Hh, V]. The CPU kernels' per-head matrices when the plan keeps kv_b there (blocks.AbsorbedKvB),
        else einsums over the whole weight."""
        kv_b, cfg = self.kv_b_proj, self.cfg
        if hasattr(kv_b, "absorb_query"):
            return kv_b.absorb_query, kv_b.absorb_output
        N, R = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        w = dense_weight(kv_b, dtype).view(cfg.num_attention_heads, N + cfg.v_head_dim, R)
        return (lambda q_nope: torch.einsum("bthn,hnr->bthr", q_nope, w[:, :N]),
                lambda o_lat: torch.einsum("bthr,hvr->bthv", o_lat, w[:, N:]))
