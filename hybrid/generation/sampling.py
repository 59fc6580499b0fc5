"""Choosing the next token from logits: greedy at temperature 0, else temperature, top-k, top-p, min-p.

Whatever the parameters, the distribution sampled from is valid: the filtering runs in float64 on logits
shifted so their maximum is 0 (a temperature of 1e-300 sends every other token to -inf, never to NaN), and
every filter keeps the most likely token, so the kept mass is never zero."""

import math
from dataclasses import dataclass

import torch

from hybrid.errors import ConfigError, GenerationError

# What torch.Generator.manual_seed accepts: any 64-bit pattern, written signed or unsigned.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_new_tokens: int = 64

    def __post_init__(self):
        number = (int, float)
        checks = [
            (_real(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
             "temperature", "must be a finite number >= 0"),
            (_whole(self.top_k) and self.top_k >= 0, "top_k", "must be an integer >= 0"),
            (isinstance(self.top_p, number) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (isinstance(self.min_p, number) and 0 <= self.min_p < 1, "min_p", "must be in [0, 1)"),
            (self.seed is None or (_whole(self.seed) and SEED_MIN <= self.seed <= SEED_MAX), "seed",
             f"must be an integer in [{SEED_MIN}, {SEED_MAX}]"),
            (_whole(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens", "must be an integer >= 0"),
        ]
        for ok, key, what in checks:
            if not ok:
                raise ConfigError(f"sampling parameter {key} {what}, got {getattr(self, key)!r}")

    def generator(self) -> torch.Generator | None:
        return None if self.seed is None else torch.Generator().manual_seed(self.seed)


def _real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _whole(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> int:
    """logits [vocab] -> one token id. Filtering happens on CPU so a seed gives the same tokens on every
    device. Raises GenerationError when the logits hold NaN or +inf (the model's numbers, not the request's)."""
    logits = logits.detach().to("cpu", torch.float64)
    if torch.isnan(logits).any() or torch.isposinf(logits).any() or torch.isneginf(logits).all():
        raise GenerationError("the model produced invalid logits (NaN or infinite); cannot sample")
    if params.temperature == 0:
        return int(logits.argmax())
    probs = ((logits - logits.max()) / params.temperature).softmax(dim=-1)  # the best token's share is > 0
    if params.top_k:
        kth = probs.topk(min(params.top_k, probs.numel())).values[-1]
        probs = torch.where(probs >= kth, probs, 0.0)
    if params.min_p:
        probs = torch.where(probs >= params.min_p * probs.max(), probs, 0.0)
    if params.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        before = sorted_p.cumsum(0) - sorted_p  # mass strictly above each token: keep while < top_p
        keep = before < params.top_p * sorted_p.sum()
        keep[0] = True  # a top_p so small that top_p * mass underflows still keeps the best token
        probs = torch.zeros_like(probs).scatter_(0, order, torch.where(keep, sorted_p, 0.0))
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))
