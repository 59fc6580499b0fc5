"""IQ3_XXS and IQ3_S: 3-bit-ish weights as pairs of rows of a 4-wide grid times 8 signs.

Byte layouts per 256-weight block (d f16 at 0 in both; 32 groups of 8 weights, group g = two 4-wide grid rows,
the inputs [8g, 8g + 8) of the block; sub-block s = groups 4s .. 4s + 3 shares one scale):
    IQ3_XXS (98)  64 index bytes at 2 (group g: bytes 2 + 2g, 3 + 2g; 256-entry grid, values 4 .. 62), then
                  8 uint32 at 66 + 4s: bits 7k..7k+6 the 7-bit sign code of group 4s + k, bits 28..31 the scale l:
                  w = d * (l + 1/2) / 2 * grid * signs.
    IQ3_S  (110)  64 index bytes at 2 (low 8 bits), 8 bytes at 66 holding bit 8 of each index (index i: bit i & 7
                  of byte i >> 3; 512-entry grid, odd values 1 .. 15), 32 sign bytes at 74 (one per group), 4 bytes
                  at 106 of 4-bit scales (sub-block s: nibble s & 1 of byte s >> 1): w = d * (1 + 2l) * grid * signs.
"""

import numpy as np
from numba import njit

from ..spec import FASTMATH
from .lanes import half_at, hsum8, load8, load4x2, store8, u8, u32, zeros8
from .iq_tables import GRID_IQ3_S, GRID_IQ3_XXS, SIGNS7, SIGNS8

IQ3_XXS_BYTES, IQ3_S_BYTES = 98, 110
QK = 256
HALF = np.float32(0.5)


@njit(nogil=True, cache=True, inline="always")
def _sub_block(is_s, row, o, d, s):
    """(scale of sub-block s, its per-group word): IQ3_XXS's sign/scale word, or IQ3_S's high-bit byte."""
    if is_s:
        nibble = (u8(row, o + 106 + (s >> 1)) >> (4 * (s & 1))) & 15
        return d * np.float32(2 * nibble + 1), u8(row, o + 66 + s)
    aux = u32(row, o + 66 + 4 * s)
    return d * (np.float32(aux >> 28) + HALF) * HALF, aux


@njit(nogil=True, cache=True, inline="always")
def _group(is_s, row, o, word, g):
    """Group g's 8 weights before scaling; `word` is its sub-block's word from _sub_block."""
    k = g & 3
    if is_s:
        i0 = u8(row, o + 2 + 2 * g) | (((word >> (2 * k)) & 1) << 8)
        i1 = u8(row, o + 3 + 2 * g) | (((word >> (2 * k + 1)) & 1) << 8)
        return load4x2(GRID_IQ3_S, i0 * 4, i1 * 4) * load8(SIGNS8, u8(row, o + 74 + g) * 8)
    grid = load4x2(GRID_IQ3_XXS, u8(row, o + 2 + 2 * g) * 4, u8(row, o + 3 + 2 * g) * 4)
    return grid * load8(SIGNS7, ((word >> (7 * k)) & 127) * 8)


@njit(nogil=True, cache=True, inline="always")
def _dot1(is_s, block_bytes, row, x):
    acc = zeros8()
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d = half_at(row, o)
        for s in range(8):
            sc, word = _sub_block(is_s, row, o, d, s)
            p = zeros8()
            for k in range(4):
                g = 4 * s + k
                p += _group(is_s, row, o, word, g) * load8(x, c + 8 * g)
            acc += sc * p
    return hsum8(acc)


@njit(nogil=True, cache=True, inline="always")
def _dot4(is_s, block_bytes, row, X, i0, i1, i2, i3, Y, r):
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    a0, a1, a2, a3 = zeros8(), zeros8(), zeros8(), zeros8()
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d = half_at(row, o)
        for s in range(8):
            sc, word = _sub_block(is_s, row, o, d, s)
            p0, p1, p2, p3 = zeros8(), zeros8(), zeros8(), zeros8()
            for k in range(4):
                g = 4 * s + k
                w, j = _group(is_s, row, o, word, g), c + 8 * g
                p0 += w * load8(xa, j)
                p1 += w * load8(xb, j)
                p2 += w * load8(xc, j)
                p3 += w * load8(xd, j)
            a0, a1, a2, a3 = a0 + sc * p0, a1 + sc * p1, a2 + sc * p2, a3 + sc * p3
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)


@njit(nogil=True, cache=True, inline="always")
def _dequant(is_s, block_bytes, row, out):
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d = half_at(row, o)
        for s in range(8):
            sc, word = _sub_block(is_s, row, o, d, s)
            for k in range(4):
                g = 4 * s + k
                store8(out, c + 8 * g, sc * _group(is_s, row, o, word, g))


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq3_xxs(row, x):
    return _dot1(False, IQ3_XXS_BYTES, row, x)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq3_xxs(row, X, i0, i1, i2, i3, Y, r):
    _dot4(False, IQ3_XXS_BYTES, row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq3_xxs(row, out):
    _dequant(False, IQ3_XXS_BYTES, row, out)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq3_s(row, x):
    return _dot1(True, IQ3_S_BYTES, row, x)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq3_s(row, X, i0, i1, i2, i3, Y, r):
    _dot4(True, IQ3_S_BYTES, row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq3_s(row, out):
    _dequant(True, IQ3_S_BYTES, row, out)
