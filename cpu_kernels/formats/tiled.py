"""Row tiles: the layout bf16, int8 and int4 share, its symmetric group quantizer, and why their kernels loop so.

Dimension legend: R = TILE_ROWS rows per tile, nt = ceil(n_out / R) tiles, n_in input columns, G group size,
ng = n_in / G groups.

A matrix [n_out, n_in] is cut into nt row tiles of R rows; rows past n_out in the last tile are zero. Inside a
tile the rows are the fastest-varying axis (element (row r, column c) of tile t sits next to (r + 1, c)), so each
tile is one contiguous byte range a kernel thread streams through, and the kernels' inner loop runs over 128
consecutive rows with one input element as a broadcast scalar. int8 and int4 keep one float32 scale per (row,
group of G input columns), scales[t, g, r], contiguous along the rows for the same reason.

Why the one-token kernels (tile1) have this shape. They run when an expert has fewer than 4 tokens in a call
(decode), so they are bound by how fast weights stream from memory: each weight byte is used once; what bounds
them is the bytes of the tile (R * n_in * bits / 8 plus R * ng * 4 bytes of scales). The innermost loop runs over
the tile's R = 128 rows, contiguous in memory, with the input element(s) as broadcast scalars: LLVM turns it into
16-lane AVX-512 code with no horizontal reductions. The per-(row, group) scale varies along that same row axis, so
it is one contiguous vector load and one multiply, applied per chunk of 4 (int8) or 8 (int4) input columns -- the
chunk amortises the load/store of y. The obvious alternative, a dot product along each row with a scalar
accumulator, must either reduce horizontally once per group (32..128 elements) or leave a short group loop that
LLVM does not vectorise (its main vector body wants 64 elements); both measured 3-10x slower than this shape.
Those float kernels convert every weight to float32; on AVX2 CPUs int8 and int4 instead run integer kernels on
int8-quantized inputs (activations.py, int_lanes.py): the same rows-innermost walk through the tile, with two
adjacent columns of each row interleaved into byte (int4) or int16 (int8) pairs so that one vpmaddubsw/vpmaddwd
multiplies 16-32 weights by an input pair; 2.2-2.9x the float kernels' speed on one core (int8.py, int4.py).

Why the four-token kernels (tile4) have this shape. They compute Y[4, R] for four input rows at once. Each weight
is dequantized once into a register (`s * q`) and multiplied into four accumulators, so the cost per token falls as
tokens per expert grow until the FMA units, not memory, bound it: 2 * 4 * R * n_in FLOPs per tile call. The loop
has the same shape as tile1's (inner loop over the tile's 128 contiguous rows, inputs as broadcast scalars) with 2
input columns per chunk: 2 columns x 4 tokens keep 8 broadcast inputs, 2 weight vectors and 4 accumulators in
registers. Dequantizing whole tiles into float32 and calling BLAS (np.dot; numba's np.dot needs SciPy, which we do
not depend on) measured slower: writing the float32 tile costs as much as the multiply at 32-64 tokens per expert.
"""

import numpy as np

from ..floats import as_float32

# Rows per tile: a multiple of the 16-float AVX-512 vector, long enough that the inner loop over a tile's
# rows amortises its setup, short enough that a tile row chunk of 4 input columns stays in L1.
TILE_ROWS = 128
# Group sizes G of int8 and int4: multiples of the 8 columns the int4 kernel decodes per step, dividing K2's widths.
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128


def n_tiles(n_out: int) -> int:
    return -(-n_out // TILE_ROWS)


def padded_rows(w: np.ndarray) -> np.ndarray:
    """w [n_out, n_in] (float32 or bf16 bits) -> float32 [nt * R, n_in], the rows past n_out zero."""
    n_out, n_in = w.shape
    padded = np.zeros((n_tiles(n_out) * TILE_ROWS, n_in), dtype=np.float32)
    padded[:n_out] = as_float32(w)
    return padded


def group_quantize(w: np.ndarray, group: int, qmax: float) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization, one scale per (row, group of G inputs): scale = max|w| / qmax, q = round(w / scale)
    in [-qmax, qmax]. w [n_out, n_in] -> (q float32 [nt, ng, G, R], scales float32 [nt, ng, R])."""
    padded = padded_rows(w)
    nt, ng = padded.shape[0] // TILE_ROWS, w.shape[1] // group
    grouped = padded.reshape(nt * TILE_ROWS, ng, group)
    scale = (np.abs(grouped).max(axis=2) / qmax).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1.0))
    q = np.clip(np.rint(grouped / safe[:, :, None]), -qmax, qmax)
    # [rows, ng, G] -> [nt, ng, G, R]: a tile's rows become the innermost (vector) dimension.
    q = q.reshape(nt, TILE_ROWS, ng, group).transpose(0, 2, 3, 1)
    return q, np.ascontiguousarray(scale.reshape(nt, TILE_ROWS, ng).transpose(0, 2, 1))


def group_dequantize(q: np.ndarray, scales: np.ndarray, n_out: int) -> np.ndarray:
    """q float32 [nt, ng, G, R] and scales [nt, ng, R] -> float32 [n_out, ng * G] (the inverse of the layout above)."""
    nt, ng, group, _ = q.shape
    w = q * scales[:, :, None, :]  # [nt, ng, G, R]
    w = w.transpose(0, 3, 1, 2).reshape(nt * TILE_ROWS, ng * group)
    return np.ascontiguousarray(w[:n_out])
