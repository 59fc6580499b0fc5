"""int8: symmetric 8-bit codes, one float32 scale per (row, group of G inputs), G in 32, 64, 128.

Layout (store format version 1; row tiles as in formats/tiled.py):

    values int8    [nt, ng, G, R]:  W[t*R + r, g*G + j] = values[t, g, j, r] * scales[t, g, r]
    scales float32 [nt, ng, R]

Quantizer: scale = max|w| / 127 over the group, q = round(w / scale) in [-127, 127].
"""

from typing import NamedTuple

import numpy as np
from numba import njit

from .spec import FASTMATH, FormatSpec
from .tiled import DEFAULT_GROUP_SIZE, GROUP_SIZES, TILE_ROWS, group_dequantize, group_quantize, n_tiles

QMAX = 127.0


class Int8Kernels(NamedTuple):
    """numba's marker for the int8 kernels (formats/spec.py)."""


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1_int8(kind, values, scales, x, y):
    """int8 tile [ng, G, R] with scales [ng, R] times x [ng * G] -> y [R]."""
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
def tile4_int8(kind, values, scales, X, i0, i1, i2, i3, Y):
    """int8 tile [ng, G, R] with scales [ng, R] times rows i0..i3 of X -> Y [4, R]."""
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
    bits_per_weight=lambda group: 8 + 32 / group, quantize=quantize, dequantize=dequantize, tile1=tile1_int8,
    tile4=tile4_int8, kind=Int8Kernels(), error_bound=0.02,
)
