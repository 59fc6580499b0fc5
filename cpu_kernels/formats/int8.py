"""int8: symmetric 8-bit codes, one float32 scale per (row, group of G inputs), G in 32, 64, 128.

Layout (store format version 1; row tiles as in formats/tiled.py):

    values int8    [nt, ng, G, R]:  W[t*R + r, g*G + j] = values[t, g, j, r] * scales[t, g, r]
    scales float32 [nt, ng, R]

Quantizer: scale = max|w| / 127 over the group, q = round(w / scale) in [-127, 127].

The one-token kernel on AVX2 CPUs (tile1_int8_avx2) multiplies by int8-quantized inputs (activations.py) in
integers: two columns of 16 rows are sign-extended to int16, interleaved into (column j, column j + 1) pairs per
row and multiplied by the input pair with vpmaddwd into int32 per row (int_lanes.py); each 32-input block's sums
are scaled into float32 once. vpmaddubsw (32 weights per instruction, as int4 uses) needs one unsigned operand
and its int16 sums of two int8 x int8 products (up to 32258) could not be added even once more, so every step
would pay to widen them. The pass covers 64 rows (8 int32 accumulators in registers, one cache line per column).
Measured on a Zen 3 core, one 128 x 2048 tile in L2: 30 G weights/s against 13 for the float kernel, which the
other CPUs and the four-token kernel keep.
"""

from typing import NamedTuple

import numpy as np
from numba import njit

from .activations import BLOCK
from .int_lanes import (HAS_AVX2, add_ints, add_ints_scaled, load16_words, madd_words, pair_splat_words, zero_ints,
                        zip_words_hi, zip_words_lo)
from .spec import FASTMATH, FormatSpec
from .tiled import DEFAULT_GROUP_SIZE, GROUP_SIZES, TILE_ROWS, group_dequantize, group_quantize, n_tiles

QMAX = 127.0


class Int8Kernels(NamedTuple):
    """numba's marker for the int8 kernels (formats/spec.py)."""


