"""int4: symmetric 4-bit codes packed two per byte, one float32 scale per (row, group of G inputs), G in 32, 64, 128.

Layout (store format version 1; row tiles as in formats/tiled.py):

    values uint8   [nt, ng, G/2, R]:  byte b = values[t, g, k, r] holds two 4-bit codes:
    scales float32 [nt, ng, R]          low nibble  -> column g*G + 2k,     value (b & 15) - 8
                                        high nibble -> column g*G + 2k + 1, value (b >> 4) - 8
                                        W[t*R + r, col] = value * scales[t, g, r]

Quantizer: scale = max|w| / 7 over the group, q = round(w / scale) in [-7, 7], stored as the nibble q + 8
(1..15; 8 is zero).

The kernels on AVX2 CPUs (tile1_int4_avx2, tile4_int4_avx2) multiply the codes by int8-quantized inputs
(activations.py) in integers: per step one 32-byte load holds one column pair of 32 rows, split into low and high
nibbles, interleaved into (low, high) byte pairs per row and multiplied by the input pair with vpmaddubsw
(int_lanes.py). The int16 sums stay in registers for 8 steps (each adds at most 2 * 15 * 127 = 3810, so 8 stay
below 32767); the one-token kernel then widens them into int32 for the rest of the 32-input block (a pass covers
32 rows, so their int32 sums stay in registers too) and scales each block's sums into float32 once, by the weight
group's scale and the input block's; scaling the int16 sums into float32 every 8 steps instead, as the four-token
kernel must (its four tokens' sums fill the registers), measured 14 % slower. The codes' +8 offset comes off once
per group as 8 * sum(inputs) * scale. Measured on a Zen 3 core, one 128 x 2048 tile in L2: 41-47 G weights/s
against 14 for the float kernels, which other CPUs keep: they decode codes in float (byte -> float, high nibble =
floor(byte / 16), low nibble = byte - 16 * high) because numba promotes integer shifts and masks to int64, which
vectorises 8 lanes wide and ran at half the speed; in tile1_int4_float the -8 offset and the low-nibble
subtraction are folded into scalars outside the row loop.
"""

from typing import NamedTuple

import numpy as np
from numba import njit

from .activations import BLOCK
from .int_lanes import (HAS_AVX2, add_ints, add_rows8_scaled, add_rows_scaled, add_words, high_nibbles, load32,
                        low_nibbles, maddubs, pair_splat, widen_hi, widen_lo, zero_ints, zero_words, zip_hi, zip_lo)
from .spec import FASTMATH, FormatSpec
from .tiled import DEFAULT_GROUP_SIZE, GROUP_SIZES, TILE_ROWS, group_dequantize, group_quantize, n_tiles

QMAX = 7.0
SIXTEENTH = np.float32(1.0 / 16.0)


