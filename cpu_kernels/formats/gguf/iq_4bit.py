"""IQ4_XS: 4-bit codes into a 16-level non-uniform table (IQ4_NL's levels, -127 .. 113), 6-bit sub-block scales.

Byte layout per 256-weight block (136 bytes): d f16 at 0, a uint16 at 2 holding the 2 high bits of each sub-block
scale (sub-block s: bits 2s, 2s + 1), 4 bytes at 4 holding their 4 low bits (sub-block s: nibble s & 1 of byte
s >> 1), then 128 code bytes at 8: sub-block s (32 weights) is bytes 8 + 16s .. 24 + 16s, weight j < 16 the low
nibble of byte j and weight 16 + j its high nibble. w = d * (l - 32) * level[code], l the 6-bit scale.
"""

import numpy as np
from numba import njit

from ..spec import FASTMATH
from .lanes import half_at, hsum8, load8, lookup16, store8, u8, u16, zeros8
from .iq_tables import IQ4_LEVELS

IQ4_XS_BYTES = 136
QK = 256


@njit(nogil=True, cache=True, inline="always")
def _scale(row, o, d, s):
    low = (u8(row, o + 4 + (s >> 1)) >> (4 * (s & 1))) & 15
    high = (u16(row, o + 2) >> (2 * s)) & 3
    return d * np.float32((low | (high << 4)) - 32)


@njit(nogil=True, cache=True, inline="always")
def _group(row, o, g):
    """Group g (< 32) of the block's 8-weight groups, before scaling: sub-block g >> 2, quarter g & 3."""
    return lookup16(IQ4_LEVELS, row, o + 8 + 16 * (g >> 2) + 8 * (g & 1), 4 * ((g >> 1) & 1))


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq4_xs(row, x):
    acc = zeros8()
    for b in range(row.shape[0] // IQ4_XS_BYTES):
        o, c = b * IQ4_XS_BYTES, b * QK
        d = half_at(row, o)
        for s in range(8):
            p = zeros8()
            for k in range(4):
                g = 4 * s + k
                p += _group(row, o, g) * load8(x, c + 8 * g)
            acc += _scale(row, o, d, s) * p
    return hsum8(acc)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq4_xs(row, X, i0, i1, i2, i3, Y, r):
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    a0, a1, a2, a3 = zeros8(), zeros8(), zeros8(), zeros8()
    for b in range(row.shape[0] // IQ4_XS_BYTES):
        o, c = b * IQ4_XS_BYTES, b * QK
        d = half_at(row, o)
        for s in range(8):
            p0, p1, p2, p3 = zeros8(), zeros8(), zeros8(), zeros8()
            for k in range(4):
                g = 4 * s + k
                w, j = _group(row, o, g), c + 8 * g
                p0 += w * load8(xa, j)
                p1 += w * load8(xb, j)
                p2 += w * load8(xc, j)
                p3 += w * load8(xd, j)
            sc = _scale(row, o, d, s)
            a0, a1, a2, a3 = a0 + sc * p0, a1 + sc * p1, a2 + sc * p2, a3 + sc * p3
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq4_xs(row, out):
    for b in range(row.shape[0] // IQ4_XS_BYTES):
        o, c = b * IQ4_XS_BYTES, b * QK
        d = half_at(row, o)
        for s in range(8):
            sc = _scale(row, o, d, s)
            for k in range(4):
                g = 4 * s + k
                store8(out, c + 8 * g, sc * _group(row, o, g))
