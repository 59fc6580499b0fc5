"""Float encodings the experts arrive in: bf16 as uint16 bits, and block-FP8 (float8_e4m3fn bytes + block scales).

numpy only: the package never imports torch, so bf16 travels as its bit pattern (uint16) and FP8 as its bytes.
Block-FP8 checkpoints keep one float32 `scale_inv` per 128 x 128 block, the last block of each dimension ragged;
they are dequantized block by block through a 256-entry table.
"""

import numpy as np

FP8_BLOCK = 128
_BF16_NAN = np.uint16(0x7FC0)


def f32_to_bf16(w: np.ndarray) -> np.ndarray:
    """float32 array -> bf16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    bits = w.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    return np.where(np.isnan(w), _BF16_NAN, rounded)


def bf16_to_f32(u: np.ndarray) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32, exact."""
    return (np.ascontiguousarray(u, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def as_float32(w: np.ndarray) -> np.ndarray:
    """Weights given as float32 or as bf16 bits (uint16) -> float32 (exact); ValueError naming any other dtype."""
    if w.dtype == np.uint16:
        return bf16_to_f32(w)
    if w.dtype != np.float32:
        raise ValueError(f"weights must be float32 or bf16 as uint16, got {w.dtype}")
    return w


def fp8_e4m3_table() -> np.ndarray:
    """float32[256]: the float8_e4m3fn value of each byte (bias 7, subnormals, no inf, 0x7f/0xff NaN)."""
    b = np.arange(256, dtype=np.int64)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp = (b >> 3) & 0xF
    mant = (b & 0x7).astype(np.float64)
    normal = (1.0 + mant / 8.0) * np.exp2(exp - 7.0)
    subnormal = (mant / 8.0) * 2.0**-6
    value = sign * np.where(exp == 0, subnormal, normal)
    value[(exp == 0xF) & ((b & 0x7) == 0x7)] = np.nan
    return value.astype(np.float32)


def dequantize_fp8(w_fp8: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """Block-FP8 [n_out, n_in] (uint8 bytes) with scale_inv [ceil(n_out/128), ceil(n_in/128)] -> float32."""
    if w_fp8.dtype != np.uint8 or w_fp8.ndim != 2:
        raise ValueError(f"w_fp8 must be a 2-D uint8 array of float8_e4m3fn bytes, got {w_fp8.dtype} {w_fp8.shape}")
    n_out, n_in = w_fp8.shape
    want = (-(-n_out // FP8_BLOCK), -(-n_in // FP8_BLOCK))
    if scale_inv.shape != want:
        raise ValueError(f"scale_inv shape {scale_inv.shape} does not match {want} blocks of w_fp8 {w_fp8.shape}")
    out = fp8_e4m3_table()[w_fp8]
    # Broadcast each block's scale over its (possibly ragged) 128 x 128 block without materialising a full copy.
    scale = np.asarray(scale_inv, dtype=np.float32)
    for bi in range(want[0]):
        rows = slice(bi * FP8_BLOCK, (bi + 1) * FP8_BLOCK)
        out[rows] *= np.repeat(scale[bi], FP8_BLOCK)[:n_in]
    return out
