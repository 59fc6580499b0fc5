"""IQ2_XXS, IQ2_XS and IQ2_S: 2-bit-ish weights as rows of an 8-wide grid (values 8, 25, 43) times 8 signs.

Byte layouts per 256-weight block (d f16 at 0 in all three; the 256 weights form 32 groups of 8, group g the
inputs [8g, 8g + 8) of the block):
    IQ2_XXS (66)  8 sub-blocks of 8 bytes at 2 + 8s: 4 grid indices (one byte per group), then a uint32 whose
                  bits 7k..7k+6 are group k's 7-bit sign code and bits 28..31 the sub-block scale l:
                  w = d * (l + 1/2) / 4 * grid[index] * signs.
    IQ2_XS  (74)  32 uint16 at 2 + 2g: bits 0..8 the grid index (512 entries), bits 9..15 the 7-bit sign code;
                  8 scale bytes at 66, each two 4-bit scales (low nibble: groups 4s, 4s+1; high: 4s+2, 4s+3).
    IQ2_S   (82)  32 index bytes at 2 (low 8 bits), 32 sign bytes at 34 (one full byte per group), 8 bytes at 66
                  with the index's 2 high bits (group 4s+k at bits 2k..2k+1 of byte s), 8 scale bytes at 74 as
                  IQ2_XS. Grid of 1024 entries.
Every kernel sums x * grid * sign over one run of weights that shares a scale (32 or 16) in vector lanes, then
multiplies by the scale once.
"""

import numpy as np
from numba import njit

from ..spec import FASTMATH
from .lanes import half_at, hsum8, load8, store8, u8, u16, u32, zeros8
from .iq_tables import GRID_IQ2_S, GRID_IQ2_XS, GRID_IQ2_XXS, SIGNS7, SIGNS8

IQ2_XXS_BYTES, IQ2_XS_BYTES, IQ2_S_BYTES = 66, 74, 82
QK = 256
QUARTER = np.float32(0.25)
HALF = np.float32(0.5)


# ---- IQ2_XXS: sub-block s (32 weights) = bytes 2 + 8s .. 10 + 8s


@njit(nogil=True, cache=True, inline="always")
def _xxs_group(row, q, aux, k):
    """Group k (< 4) of the sub-block at byte q, whose sign/scale word is aux: 8 weights before scaling."""
    return load8(GRID_IQ2_XXS, u8(row, q + k) * 8) * load8(SIGNS7, ((aux >> (7 * k)) & 127) * 8)


