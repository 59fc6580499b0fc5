"""IQ1_S and IQ1_M: ternary weights as rows of a 2048-entry grid of -1, 0, 1, shifted by +-1/8 and scaled.

Byte layouts per 256-weight block (32 groups of 8 weights, group g the inputs [8g, 8g + 8) of the block; the grid
index has 11 bits: a low byte and 3 high bits):
    IQ1_S (50)  d f16 at 0, 32 low index bytes at 2, 8 uint16 at 34 + 2s for sub-block s (groups 4s .. 4s + 3):
                bits 3k..3k+2 the high index bits of group 4s + k, bits 12..14 the scale l, bit 15 the sign of the
                shift: w = d * (2l + 1) * (grid + shift), shift = -1/8 if bit 15 else +1/8.
    IQ1_M (56)  32 low index bytes at 0, 16 bytes at 32 of one nibble per group (group g: nibble g & 1 of byte
                g >> 1; bits 0..2 the high index bits, bit 3 the sign of its shift), 4 uint16 at 48: bits 3k..3k+2
                of word i the scale l of the 16 weights 64i + 16k (w = d * (2l + 1) * (grid + shift)), and their
                top nibbles (bits 12..15) together the f16 d, word 0 holding its lowest 4 bits.
"""

import numpy as np
from numba import njit

from ..spec import FASTMATH
from .lanes import f32, half_at, half_to_float, hsum8, load8, store8, u8, u16, zeros8
from .iq_tables import GRID_IQ1, GRID_IQ1_EIGHTHS

IQ1_S_BYTES, IQ1_M_BYTES = 50, 56
QK = 256
SHIFTS = np.array([0.125, -0.125], np.float32)  # by the shift's sign bit: a lookup, not a branch (the bit is random)
EIGHTH = np.float32(0.125)


@njit(nogil=True, cache=True, inline="always")
def _block_scale(is_m, row, o):
    if is_m:
        w = o + 48
        bits = (u16(row, w) >> 12) | ((u16(row, w + 2) >> 8) & 0xF0) | ((u16(row, w + 4) >> 4) & 0xF00)
        return half_to_float(bits | (u16(row, w + 6) & 0xF000)) * EIGHTH  # GRID_IQ1_EIGHTHS holds 8 x weights
    return half_at(row, o)


@njit(nogil=True, cache=True, inline="always")
def _sub_block(is_m, row, o, d, s):
    """(scale of groups 4s, 4s + 1; scale of groups 4s + 2, 4s + 3; IQ1_S's uint16 of the sub-block, or 0)."""
    if is_m:
        word = u16(row, o + 48 + 2 * (s >> 1)) >> (6 * (s & 1))
        return d * np.float32(2 * (word & 7) + 1), d * np.float32(2 * ((word >> 3) & 7) + 1), np.int64(0)
    qh = u16(row, o + 34 + 2 * s)
    sc = d * np.float32(2 * ((qh >> 12) & 7) + 1)
    return sc, sc, qh


@njit(nogil=True, cache=True, inline="always")
def _group(is_m, row, o, qh, g):
    """Group g's 8 weights before scaling: its grid row plus its shift. IQ1_M's shift changes per group, so its
    rows come from GRID_IQ1_EIGHTHS (the shift's sign as a 12th index bit, values 8 x (grid + shift): one load, no
    add; 7.3 vs 6.4 G weights/s); IQ1_S's is per sub-block, and the 4x smaller table stays in L1 (9.0 vs 8.4)."""
    if is_m:
        nibble = (u8(row, o + 32 + (g >> 1)) >> (4 * (g & 1))) & 15
        return load8(GRID_IQ1_EIGHTHS, (u8(row, o + g) | (nibble << 8)) * 8)
    high = (qh >> (3 * (g & 3))) & 7
    return load8(GRID_IQ1, (u8(row, o + 2 + g) | (high << 8)) * 8) + f32(SHIFTS, qh >> 15)


@njit(nogil=True, cache=True, inline="always")
def _dot1(is_m, block_bytes, row, x):
    acc = zeros8()
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d = _block_scale(is_m, row, o)
        for s in range(8):
            lo, hi, qh = _sub_block(is_m, row, o, d, s)
            g, j = 4 * s, c + 32 * s
            acc += lo * (_group(is_m, row, o, qh, g) * load8(x, j) + _group(is_m, row, o, qh, g + 1) * load8(x, j + 8))
            acc += hi * (_group(is_m, row, o, qh, g + 2) * load8(x, j + 16)
                         + _group(is_m, row, o, qh, g + 3) * load8(x, j + 24))
    return hsum8(acc)


@njit(nogil=True, cache=True, inline="always")
def _dot4(is_m, block_bytes, row, X, i0, i1, i2, i3, Y, r):
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    a0, a1, a2, a3 = zeros8(), zeros8(), zeros8(), zeros8()
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d = _block_scale(is_m, row, o)
        for s in range(8):
            lo, hi, qh = _sub_block(is_m, row, o, d, s)
            for half in range(2):
                g = 4 * s + 2 * half
                j = c + 8 * g
                w, v = _group(is_m, row, o, qh, g), _group(is_m, row, o, qh, g + 1)
                p0 = w * load8(xa, j) + v * load8(xa, j + 8)
                p1 = w * load8(xb, j) + v * load8(xb, j + 8)
                p2 = w * load8(xc, j) + v * load8(xc, j + 8)
                p3 = w * load8(xd, j) + v * load8(xd, j + 8)
                sc = hi if half else lo
                a0, a1, a2, a3 = a0 + sc * p0, a1 + sc * p1, a2 + sc * p2, a3 + sc * p3
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)


@njit(nogil=True, cache=True, inline="always")
def _dequant(is_m, block_bytes, row, out):
    for b in range(row.shape[0] // block_bytes):
        o, c = b * block_bytes, b * QK
        d = _block_scale(is_m, row, o)
        for s in range(8):
            lo, hi, qh = _sub_block(is_m, row, o, d, s)
            for k in range(4):
                g = 4 * s + k
                store8(out, c + 8 * g, (hi if k >= 2 else lo) * _group(is_m, row, o, qh, g))


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq1_s(row, x):
    return _dot1(False, IQ1_S_BYTES, row, x)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq1_s(row, X, i0, i1, i2, i3, Y, r):
    _dot4(False, IQ1_S_BYTES, row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq1_s(row, out):
    _dequant(False, IQ1_S_BYTES, row, out)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1_iq1_m(row, x):
    return _dot1(True, IQ1_M_BYTES, row, x)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4_iq1_m(row, X, i0, i1, i2, i3, Y, r):
    _dot4(True, IQ1_M_BYTES, row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant_iq1_m(row, out):
    _dequant(True, IQ1_M_BYTES, row, out)
