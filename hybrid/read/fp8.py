"""Block-FP8 weights: float8_e4m3fn values with one float32 `weight_scale_inv` per 128x128 block.

The reference (DeepSeek-V3's `weight_dequant`) multiplies each fp8 value, widened to float32, by its block's
scale and then casts to the target dtype; a ragged last block (576 rows of kv_a_proj_with_mqa = 4.5 blocks)
uses the same scale for its partial rows. `dequantize` does exactly that, so an FP8 checkpoint loaded here
equals the bf16 twin the reference conversion writes.
"""

import torch

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn value


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """ceil(out/block_rows) x ceil(in/block_cols)."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block=(128, 128), dtype=torch.bfloat16) -> torch.Tensor:
    """[out, in] float8_e4m3fn and [ceil(out/b0), ceil(in/b1)] float32 -> [out, in] `dtype`, on weight's device."""
    rows, cols = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
    return (weight.float() * s).to(dtype)


def quantize(weight: torch.Tensor, block=(128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (float8_e4m3fn weight, float32 scale_inv), one scale per block from its max |w|.

    Used to write FP8 test checkpoints the way DeepSeek's training stack stores them: w ~= q * scale_inv.
    """
    rows, cols = weight.shape
    sr, sc = scale_shape((rows, cols), block)
    padded = torch.zeros(sr * block[0], sc * block[1], dtype=torch.float32)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(sr, block[0], sc, block[1])
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / FP8_E4M3_MAX
    q = (blocks / scale_inv[:, None, :, None]).view(sr * block[0], sc * block[1])[:rows, :cols]
    return q.to(torch.float8_e4m3fn).contiguous(), scale_inv.contiguous()