class Int4Kernels(NamedTuple):
    """numba's marker for the int4 kernels (formats/spec.py)."""


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1_int4_avx2(kind, values, scales, x, xq, xd, y):
    """int4 tile [ng, G/2, 128] with scales [ng, 128] times the int8 inputs xq [ng * G] with block scales and
    sums xd [2, ng * G / 32] (activations.py) -> y [128]; x (float32) is unused."""
    n_groups, half, n_rows = values.shape
    group = 2 * half
    n_blocks = group // BLOCK
    for r in range(n_rows):
        y[r] = 0.0
    for g in range(n_groups):
        ws = scales[g]
        qg = values[g]
        for r0 in range(0, n_rows, 32):  # 32 rows a pass: their int32 sums fit in registers (module docstring)
            for b in range(n_blocks):
                s0, s1, s2, s3 = zero_ints(), zero_ints(), zero_ints(), zero_ints()  # rows 0-7, 8-15, 16-23, 24-31
                for part in range(2):  # 8 column pairs each: the most int16 sums hold
                    lo_sum, hi_sum = zero_words(), zero_words()
                    for step in range(8):
                        k = b * (BLOCK // 2) + part * 8 + step
                        xp = pair_splat(xq, g * group + 2 * k)
                        v = load32(qg[k], r0)
                        lo, hi = low_nibbles(v), high_nibbles(v)
                        lo_sum = add_words(lo_sum, maddubs(zip_lo(lo, hi), xp))
                        hi_sum = add_words(hi_sum, maddubs(zip_hi(lo, hi), xp))
                    s0, s1 = add_ints(s0, widen_lo(lo_sum)), add_ints(s1, widen_lo(hi_sum))
                    s2, s3 = add_ints(s2, widen_hi(lo_sum)), add_ints(s3, widen_hi(hi_sum))
                d = xd[0, g * n_blocks + b]
                add_rows8_scaled(y, r0, s0, ws, d)
                add_rows8_scaled(y, r0 + 8, s1, ws, d)
                add_rows8_scaled(y, r0 + 16, s2, ws, d)
                add_rows8_scaled(y, r0 + 24, s3, ws, d)
        inputs_sum = np.float32(0.0)
        for b in range(n_blocks):
            inputs_sum += xd[1, g * n_blocks + b]
        offset = np.float32(8.0) * inputs_sum
        for r in range(n_rows):
            y[r] -= offset * ws[r]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1_int4_float(kind, values, scales, x, xq, xd, y):
    """int4 tile [ng, G/2, R] (two codes per byte) with scales [ng, R] times x [ng * G] -> y [R] in float32 (xq,
    xd unused)."""
    n_groups, half, n_rows = values.shape
    group = 2 * half
    for r in range(n_rows):
        y[r] = 0.0
    for g in range(n_groups):
        qg = values[g]
        sg = scales[g]
        for k in range(0, half, 4):
            c = g * group + 2 * k
            # byte b = lo + 16 * hi; lo * xl + hi * xh = b * xl + hi * (xh - 16 * xl); codes are value + 8.
            xl0 = x[c]
            xh0 = x[c + 1] - np.float32(16.0) * x[c]
            xl1 = x[c + 2]
            xh1 = x[c + 3] - np.float32(16.0) * x[c + 2]
            xl2 = x[c + 4]
            xh2 = x[c + 5] - np.float32(16.0) * x[c + 4]
            xl3 = x[c + 6]
            xh3 = x[c + 7] - np.float32(16.0) * x[c + 6]
            offset = np.float32(8.0) * (x[c] + x[c + 1] + x[c + 2] + x[c + 3] + x[c + 4] + x[c + 5] + x[c + 6] + x[c + 7])
            b0 = qg[k]
            b1 = qg[k + 1]
            b2 = qg[k + 2]
            b3 = qg[k + 3]
            for r in range(n_rows):
                a0 = np.float32(b0[r])
                a1 = np.float32(b1[r])
                a2 = np.float32(b2[r])
                a3 = np.float32(b3[r])
                y[r] += sg[r] * (
                    (a0 * xl0 + np.floor(a0 * SIXTEENTH) * xh0 + a1 * xl1 + np.floor(a1 * SIXTEENTH) * xh1)
                    + (a2 * xl2 + np.floor(a2 * SIXTEENTH) * xh2 + a3 * xl3 + np.floor(a3 * SIXTEENTH) * xh3)
                    - offset
                )


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_int4_avx2(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    """int4 tile [ng, G/2, 128] times the int8 inputs Xq[i0..i3] (block scales and sums Xd[i0..i3]) -> Y [4, 128]:
    tile1_int4_avx2 for four tokens, each column pair's bytes decoded once for the four."""
    n_groups, half, n_rows = values.shape
    group = 2 * half
    n_blocks = group // BLOCK
    Y[:, :] = 0.0
    y0, y1, y2, y3 = Y[0], Y[1], Y[2], Y[3]
    xa, xb, xc, xe = Xq[i0], Xq[i1], Xq[i2], Xq[i3]
    for g in range(n_groups):
        ws = scales[g]
        qg = values[g]
        sum0 = sum1 = sum2 = sum3 = np.float32(0.0)
        for b in range(n_blocks):
            blk = g * n_blocks + b
            d0, d1, d2, d3 = Xd[i0, 0, blk], Xd[i1, 0, blk], Xd[i2, 0, blk], Xd[i3, 0, blk]
            sum0 += Xd[i0, 1, blk]
            sum1 += Xd[i1, 1, blk]
            sum2 += Xd[i2, 1, blk]
            sum3 += Xd[i3, 1, blk]
            for part in range(2):
                for r0 in range(0, n_rows, 32):
                    a0, a1, b0, b1, c0, c1, e0, e1 = (zero_words(), zero_words(), zero_words(), zero_words(),
                                                      zero_words(), zero_words(), zero_words(), zero_words())
                    for step in range(8):
                        k = b * (BLOCK // 2) + part * 8 + step
                        col = g * group + 2 * k
                        v = load32(qg[k], r0)
                        lo, hi = low_nibbles(v), high_nibbles(v)
                        pl, ph = zip_lo(lo, hi), zip_hi(lo, hi)
                        xp = pair_splat(xa, col)
                        a0, a1 = add_words(a0, maddubs(pl, xp)), add_words(a1, maddubs(ph, xp))
                        xp = pair_splat(xb, col)
                        b0, b1 = add_words(b0, maddubs(pl, xp)), add_words(b1, maddubs(ph, xp))
                        xp = pair_splat(xc, col)
                        c0, c1 = add_words(c0, maddubs(pl, xp)), add_words(c1, maddubs(ph, xp))
                        xp = pair_splat(xe, col)
                        e0, e1 = add_words(e0, maddubs(pl, xp)), add_words(e1, maddubs(ph, xp))
                    add_rows_scaled(y0, r0, a0, a1, ws, d0)
                    add_rows_scaled(y1, r0, b0, b1, ws, d1)
                    add_rows_scaled(y2, r0, c0, c1, ws, d2)
                    add_rows_scaled(y3, r0, e0, e1, ws, d3)
        for r in range(n_rows):
            y0[r] -= np.float32(8.0) * sum0 * ws[r]
            y1[r] -= np.float32(8.0) * sum1 * ws[r]
            y2[r] -= np.float32(8.0) * sum2 * ws[r]
            y3[r] -= np.float32(8.0) * sum3 * ws[r]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_int4_float(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    """int4 tile [ng, G/2, R] with scales [ng, R] times rows i0..i3 of X -> Y [4, R] in float32 (Xq, Xd unused)."""
    n_groups, half, n_rows = values.shape
    group = 2 * half
    Y[:, :] = 0.0
    y0, y1, y2, y3 = Y[0], Y[1], Y[2], Y[3]
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    for g in range(n_groups):
        qg = values[g]
        sg = scales[g]
        for k in range(half):
            c = g * group + 2 * k
            a0, a1, b0, b1 = xa[c], xa[c + 1], xb[c], xb[c + 1]
            c0, c1, d0, d1 = xc[c], xc[c + 1], xd[c], xd[c + 1]
            bk = qg[k]
            for r in range(n_rows):
                byte = np.float32(bk[r])
                hi = np.floor(byte * SIXTEENTH)
                lo = byte - np.float32(16.0) * hi
                w0 = sg[r] * (lo - np.float32(8.0))
                w1 = sg[r] * (hi - np.float32(8.0))
                y0[r] += w0 * a0 + w1 * a1
                y1[r] += w0 * b0 + w1 * b1
                y2[r] += w0 * c0 + w1 * c1
                y3[r] += w0 * d0 + w1 * d1


def value_shape(group: int, n_out: int, n_in: int) -> tuple:
    return (n_tiles(n_out), n_in // group, group // 2, TILE_ROWS)


def scale_shape(group: int, n_out: int, n_in: int) -> tuple:
    return (n_tiles(n_out), n_in // group, TILE_ROWS)


def quantize(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray]:
    q, scales = group_quantize(w, group, QMAX)
    nib = (q + 8).astype(np.uint8)
    packed = nib[:, :, 0::2, :] | (nib[:, :, 1::2, :] << np.uint8(4))
    return np.ascontiguousarray(packed), scales


def dequantize(values: np.ndarray, scales: np.ndarray, group: int, n_out: int, n_in: int) -> np.ndarray:
    q = np.empty(values.shape[:2] + (group, TILE_ROWS), np.float32)
    q[:, :, 0::2, :] = (values & np.uint8(15)).astype(np.float32) - 8.0
    q[:, :, 1::2, :] = (values >> np.uint8(4)).astype(np.float32) - 8.0
    return group_dequantize(q, scales, n_out)


SPEC = FormatSpec(
    name="int4", group_sizes=GROUP_SIZES, default_group=DEFAULT_GROUP_SIZE, tile_rows=TILE_ROWS, value_dtype="uint8",
    has_scales=True, value_shape=value_shape, scale_shape=scale_shape, input_multiple=lambda group: group,
    bits_per_weight=lambda group: 4 + 32 / group, quantize=quantize, dequantize=dequantize,
    tile1=tile1_int4_avx2 if HAS_AVX2 else tile1_int4_float, quantized_inputs=HAS_AVX2,
    tile4=tile4_int4_avx2 if HAS_AVX2 else tile4_int4_float, kind=Int4Kernels(), error_bound=0.35,
)
