"""Rotary position embedding on the P rope dims, with DeepSeek's YaRN extension and interleaved pair layout.

YaRN (as DeepSeek-V3 configures it): frequencies below the correction range keep their original value, those
above are divided by `factor`, with a linear ramp between; the range comes from beta_fast/beta_slow rotations
over original_max_position_embeddings, rounded outward (floor/ceil). cos/sin are multiplied by
mscale(factor, mscale) / mscale(factor, mscale_all_dim), which is 1 for K2; the other half of YaRN's
correction, mscale_all_dim squared on the softmax scale, lives in ModelConfig.softmax_scale.

DeepSeek stores the rope dims as interleaved pairs (x0, x1), (x2, x3), ..., each pair rotated by one frequency.
"""

import math

import torch

from hybrid.read.config import ModelConfig, yarn_mscale


def inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """[P/2] float32 rotation frequencies."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    # Explicit CPU: the model is built under a meta-device context, and these are real numbers.
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    y = cfg.rope_scaling
    if y is None:
        return freq
    low, high = _correction_range(y.beta_fast, y.beta_slow, dim, base, y.original_max_position_embeddings)
    if low == high:
        high += 0.001  # a ramp of zero width would divide by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the frequency is kept (high-frequency dims), 0 where it is interpolated
    return freq / y.factor * (1 - keep) + freq * keep


def _correction_range(beta_fast, beta_slow, dim, base, original_max):
    def dim_for(rotations):
        return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(base))

    return max(math.floor(dim_for(beta_fast)), 0), min(math.ceil(dim_for(beta_slow)), dim - 1)


def attention_factor(cfg: ModelConfig) -> float:
    y = cfg.rope_scaling
    if y is None:
        return 1.0
    return yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)


class Rope:
    """cos/sin tables for positions, computed on demand on the caller's device (not a module: no weights)."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq = inv_freq(cfg)
        self.factor = attention_factor(cfg)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions [T] int -> cos, sin [T, P/2] in `dtype` on positions' device."""
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return (angles.cos() * self.factor).to(dtype), (angles.sin() * self.factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., P] interleaved pairs; cos/sin [..., P/2] already shaped to broadcast against x's pairs
    (e.g. [T, 1, P/2] for x [B, T, heads, P])."""
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
