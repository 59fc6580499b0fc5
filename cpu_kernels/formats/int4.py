"""int4: symmetric 4-bit codes packed two per byte, one float32 scale per (row, group of G inputs), G in 32, 64, 128.

Layout (store format version 1; row tiles as in formats/tiled.py):

    values uint8   [nt, ng, G/2, R]:  byte b = values[t, g, k, r] holds two 4-bit codes:
    scales float32 [nt, ng, R]          low nibble  -> column g*G + 2k,     value (b & 15) - 8
                                        high nibble -> column g*G + 2k + 1, value (b >> 4) - 8
                                        W[t*R + r, col] = value * scales[t, g, r]

Quantizer: scale = max|w| / 7 over the group, q = round(w / scale) in [-7, 7], stored as the nibble q + 8
(1..15; 8 is zero).

The kernels decode codes in float (byte -> float, high nibble = floor(byte / 16), low nibble = byte - 16 * high)
because numba promotes integer shifts and masks to int64, which vectorises 8 lanes wide and ran at half the
speed; in tile1 the -8 offset and the low-nibble subtraction are folded into scalars outside the row loop.
"""

from typing import NamedTuple

import numpy as np
from numba import njit

from .spec import FASTMATH, FormatSpec
from .tiled import DEFAULT_GROUP_SIZE, GROUP_SIZES, TILE_ROWS, group_dequantize, group_quantize, n_tiles

QMAX = 7.0
SIXTEENTH = np.float32(1.0 / 16.0)


class Int4Kernels(NamedTuple):
    """numba's marker for the int4 kernels (formats/spec.py)."""


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1_int4(kind, values, scales, x, y):
    """int4 tile [ng, G/2, R] (two codes per byte) with scales [ng, R] times x [ng * G] -> y [R]."""
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
def tile4_int4(kind, values, scales, X, i0, i1, i2, i3, Y):
    """int4 tile [ng, G/2, R] with scales [ng, R] times rows i0..i3 of X -> Y [4, R]."""
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
    bits_per_weight=lambda group: 4 + 32 / group, quantize=quantize, dequantize=dequantize, tile1=tile1_int4,
    tile4=tile4_int4, kind=Int4Kernels(), error_bound=0.35,
)
