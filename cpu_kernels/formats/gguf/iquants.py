"""The i-quants: IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M (256-weight super-blocks).

What they share: each block is one f16 scale `d` (IQ1_M spreads it over its scale words), small per-sub-block
scales, and weights coded in groups of 8 (IQ4_XS: 4-bit codes into a 16-level table; the others: an index into a
fixed grid of 8 or 2 x 4 values, plus 8 sign bits or a +-1/8 shift). The grids are the formats' definition and are
built from gguf-py at import (iq_tables.py). Each module below documents its types' byte layouts:

    iq_4bit.py  IQ4_XS                   iq_3bit.py  IQ3_XXS, IQ3_S
    iq_2bit.py  IQ2_XXS, IQ2_XS, IQ2_S   iq_1bit.py  IQ1_S, IQ1_M

How they compute (lanes.py): a group of 8 weights is a vector — one grid-row load, one sign-row load, one
multiply — against 8 consecutive float32 inputs; the sum over a run sharing a sub-block scale stays in vector lanes
and is scaled once. Activations stay float32 (llama.cpp rounds them to 8 bits), so the kernels equal a float64
matmul on gguf-py's dequantized weights to float32 rounding.

Speed: these kernels are compute-bound, not memory-bound. Each 8 weights cost ~10 instructions (index bits, a grid
row load and int8 convert, a sign row, one FMA), ~7-9 G weights/s per Zen 3 core: 1.5-2.5 GB/s of blocks per core
for the 1.6-3.4 bit types and ~4 GB/s for IQ4_XS, against ~20 GB/s of read bandwidth per core. Reaching bandwidth
would take llama.cpp's route, integer dot products on activations rounded to 8 bits.

This module is the family's entry (legacy.py describes the contract): `owns` and the three kernels dispatch on the
ggml type code; a code this family does not own computes nothing (dot1 returns 0.0).
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from ..spec import FASTMATH
from . import iq_1bit, iq_2bit, iq_3bit, iq_4bit

IQ4_XS, IQ3_XXS, IQ3_S = int(T.IQ4_XS), int(T.IQ3_XXS), int(T.IQ3_S)
IQ2_XXS, IQ2_XS, IQ2_S = int(T.IQ2_XXS), int(T.IQ2_XS), int(T.IQ2_S)
IQ1_S, IQ1_M = int(T.IQ1_S), int(T.IQ1_M)


@njit(nogil=True, cache=True, inline="always")
def owns(code):
    return (code == IQ4_XS or code == IQ3_XXS or code == IQ3_S or code == IQ2_XXS or code == IQ2_XS
            or code == IQ2_S or code == IQ1_S or code == IQ1_M)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1(code, row, x):
    if code == IQ4_XS:
        return iq_4bit.dot1_iq4_xs(row, x)
    if code == IQ3_XXS:
        return iq_3bit.dot1_iq3_xxs(row, x)
    if code == IQ3_S:
        return iq_3bit.dot1_iq3_s(row, x)
    if code == IQ2_XXS:
        return iq_2bit.dot1_iq2_xxs(row, x)
    if code == IQ2_XS:
        return iq_2bit.dot1_iq2_xs(row, x)
    if code == IQ2_S:
        return iq_2bit.dot1_iq2_s(row, x)
    if code == IQ1_S:
        return iq_1bit.dot1_iq1_s(row, x)
    if code == IQ1_M:
        return iq_1bit.dot1_iq1_m(row, x)
    return np.float32(0.0)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4(code, row, X, i0, i1, i2, i3, Y, r):
    if code == IQ4_XS:
        iq_4bit.dot4_iq4_xs(row, X, i0, i1, i2, i3, Y, r)
    elif code == IQ3_XXS:
        iq_3bit.dot4_iq3_xxs(row, X, i0, i1, i2, i3, Y, r)
    elif code == IQ3_S:
        iq_3bit.dot4_iq3_s(row, X, i0, i1, i2, i3, Y, r)
    elif code == IQ2_XXS:
        iq_2bit.dot4_iq2_xxs(row, X, i0, i1, i2, i3, Y, r)
    elif code == IQ2_XS:
        iq_2bit.dot4_iq2_xs(row, X, i0, i1, i2, i3, Y, r)
    elif code == IQ2_S:
        iq_2bit.dot4_iq2_s(row, X, i0, i1, i2, i3, Y, r)
    elif code == IQ1_S:
        iq_1bit.dot4_iq1_s(row, X, i0, i1, i2, i3, Y, r)
    elif code == IQ1_M:
        iq_1bit.dot4_iq1_m(row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant(code, row, out):
    if code == IQ4_XS:
        iq_4bit.dequant_iq4_xs(row, out)
    elif code == IQ3_XXS:
        iq_3bit.dequant_iq3_xxs(row, out)
    elif code == IQ3_S:
        iq_3bit.dequant_iq3_s(row, out)
    elif code == IQ2_XXS:
        iq_2bit.dequant_iq2_xxs(row, out)
    elif code == IQ2_XS:
        iq_2bit.dequant_iq2_xs(row, out)
    elif code == IQ2_S:
        iq_2bit.dequant_iq2_s(row, out)
    elif code == IQ1_S:
        iq_1bit.dequant_iq1_s(row, out)
    elif code == IQ1_M:
        iq_1bit.dequant_iq1_m(row, out)
