"""INT4 experts as compressed-tensors' `pack-quantized` format writes them (Kimi-K2-Thinking's routed experts).

Dimension legend: n_out, n_in one projection's [out, in]; G group size (32 in K2-Thinking); ng = n_in / G groups;
R = TILE_ROWS rows per store tile, nt = ceil(n_out / R) tiles.

Layout on disk, per projection `P` (`...experts.E.gate_proj`, ...), as compressed-tensors' PackedQuantizationCompressor
writes it (compressors/pack_quantized/helpers.py `pack_to_int32`):

    P.weight_packed  int32 [n_out, n_in / 8]   8 codes a word; column c sits at bits 4 * (c % 8) of word c // 8
                                              (lowest nibble = lowest column); code = q + 8, q in [-8, 7]
    P.weight_scale   bf16  [n_out, n_in / G]  one scale per (row, group of G columns)
    P.weight_shape   int32 or int64 [2]       [n_out, n_in]
    W[r, c] = q[r, c] * weight_scale[r, c // G]

Little-endian, a word's byte j holds columns 8w + 2j (low nibble) and 8w + 2j + 1 (high nibble): the packed rows
read as bytes are exactly the cpu_kernels int4 format's byte pairs (cpu_kernels/formats/int4.py: low nibble = even
column, code = q + 8), so `to_store` only moves whole bytes into the store's row tiles and widens the bf16 scales
to float32; both steps are exact, and the kernels multiply by the very values the checkpoint holds. The package
itself dequantizes in the scale's dtype (q.to(bf16) * scale in bf16, which rounds); `dequantize` computes q * scale
in float32, exact, so its bf16 cast equals the package's output bit for bit.
"""

import sys

import numpy as np
import torch

from cpu_kernels.floats import bf16_to_f32
from cpu_kernels.formats.tiled import TILE_ROWS, n_tiles
from hybrid.read.names import INT4_SUFFIXES

CODES_PER_WORD = 8
CODE_OFFSET = 8  # code = q + 8
Q_MIN, Q_MAX = -8, 7
# compressed-tensors' symmetric scale: max|w| / (bit range / 2) = max|w| / 7.5 (quantization/utils/helpers.py)
HALF_RANGE = 7.5
# A padded store row: both codes 8 (zero) and scale 0, as cpu_kernels' quantizer writes rows past n_out.
PAD_BYTE = 0x88

if sys.byteorder != "little":  # the byte view of the packed words assumes it (every x86 and ARM host)
    raise ImportError("hybrid.read.int4 reads pack-quantized words as little-endian bytes")


def tensor_names(weight_name: str) -> tuple[str, str, str]:
    """`...proj.weight` -> its (weight_packed, weight_scale, weight_shape) names."""
    return tuple(weight_name + s for s in INT4_SUFFIXES)


def stored_shapes(shape: tuple[int, int], group: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int]]:
    """Shapes of (weight_packed, weight_scale, weight_shape) for a [n_out, n_in] projection in groups of `group`."""
    n_out, n_in = shape
    return (n_out, n_in // CODES_PER_WORD), (n_out, n_in // group), (2,)


def to_store(packed: np.ndarray, scales: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    """One projection's weight_packed (int32 [n_out, n_in / 8]) and weight_scale (bf16 bits as uint16, or float32,
    [n_out, n_in / G]) -> the cpu_kernels int4-gG store arrays (values uint8 [nt, ng, G / 2, R], scales float32
    [nt, ng, R]). Integer byte moves and an exact widening: no value passes through a rounding step."""
    n_out, n_words = packed.shape
    n_in = n_words * CODES_PER_WORD
    if packed.dtype != np.int32 or n_in % group or scales.shape != (n_out, n_in // group):
        raise ValueError(f"weight_packed {packed.dtype}{list(packed.shape)} and weight_scale {list(scales.shape)} "
                         f"are not one int4 matrix in groups of {group}")
    nt, ng, rows = n_tiles(n_out), n_in // group, n_tiles(n_out) * TILE_ROWS
    codes = np.ascontiguousarray(packed).view(np.uint8)  # [n_out, n_in / 2]: byte k holds columns 2k, 2k + 1
    values = np.empty((nt, ng, group // 2, TILE_ROWS), np.uint8)
    full = n_out // TILE_ROWS
    # [rows, ng, G/2] -> [nt, ng, G/2, R]: a tile's rows become the innermost axis.
    values[:full] = codes[: full * TILE_ROWS].reshape(full, TILE_ROWS, ng, group // 2).transpose(0, 2, 3, 1)
    if full < nt:
        last = np.full((TILE_ROWS, n_in // 2), PAD_BYTE, np.uint8)
        last[: n_out - full * TILE_ROWS] = codes[full * TILE_ROWS:]
        values[full] = last.reshape(TILE_ROWS, ng, group // 2).transpose(1, 2, 0)
    wide = bf16_to_f32(scales) if scales.dtype == np.uint16 else np.asarray(scales, np.float32)
    padded = np.zeros((rows, ng), np.float32)
    padded[:n_out] = wide
    return values, np.ascontiguousarray(padded.reshape(nt, TILE_ROWS, ng).transpose(0, 2, 1))


def dequantize(packed: torch.Tensor, scale: torch.Tensor, group: int, dtype=torch.float32) -> torch.Tensor:
    """weight_packed int32 [n_out, n_in / 8] and weight_scale [n_out, n_in / G] -> [n_out, n_in] `dtype`, on the
    tensors' device: q * scale in float32 (exact), then cast."""
    n_out, n_words = packed.shape
    n_in = n_words * CODES_PER_WORD
    b = packed.contiguous().view(torch.uint8)  # [n_out, n_in / 2]
    q = torch.stack((b & 15, b >> 4), dim=-1).view(n_out, n_in // group, group).float() - CODE_OFFSET
    return (q * scale.float()[:, :, None]).view(n_out, n_in).to(dtype)


def quantize(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n_out, n_in] float -> (weight_packed int32, weight_scale bf16, weight_shape int64) as compressed-tensors'
    minmax observer and pack-quantized compressor write them: scale = bf16(max|w| / 7.5) per group,
    q = round(clamp(w / scale, -8, 7)). Writes test checkpoints; the tests hold it to the package itself."""
    n_out, n_in = w.shape
    grouped = w.float().view(n_out, n_in // group, group)
    scale = (grouped.abs().amax(-1) / HALF_RANGE).to(torch.bfloat16)
    q = torch.round(torch.clamp(grouped / scale.float()[:, :, None], Q_MIN, Q_MAX))
    codes = (q + CODE_OFFSET).to(torch.uint8).view(n_out, n_in // 2, 2)
    packed = (codes[:, :, 0] | (codes[:, :, 1] << 4)).contiguous().view(torch.int32)
    return packed, scale.contiguous(), torch.tensor([n_out, n_in], dtype=torch.int64)
