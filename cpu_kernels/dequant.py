"""Whole expert matrices to dense float32, for callers that multiply one matrix by many tokens at once.

Dimension legend: n_out / n_in a projection's output / input size, R rows per tile (128), nt tiles, ng groups,
G group size.

The tile kernels (phases.py) dequantize every weight in registers once per four tokens: right for decode and
short prefill. When an expert has dozens of tokens in one call a dense GEMM (torch's oneDNN, with AVX-512 BF16
or AMX where the CPU has them) can be several times faster, if the matrix is dense first: `dense_matrix` writes
it, split over a KernelThreads worker's threads by tiles (rows for GGUF types). Row-tiled formats (bf16, int8,
int4) are written transposed, [n_in, n_out], because a tile keeps its rows contiguous: each weight lands next to
its row neighbour, so the writes stream; GGUF types are written [n_out, n_in], as their blocks run along a row.
`transposed` in the result says which. The values equal `dequantize_matrix`'s exactly (q * scale in float32).
"""

import numpy as np
from numba import njit

from .formats.gguf import dequantize_rows
from .formats.tiled import TILE_ROWS
from .threads import split_range


@njit(nogil=True, cache=True)
def _bf16_columns(values, t0, t1, out):
    """bf16 tiles [nt, n_in, R] (bits as uint16) -> out [n_in, nt * R] float32, tiles t0..t1."""
    bits = out.view(np.uint32)
    n_in, n_rows = values.shape[1], values.shape[2]
    for t in range(t0, t1):
        for c in range(n_in):
            v = values[t, c]
            o = bits[c, t * n_rows:(t + 1) * n_rows]
            for r in range(n_rows):
                o[r] = np.uint32(v[r]) << 16


@njit(nogil=True, cache=True)
def _int8_columns(values, scales, t0, t1, out):
    """int8 tiles [nt, ng, G, R] with scales [nt, ng, R] -> out [n_in, nt * R] float32, tiles t0..t1."""
    n_groups, group, n_rows = values.shape[1], values.shape[2], values.shape[3]
    for t in range(t0, t1):
        for g in range(n_groups):
            s = scales[t, g]
            for c in range(group):
                v = values[t, g, c]
                o = out[g * group + c, t * n_rows:(t + 1) * n_rows]
                for r in range(n_rows):
                    o[r] = np.float32(v[r]) * s[r]


@njit(nogil=True, cache=True)
def _int4_columns(values, scales, t0, t1, out):
    """int4 tiles [nt, ng, G/2, R] with scales [nt, ng, R] -> out [n_in, nt * R] float32, tiles t0..t1 (low nibble:
    column 2k, high nibble: 2k + 1, each minus 8; formats/int4.py)."""
    n_groups, half, n_rows = values.shape[1], values.shape[2], values.shape[3]
    for t in range(t0, t1):
        for g in range(n_groups):
            s = scales[t, g]
            for k in range(half):
                v = values[t, g, k]
                lo = out[g * 2 * half + 2 * k, t * n_rows:(t + 1) * n_rows]
                hi = out[g * 2 * half + 2 * k + 1, t * n_rows:(t + 1) * n_rows]
                for r in range(n_rows):
                    b = np.int32(v[r])
                    lo[r] = np.float32((b & 15) - 8) * s[r]
                    hi[r] = np.float32((b >> 4) - 8) * s[r]


def dense_shape(fmt, n_out: int, n_in: int) -> tuple[tuple[int, int], bool]:
    """(shape of `dense_matrix`'s output, whether it is transposed) for a [n_out, n_in] matrix in `fmt`."""
    if fmt.name in ("bf16", "int8", "int4"):
        return (n_in, -(-n_out // TILE_ROWS) * TILE_ROWS), True
    return (n_out, n_in), False


def dense_matrix(fmt, values: np.ndarray, scales: np.ndarray, n_out: int, n_in: int, out: np.ndarray, threads) -> bool:
    """One expert's (values, scales) in `fmt` -> out float32 of dense_shape(...)[0], on the worker `threads`.

    Returns whether out is transposed: out[c, r] = W[r, c] for r < n_out (rows past n_out, the last tile's
    padding, are zero), else out = W. Same values as dequantize_matrix."""
    shape, transposed = dense_shape(fmt, n_out, n_in)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {shape}, got {out.dtype} {out.shape}")
    if transposed:
        nt = values.shape[0]
        n_parts = threads.n_parts(values.nbytes, nt)
        if fmt.name == "bf16":
            def part(p): _bf16_columns(values, *split_range(nt, p, n_parts), out)
        elif fmt.name == "int8":
            def part(p): _int8_columns(values, scales, *split_range(nt, p, n_parts), out)
        else:
            def part(p): _int4_columns(values, scales, *split_range(nt, p, n_parts), out)
    else:  # a GGUF type: its row decoders, rows split among the threads
        code = fmt.spec.ggml_type
        rows = np.ascontiguousarray(values).reshape(n_out, -1)
        n_parts = threads.n_parts(rows.nbytes, n_out)

        def part(p):
            r0, r1 = split_range(n_out, p, n_parts)
            dequantize_rows(code, rows[r0:r1], out[r0:r1])
    threads.run(part, n_parts)
    return transposed
