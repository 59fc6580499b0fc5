"""DeepseekV3ForCausalLM: one model for Kimi-K2, DeepSeek-V3/R1 and Moonlight; their differences are config.

Module and parameter names equal the checkpoint's tensor names, so the loader copies tensors by name.
Build it on the meta device and let `hybrid.run.loader` materialise each tensor where it belongs.
"""

import torch
from torch import nn

from hybrid.read.config import ModelConfig
from hybrid.run.blocks import BlockEmbedding, BlockLinear
from hybrid.run.experts import TorchExperts
from hybrid.run.layers import MLP, Attention, Deferred, MoE, RMSNorm
from hybrid.run.rope import Rope
from hybrid.run.timing import NULL_RECORDER


class DecoderLayer(nn.Module):
    rec = NULL_RECORDER

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.self_attn = Attention(cfg, layer)
        if cfg.is_moe_layer(layer):
            experts = TorchExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
            self.mlp = MoE(cfg, experts, layer)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, positions, cache):
        with self.rec.section("attention", self.layer):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(self.post_attention_layernorm(x))  # MoE marks its own parts
        with self.rec.section("dense_mlp", self.layer):
            return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3ForCausalLM(nn.Module):
    rec = NULL_RECORDER

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV3Model(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = Rope(cfg)
        self.deferred = None

    @property
    def embedding_device(self) -> torch.device:
        """Where token ids go in: the embedding table's device (a plan may keep it on the CPU)."""
        embed = self.model.embed_tokens
        return embed.device if isinstance(embed, BlockEmbedding) else embed.weight.device

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of the hidden states: the embedding's (and so the cache's)."""
        embed = self.model.embed_tokens
        return embed.dtype if isinstance(embed, BlockEmbedding) else embed.weight.dtype

    def set_recorder(self, rec):
        """Hand one timing recorder (hybrid.run.timing) to every module that marks sections; NULL_RECORDER: off."""
        for module in self.modules():
            if hasattr(type(module), "rec"):
                module.rec = rec
        for layer in self.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is not None and hasattr(type(experts), "rec"):
                experts.rec = rec

    def set_deferral(self, n_defer: int):
        """Defer each token's n_defer weakest routed experts by one layer (0: off, the exact model)."""
        if not 0 <= n_defer < self.config.num_experts_per_tok:
            raise ValueError(f"n_defer must be in [0, {self.config.num_experts_per_tok}), got {n_defer}")
        self.deferred = Deferred() if n_defer else None
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.n_defer, layer.mlp.carry = n_defer, self.deferred

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, cache=None, last_only: bool = False, slots=None) -> torch.Tensor:
        """ids [B, T] int64 -> logits float32 [B, T, vocab] ([B, 1, vocab] with last_only).

        With a cache, row b continues the sequence in cache slot slots[b] (default: slot b) and is appended to
        it; without one, each row is a whole sequence starting at position 0.
        """
        B, T = ids.shape
        embed, main = self.embedding_device, self.model.norm.weight.device
        if cache is not None:
            slots = list(range(B)) if slots is None else list(slots)
            starts = torch.tensor(cache.begin(slots, T), device=main)
        else:
            starts = torch.zeros(B, dtype=torch.long, device=main)
        with self.rec.section("embedding"):
            # A plan may keep the embedding table on the CPU: one row per token is all that crosses.
            x = self.model.embed_tokens(ids.to(embed)).to(main)
        positions = starts[:, None] + torch.arange(T, device=main)[None, :]  # [B, T]
        cos, sin = self.rope.cos_sin(positions.flatten(), x.dtype)
        cos, sin = cos.view(B, T, -1), sin.view(B, T, -1)
        for layer in self.model.layers:  # causal from positions: no [B, T, S] mask is built
            x = layer(x, cos, sin, positions, cache)
        late = self.deferred.take() if self.deferred is not None else None
        if late is not None:  # the last MoE layer's deferred experts
            x = x + late.view_as(x).to(x.dtype)
        if cache is not None:
            cache.advance()
        if last_only:
            x = x[:, -1:]
        with self.rec.section("lm_head"):
            x = self.model.norm(x)
            if isinstance(self.lm_head, BlockLinear):  # a head on the CPU kernels (plan kernel cpu_linear)
                return self.lm_head(x).float()
            head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
            return torch.nn.functional.linear(x, head.to(x.device)).float()
