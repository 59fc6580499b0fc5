"""Quantizers into the store's formats and their inverses (dequantizers), through the format registry.

Dimension legend: n_out / n_in the output / input size of one matrix. numpy only; bf16 travels as uint16.
Each format's quantizer, layout and dequantizer live in its module under formats/; these functions check the
input once and call the one `fmt` names. Block-FP8 checkpoints are dequantized (floats.py) and then requantized.
"""

import numpy as np

from .floats import dequantize_fp8
from .formats import Format, check_matrix


def quantize_matrix(w: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """One expert's matrix w [n_out, n_in] (float32 or bf16 as uint16) -> (values, scales) in `fmt`'s layout.

    Shapes are `formats.value_shape` / `formats.scale_shape`; a format without scales returns an empty [nt, 0, 0]
    scales array.
    """
    if fmt.spec.quantize is None:
        raise ValueError(f"format {fmt} is read from GGUF files as released; hybrid does not write it (convert "
                         "writes bf16, int8 or int4)")
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [n_out, n_in], got shape {w.shape}")
    check_matrix(fmt, *w.shape)
    if w.dtype not in (np.float32, np.uint16):
        raise ValueError(f"weights must be float32 or bf16 as uint16, got {w.dtype}")
    return fmt.spec.quantize(w, fmt.group_size)


def quantize_fp8_matrix(w_fp8: np.ndarray, scale_inv: np.ndarray, fmt: Format) -> tuple[np.ndarray, np.ndarray]:
    """Block-FP8 matrix -> (values, scales) in `fmt`: dequantize per 128 x 128 block, then requantize."""
    return quantize_matrix(dequantize_fp8(w_fp8, scale_inv), fmt)


def dequantize_matrix(values: np.ndarray, scales: np.ndarray, fmt: Format, n_out: int, n_in: int) -> np.ndarray:
    """One expert's (values, scales) -> float32 [n_out, n_in], the exact weights the kernels multiply by."""
    return fmt.spec.dequantize(values, scales, fmt.group_size, n_out, n_in)


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