@njit(nogil=True, cache=True, inline="always")
def _xxs_scale(d4, aux):
    """The sub-block's scale; d4 = d / 4."""
    return d4 * (np.float32(aux >> 28) + HALF)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq2_xxs(row, x):
    acc = zeros8()
    for b in range(row.shape[0] // IQ2_XXS_BYTES):
        o, c = b * IQ2_XXS_BYTES, b * QK
        d4 = half_at(row, o) * QUARTER
        for s in range(8):
            q, cs = o + 2 + 8 * s, c + 32 * s
            aux = u32(row, q + 4)
            p = zeros8()
            for k in range(4):
                p += _xxs_group(row, q, aux, k) * load8(x, cs + 8 * k)
            acc += _xxs_scale(d4, aux) * p
    return hsum8(acc)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq2_xxs(row, X, i0, i1, i2, i3, Y, r):
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    a0, a1, a2, a3 = zeros8(), zeros8(), zeros8(), zeros8()
    for b in range(row.shape[0] // IQ2_XXS_BYTES):
        o, c = b * IQ2_XXS_BYTES, b * QK
        d4 = half_at(row, o) * QUARTER
        for s in range(8):
            q, cs = o + 2 + 8 * s, c + 32 * s
            aux = u32(row, q + 4)
            p0, p1, p2, p3 = zeros8(), zeros8(), zeros8(), zeros8()
            for k in range(4):
                w, j = _xxs_group(row, q, aux, k), cs + 8 * k
                p0 += w * load8(xa, j)
                p1 += w * load8(xb, j)
                p2 += w * load8(xc, j)
                p3 += w * load8(xd, j)
            sc = _xxs_scale(d4, aux)
            a0, a1, a2, a3 = a0 + sc * p0, a1 + sc * p1, a2 + sc * p2, a3 + sc * p3
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq2_xxs(row, out):
    for b in range(row.shape[0] // IQ2_XXS_BYTES):
        o, c = b * IQ2_XXS_BYTES, b * QK
        d4 = half_at(row, o) * QUARTER
        for s in range(8):
            q = o + 2 + 8 * s
            aux = u32(row, q + 4)
            sc = _xxs_scale(d4, aux)
            for k in range(4):
                store8(out, c + 32 * s + 8 * k, sc * _xxs_group(row, q, aux, k))


# ---- IQ2_XS and IQ2_S: four groups per scale byte, the low nibble scaling the first two, the high the last two


@njit(nogil=True, cache=True, inline="always")
def _xs_group(row, o, g):
    q = u16(row, o + 2 + 2 * g)
    return load8(GRID_IQ2_XS, (q & 511) * 8) * load8(SIGNS7, (q >> 9) * 8)


@njit(nogil=True, cache=True, inline="always")
def _s_group(row, o, g):
    high = (u8(row, o + 66 + (g >> 2)) >> (2 * (g & 3))) & 3
    index = u8(row, o + 2 + g) | (high << 8)
    return load8(GRID_IQ2_S, index * 8) * load8(SIGNS8, u8(row, o + 34 + g) * 8)


@njit(nogil=True, cache=True, inline="always")
def _nibble_scales(d4, byte):
    """The two scales (low nibble, high nibble) of one IQ2_XS / IQ2_S scale byte; d4 = d / 4."""
    return d4 * (np.float32(byte & 15) + HALF), d4 * (np.float32(byte >> 4) + HALF)


@njit(nogil=True, cache=True, inline="always")
def _group(is_s, row, o, g):
    return _s_group(row, o, g) if is_s else _xs_group(row, o, g)


@njit(nogil=True, cache=True, inline="always")
def _dot1_xs_s(is_s, block_bytes, scales_at, row, x):
    acc = zeros8()
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d4 = half_at(row, o) * QUARTER
        for s in range(8):
            lo, hi = _nibble_scales(d4, u8(row, o + scales_at + s))
            g, cs = 4 * s, c + 32 * s
            p = _group(is_s, row, o, g) * load8(x, cs) + _group(is_s, row, o, g + 1) * load8(x, cs + 8)
            acc += lo * p
            p = _group(is_s, row, o, g + 2) * load8(x, cs + 16) + _group(is_s, row, o, g + 3) * load8(x, cs + 24)
            acc += hi * p
    return hsum8(acc)


@njit(nogil=True, cache=True, inline="always")
def _dot4_xs_s(is_s, block_bytes, scales_at, row, X, i0, i1, i2, i3, Y, r):
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    a0, a1, a2, a3 = zeros8(), zeros8(), zeros8(), zeros8()
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d4 = half_at(row, o) * QUARTER
        for s in range(8):
            lo, hi = _nibble_scales(d4, u8(row, o + scales_at + s))
            for half in range(2):
                g = 4 * s + 2 * half
                j = c + 8 * g
                w, v = _group(is_s, row, o, g), _group(is_s, row, o, g + 1)
                p0 = w * load8(xa, j) + v * load8(xa, j + 8)
                p1 = w * load8(xb, j) + v * load8(xb, j + 8)
                p2 = w * load8(xc, j) + v * load8(xc, j + 8)
                p3 = w * load8(xd, j) + v * load8(xd, j + 8)
                sc = hi if half else lo
                a0, a1, a2, a3 = a0 + sc * p0, a1 + sc * p1, a2 + sc * p2, a3 + sc * p3
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)


@njit(nogil=True, cache=True, inline="always")
def _dequant_xs_s(is_s, block_bytes, scales_at, row, out):
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d4 = half_at(row, o) * QUARTER
        for s in range(8):
            lo, hi = _nibble_scales(d4, u8(row, o + scales_at + s))
            for k in range(4):
                g = 4 * s + k
                store8(out, c + 8 * g, (hi if k >= 2 else lo) * _group(is_s, row, o, g))


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq2_xs(row, x):
    return _dot1_xs_s(False, IQ2_XS_BYTES, 66, row, x)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq2_xs(row, X, i0, i1, i2, i3, Y, r):
    _dot4_xs_s(False, IQ2_XS_BYTES, 66, row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq2_xs(row, out):
    _dequant_xs_s(False, IQ2_XS_BYTES, 66, row, out)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq2_s(row, x):
    return _dot1_xs_s(True, IQ2_S_BYTES, 74, row, x)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq2_s(row, X, i0, i1, i2, i3, Y, r):
    _dot4_xs_s(True, IQ2_S_BYTES, 74, row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq2_s(row, out):
    _dequant_xs_s(True, IQ2_S_BYTES, 74, row, out)