@njit(nogil=True, cache=True, fastmath=FASTMATH, inline="always")
def _column_pair(col0, col1, at, xp, lo_sum, hi_sum):
    """The int32 sums of 16 rows (bytes at..at + 16 of two columns) after one more column pair against xp."""
    u, v = load16_words(col0, at), load16_words(col1, at)
    return add_ints(lo_sum, madd_words(zip_words_lo(u, v), xp)), add_ints(hi_sum, madd_words(zip_words_hi(u, v), xp))


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1_int8_avx2(kind, values, scales, x, xq, xd, y):
    """int8 tile [ng, G, 128] with scales [ng, 128] times the int8 inputs xq [ng * G] with block scales xd
    [2, ng * G / 32] (activations.py) -> y [128]; x (float32) is unused."""
    n_groups, group, n_rows = values.shape
    n_blocks = group // BLOCK
    for r in range(n_rows):
        y[r] = 0.0
    for g in range(n_groups):
        ws = scales[g]
        qg = values[g]
        for b in range(n_blocks):
            d = xd[0, g * n_blocks + b]
            for r0 in range(0, n_rows, 64):
                s0, s1, s2, s3, s4, s5, s6, s7 = (zero_ints(), zero_ints(), zero_ints(), zero_ints(), zero_ints(),
                                                  zero_ints(), zero_ints(), zero_ints())
                for step in range(BLOCK // 2):
                    j = b * BLOCK + 2 * step
                    xp = pair_splat_words(xq, g * group + j)
                    col0, col1 = qg[j], qg[j + 1]
                    s0, s1 = _column_pair(col0, col1, r0, xp, s0, s1)
                    s2, s3 = _column_pair(col0, col1, r0 + 16, xp, s2, s3)
                    s4, s5 = _column_pair(col0, col1, r0 + 32, xp, s4, s5)
                    s6, s7 = _column_pair(col0, col1, r0 + 48, xp, s6, s7)
                add_ints_scaled(y, r0, s0, s1, ws, d)
                add_ints_scaled(y, r0 + 16, s2, s3, ws, d)
                add_ints_scaled(y, r0 + 32, s4, s5, ws, d)
                add_ints_scaled(y, r0 + 48, s6, s7, ws, d)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1_int8_float(kind, values, scales, x, xq, xd, y):
    """int8 tile [ng, G, R] with scales [ng, R] times x [ng * G] -> y [R] in float32 (xq, xd unused)."""
    n_groups, group, n_rows = values.shape
    for r in range(n_rows):
        y[r] = 0.0
    for g in range(n_groups):
        qg = values[g]
        sg = scales[g]
        for j in range(0, group, 4):
            c = g * group + j
            x0 = x[c]
            x1 = x[c + 1]
            x2 = x[c + 2]
            x3 = x[c + 3]
            q0 = qg[j]
            q1 = qg[j + 1]
            q2 = qg[j + 2]
            q3 = qg[j + 3]
            for r in range(n_rows):
                y[r] += sg[r] * (
                    np.float32(q0[r]) * x0 + np.float32(q1[r]) * x1 + np.float32(q2[r]) * x2 + np.float32(q3[r]) * x3
                )


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_int8_avx2(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    """int8 tile [ng, G, 128] times the int8 inputs Xq[i0..i3] (block scales Xd[i0..i3]) -> Y [4, 128]:
    tile1_int8_avx2 for four tokens, 16 rows per pass (8 int32 accumulators: 2 per token)."""
    n_groups, group, n_rows = values.shape
    n_blocks = group // BLOCK
    Y[:, :] = 0.0
    y0, y1, y2, y3 = Y[0], Y[1], Y[2], Y[3]
    xa, xb, xc, xe = Xq[i0], Xq[i1], Xq[i2], Xq[i3]
    for g in range(n_groups):
        ws = scales[g]
        qg = values[g]
        for b in range(n_blocks):
            blk = g * n_blocks + b
            d0, d1, d2, d3 = Xd[i0, 0, blk], Xd[i1, 0, blk], Xd[i2, 0, blk], Xd[i3, 0, blk]
            for r0 in range(0, n_rows, 16):
                a0, a1, b0, b1, c0, c1, e0, e1 = (zero_ints(), zero_ints(), zero_ints(), zero_ints(), zero_ints(),
                                                  zero_ints(), zero_ints(), zero_ints())
                for step in range(BLOCK // 2):
                    j = b * BLOCK + 2 * step
                    col = g * group + j
                    u, v = load16_words(qg[j], r0), load16_words(qg[j + 1], r0)
                    pl, ph = zip_words_lo(u, v), zip_words_hi(u, v)
                    xp = pair_splat_words(xa, col)
                    a0, a1 = add_ints(a0, madd_words(pl, xp)), add_ints(a1, madd_words(ph, xp))
                    xp = pair_splat_words(xb, col)
                    b0, b1 = add_ints(b0, madd_words(pl, xp)), add_ints(b1, madd_words(ph, xp))
                    xp = pair_splat_words(xc, col)
                    c0, c1 = add_ints(c0, madd_words(pl, xp)), add_ints(c1, madd_words(ph, xp))
                    xp = pair_splat_words(xe, col)
                    e0, e1 = add_ints(e0, madd_words(pl, xp)), add_ints(e1, madd_words(ph, xp))
                add_ints_scaled(y0, r0, a0, a1, ws, d0)
                add_ints_scaled(y1, r0, b0, b1, ws, d1)
                add_ints_scaled(y2, r0, c0, c1, ws, d2)
                add_ints_scaled(y3, r0, e0, e1, ws, d3)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_int8_float(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    """int8 tile [ng, G, R] with scales [ng, R] times rows i0..i3 of X -> Y [4, R] in float32 (Xq, Xd unused)."""
    n_groups, group, n_rows = values.shape
    Y[:, :] = 0.0
    y0, y1, y2, y3 = Y[0], Y[1], Y[2], Y[3]
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    for g in range(n_groups):
        qg = values[g]
        sg = scales[g]
        for j in range(0, group, 2):
            c = g * group + j
            a0, a1, b0, b1 = xa[c], xa[c + 1], xb[c], xb[c + 1]
            c0, c1, d0, d1 = xc[c], xc[c + 1], xd[c], xd[c + 1]
            q0 = qg[j]
            q1 = qg[j + 1]
            for r in range(n_rows):
                w0 = sg[r] * np.float32(q0[r])
                w1 = sg[r] * np.float32(q1[r])
                y0[r] += w0 * a0 + w1 * a1
                y1[r] += w0 * b0 + w1 * b1
                y2[r] += w0 * c0 + w1 * c1
                y3[r] += w0 * d0 + w1 * d1


def value_shape(group: int, n_out: int, n_in: int) -> tuple:
    return (n_tiles(n_out), n_in // group, group, TILE_ROWS)


def scale_shape(group: int, n_out: int, n_in: int) -> tuple:
    return (n_tiles(n_out), n_in // group, TILE_ROWS)


def quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    q, scales = group_quantize(w, group, QMAX)
    return np.ascontiguousarray(q.astype(np.int8)), scales


def dequantize(values: np.ndarray, scales: np.ndarray, group: int, n_out: int, n_in: int) -> np.ndarray:
    return group_dequantize(values.astype(np.float32), scales, n_out)


SPEC = FormatSpec(
    name="int8", group_sizes=GROUP_SIZES, default_group=DEFAULT_GROUP_SIZE, tile_rows=TILE_ROWS, value_dtype="int8",
    has_scales=True, value_shape=value_shape, scale_shape=scale_shape, input_multiple=lambda group: group,
    bits_per_weight=lambda group: 8 + 32 / group, quantize=quantize, dequantize=dequantize,
    tile1=tile1_int8_avx2 if HAS_AVX2 else tile1_int8_float, quantized_inputs=HAS_AVX2,
    tile4=tile4_int8_avx2 if HAS_AVX2 else tile4_int8_float, kind=Int8Kernels(), error_bound=0.02,
)
