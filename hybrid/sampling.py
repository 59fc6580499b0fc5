"""Choosing the next token from logits: greedy at temperature 0, else temperature, top-k, top-p, min-p."""

from dataclasses import dataclass

import torch

from hybrid.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 64

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (self.top_k >= 0, "top_k", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (0 <= self.min_p < 1, "min_p", "must be in [0, 1)"),
            (self.max_new_tokens >= 0, "max_new_tokens", "must be >= 0"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"sampling parameter {key} {what}, got {getattr(self, key)!r}")

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits [vocab] float32 -> one token id. Filtering happens on CPU so a seed gives the same tokens
    on every device."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = (logits.float().cpu() / params.temperature).softmax(dim=-1)
    if params.top_k:
        kth = probs.topk(min(params.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.min_p:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass strictly above each token: keep while < top_p
        sorted_p = torch.where(before < params.top_p * sorted_p.sum(), sorted_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
