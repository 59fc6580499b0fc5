"""The compressed MLA cache: per layer and token only the normalised latent (R) and the roped key (P).

Decode attends in the weight-absorbed form (kv_b_proj folded into the query and the output), so the expanded
per-head keys and values are never stored: K2 costs (512 + 64) x 61 layers x 2 bytes = 68.6 KiB per token in
bf16, against ~2.4 MiB for expanded keys and values.
"""

import torch

from hybrid.config import ModelConfig
from hybrid.errors import GenerationError


class MLACache:
    """latent [L, B, S, R] and k_pe [L, B, S, P] on one device; `length` tokens of each sequence are valid."""

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, device="cpu", dtype=torch.float32):
        L = cfg.num_hidden_layers
        self.max_len = max_len
        self.latent = torch.zeros(L, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(L, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_pe.nbytes

    def check_room(self, n_new: int):
        if self.length + n_new > self.max_len:
            raise GenerationError(f"context overflow: {self.length} cached + {n_new} new tokens exceed the "
                                  f"cache's {self.max_len} positions")

    def update(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor):
        """Write latent [B, T, R] and k_pe [B, T, P] at positions length..length+T; return views of all
        length+T positions. `length` itself moves only in `advance`, once every layer has written."""
        start, end = self.length, self.length + latent.shape[1]
        self.latent[layer, :, start:end] = latent
        self.k_pe[layer, :, start:end] = k_pe
        return self.latent[layer, :, :end], self.k_pe[layer, :, :end]

    def advance(self, n: int):
        self.length += n

    def reset(self):
        self.length = 0
