"""Quantizers into the store's tiled formats, and the inverse (dequantizers) the tests and benchmark use.

Dimension legend: n_out / n_in the output / input size of one matrix, G group size, R = TILE_ROWS,
nt = ceil(n_out / R) tiles, ng = n_in / G groups. numpy only; bf16 travels as uint16.

Symmetric quantization, one float32 scale per (row, group of G input channels):
- int8: scale = max|w| / 127, q = round(w / scale) in [-127, 127].
- int4: scale = max|w| / 7, q = round(w / scale) in [-7, 7], stored as the nibble q + 8 (1..15; 8 is zero).
Block-FP8 checkpoints (float8_e4m3fn bytes plus one float32 `scale_inv` per 128 x 128 block, the last block of
each dimension ragged) are dequantized block by block through a 256-entry table and then requantized.
"""

import numpy as np

from .formats import TILE_ROWS, Format, check_matrix, n_tiles

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


def _as_f32(w: np.ndarray) -> np.ndarray:
    if w.dtype == np.uint16:
        return bf16_to_f32(w)
    if w.dtype != np.float32:
        raise ValueError(f"weights must be float32 or bf16 as uint16, got {w.dtype}")
    return w


def quantize_matrix(w: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """One expert's matrix w [n_out, n_in] (float32 or bf16 as uint16) -> (values, scales) in the tiled layout.

    Shapes are `formats.value_shape` / `formats.scale_shape`; bf16 returns an empty [nt, 0, 0] scales array.
    """
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [n_out, n_in], got shape {w.shape}")
    n_out, n_in = w.shape
    check_matrix(fmt, n_out, n_in)
    nt = n_tiles(n_out)
    padded = np.zeros((nt * TILE_ROWS, n_in), dtype=np.float32)
    padded[:n_out] = _as_f32(w)
    if fmt.name == "bf16":
        bits = f32_to_bf16(padded) if w.dtype != np.uint16 else np.pad(w, ((0, nt * TILE_ROWS - n_out), (0, 0)))
        values = bits.reshape(nt, TILE_ROWS, n_in).transpose(0, 2, 1)
        return np.ascontiguousarray(values), np.zeros((nt, 0, 0), np.float32)
    G = fmt.group_size
    ng = n_in // G
    grouped = padded.reshape(nt * TILE_ROWS, ng, G)
    qmax = 127.0 if fmt.name == "int8" else 7.0
    scale = (np.abs(grouped).max(axis=2) / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(grouped / safe[:, :, None]), -qmax, qmax)
    # [rows, ng, G] -> [nt, ng, G, R]: a tile's rows become the innermost (vector) dimension.
    q = q.reshape(nt, TILE_ROWS, ng, G).transpose(0, 2, 3, 1)
    scales = np.ascontiguousarray(scale.reshape(nt, TILE_ROWS, ng).transpose(0, 2, 1))
    if fmt.name == "int8":
        return np.ascontiguousarray(q.astype(np.int8)), scales
    nib = (q + 8).astype(np.uint8)
    packed = nib[:, :, 0::2, :] | (nib[:, :, 1::2, :] << np.uint8(4))
    return np.ascontiguousarray(packed), scales


def quantize_fp8_matrix(w_fp8: np.ndarray, scale_inv: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """Block-FP8 matrix -> (values, scales) in `fmt`: dequantize per 128 x 128 block, then requantize."""
    return quantize_matrix(dequantize_fp8(w_fp8, scale_inv), fmt)


def dequantize_matrix(values: np.ndarray, scales: np.ndarray, fmt: Format, n_out: int, n_in: int) -> np.ndarray:
    """One expert's tiled (values, scales) -> float32 [n_out, n_in], the exact weights the kernels multiply by."""
    nt = n_tiles(n_out)
    if fmt.name == "bf16":
        w = bf16_to_f32(values).reshape(nt, n_in, TILE_ROWS).transpose(0, 2, 1)
        return np.ascontiguousarray(w.reshape(nt * TILE_ROWS, n_in)[:n_out])
    G = fmt.group_size
    ng = n_in // G
    if fmt.name == "int8":
        q = values.astype(np.float32)
    else:
        q = np.empty(values.shape[:2] + (G, TILE_ROWS), np.float32)
        q[:, :, 0::2, :] = (values & np.uint8(15)).astype(np.float32) - 8.0
        q[:, :, 1::2, :] = (values >> np.uint8(4)).astype(np.float32) - 8.0
    w = q * scales[:, :, None, :]  # [nt, ng, G, R]
    w = w.transpose(0, 3, 1, 2).reshape(nt * TILE_ROWS, ng * G)
    return np.ascontiguousarray(w[:n_out])


def matvec_error(fmt: Format, kind: str = "normal", n_out: int = 2048, n_in: int = 7168, seed: int = 0) -> float:
    """Relative error ||W_q x - W x|| / ||W x|| of one quantized matvec; kind "normal" or "heavy" (Student-t, 3 dof)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.standard_normal((n_out, n_in), dtype=np.float32)
    elif kind == "heavy":
        w = rng.standard_t(3, size=(n_out, n_in)).astype(np.float32)
    else:
        raise ValueError(f"kind {kind!r} is not 'normal' or 'heavy'")
    x = rng.standard_normal(n_in).astype(np.float64)
    values, scales = quantize_matrix(w, fmt)
    wq = dequantize_matrix(values, scales, fmt, n_out, n_in).astype(np.float64)
    exact = w.astype(np.float64) @ x
    return float(np.linalg.norm(wq @ x - exact) / np.linalg.norm(exact))
