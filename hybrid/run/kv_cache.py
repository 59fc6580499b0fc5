"""The compressed MLA cache: per layer and token only the normalised latent (R) and the roped key (P).

Decode attends in the weight-absorbed form (kv_b_proj folded into the query and the output), so the expanded
per-head keys and values are never stored: K2 costs (512 + 64) x 61 layers x 2 bytes = 68.6 KiB per token in
bf16, against ~2.4 MiB for expanded keys and values.

The cache has `batch` slots, each a sequence with its own length, so requests that started at different
times decode together (continuous batching): a forward names the slots its rows belong to.
"""

import torch

from hybrid.read.config import ModelConfig
from hybrid.errors import GenerationError


class MLACache:
    """latent [L, slots, S, R] and k_pe [L, slots, S, P] on one device; lengths[slot] positions are valid."""

    def __init__(self, cfg: ModelConfig, max_len: int, batch: int = 1, device="cpu", dtype=torch.float32):
        L = cfg.num_hidden_layers
        self.max_len = max_len
        self.latent = torch.zeros(L, batch, max_len, cfg.kv_lora_rank, device=device, dtype=dtype)
        self.k_pe = torch.zeros(L, batch, max_len, cfg.qk_rope_head_dim, device=device, dtype=dtype)
        self.lengths = [0] * batch
        self._rows = None

    @property
    def length(self) -> int:
        """The longest slot's length (all slots' when they move together, as in single-sequence generation)."""
        return max(self.lengths)

    @property
    def nbytes(self) -> int:
        return self.latent.nbytes + self.k_pe.nbytes

    def starts(self, slots, n_new: int) -> list[int]:
        """Positions where n_new tokens of each slot go; raises on overflow."""
        for s in slots:
            if self.lengths[s] + n_new > self.max_len:
                raise GenerationError(f"context overflow: {self.lengths[s]} cached + {n_new} new tokens exceed the "
                                      f"cache's {self.max_len} positions")
        return [self.lengths[s] for s in slots]

    def begin(self, slots, n_new: int) -> list[int]:
        """Set the rows of the coming forward: slots [B] each receiving n_new tokens; returns their starts."""
        self._rows = (list(slots), self.starts(slots, n_new), n_new)
        return self._rows[1]

    def update(self, layer: int, latent: torch.Tensor, k_pe: torch.Tensor):
        """Write latent [B, T, R] and k_pe [B, T, P] at each slot's next positions; return latent [B, S, R] and
        k_pe [B, S, P] for S = the longest row's end (shorter rows are masked by the caller)."""
        slots, starts, T = self._rows
        for b, (slot, start) in enumerate(zip(slots, starts)):
            self.latent[layer, slot, start:start + T] = latent[b]
            self.k_pe[layer, slot, start:start + T] = k_pe[b]
        end = max(starts) + T
        if slots == list(range(len(slots))):  # slots 0..B-1 in order: a view, no copy
            return self.latent[layer, :len(slots), :end], self.k_pe[layer, :len(slots), :end]
        return self.latent[layer, slots, :end], self.k_pe[layer, slots, :end]

    def advance(self):
        slots, _, T = self._rows
        for s in slots:
            self.lengths[s] += T
        self._rows = None

    def truncate(self, slot: int, length: int):
        """Keep the slot's first `length` positions (exact: a position depends only on the ones before it);
        later ones are overwritten by the next forward."""
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"truncate: length {length} is outside 0..{self.lengths[slot]} (slot {slot})")
        self.lengths[slot] = length

    def reset(self, slot: int | None = None):
        if slot is None:
            self.lengths = [0] * len(self.lengths)
        else:
            self.lengths[slot] = 0
