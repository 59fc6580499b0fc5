"""bf16: the weights' bfloat16 bits, no scales; exact for bf16 checkpoints and FP8 ones (FP8 fits in bf16).

Layout (store format version 1; row tiles as in formats/tiled.py):

    values uint16 [nt, n_in, R]:  values[t, c, r] = bf16 bits of W[t*R + r, c]
    no scales (in memory an empty [nt, 0, 0] float32 placeholder the kernels can index)

The kernels widen bf16 to float32 by shifting its bits into the high half of a uint32 and reinterpreting
(`widen_bf16`); tile1 unrolls the input by 4 columns, tile4 by 2, and n_in must be a multiple of 8.
"""

from typing import NamedTuple

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

from ..floats import bf16_to_f32, f32_to_bf16
from .spec import FASTMATH, FormatSpec
from .tiled import TILE_ROWS, n_tiles, padded_rows

INPUT_MULTIPLE = 8


class Bf16Kernels(NamedTuple):
    """numba's marker for the bf16 kernels (formats/spec.py)."""


@intrinsic
def widen_bf16(typingctx, bits):
    """bf16 bits (uint16) -> float32, exact: widen to 32 bits, shift into the high half, reinterpret."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], context.get_value_type(types.uint32))
        shifted = builder.shl(wide, context.get_constant(types.uint32, 16))
        return builder.bitcast(shifted, context.get_value_type(types.float32))

    return types.float32(types.uint16), codegen


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1_bf16(kind, values, scales, x, xq, xd, y):
    """bf16 tile [n_in, R] uint16 times x [n_in] -> y [R]; `scales`, xq and xd are unused (bf16 has no scales)."""
    n_in, n_rows = values.shape
    for r in range(n_rows):
        y[r] = 0.0
    for c in range(0, n_in, 4):
        x0 = x[c]
        x1 = x[c + 1]
        x2 = x[c + 2]
        x3 = x[c + 3]
        w0 = values[c]
        w1 = values[c + 1]
        w2 = values[c + 2]
        w3 = values[c + 3]
        for r in range(n_rows):
            y[r] += (
                widen_bf16(w0[r]) * x0
                + widen_bf16(w1[r]) * x1
                + widen_bf16(w2[r]) * x2
                + widen_bf16(w3[r]) * x3
            )


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_bf16(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    """bf16 tile [n_in, R] times rows i0..i3 of X [*, n_in] -> Y [4, R]; `scales` is unused."""
    n_in, n_rows = values.shape
    Y[:, :] = 0.0
    y0, y1, y2, y3 = Y[0], Y[1], Y[2], Y[3]
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    for c in range(0, n_in, 2):
        a0, a1, b0, b1 = xa[c], xa[c + 1], xb[c], xb[c + 1]
        c0, c1, d0, d1 = xc[c], xc[c + 1], xd[c], xd[c + 1]
        v0 = values[c]
        v1 = values[c + 1]
        for r in range(n_rows):
            w0 = widen_bf16(v0[r])
            w1 = widen_bf16(v1[r])
            y0[r] += w0 * a0 + w1 * a1
            y1[r] += w0 * b0 + w1 * b1
            y2[r] += w0 * c0 + w1 * c1
            y3[r] += w0 * d0 + w1 * d1


def value_shape(group, n_out: int, n_in: int) -> tuple:
    return (n_tiles(n_out), n_in, TILE_ROWS)


def scale_shape(group, n_out: int, n_in: int) -> tuple:
    return (n_tiles(n_out), 0, 0)


def quantize(w: np.ndarray, group) -> tuple[np.ndarray, np.ndarray]:
    """w [n_out, n_in] -> (values [nt, n_in, R], empty scales); bf16 bits are kept as given, float32 is rounded."""
    n_out, n_in = w.shape
    nt = n_tiles(n_out)
    bits = np.pad(w, ((0, nt * TILE_ROWS - n_out), (0, 0))) if w.dtype == np.uint16 else f32_to_bf16(padded_rows(w))
    values = bits.reshape(nt, TILE_ROWS, n_in).transpose(0, 2, 1)
    return np.ascontiguousarray(values), np.zeros((nt, 0, 0), np.float32)


def dequantize(values: np.ndarray, scales: np.ndarray, group, n_out: int, n_in: int) -> np.ndarray:
    nt = n_tiles(n_out)
    w = bf16_to_f32(values).reshape(nt, n_in, TILE_ROWS).transpose(0, 2, 1)
    return np.ascontiguousarray(w.reshape(nt * TILE_ROWS, n_in)[:n_out])


SPEC = FormatSpec(
    name="bf16", group_sizes=(), default_group=None, tile_rows=TILE_ROWS, value_dtype="uint16", has_scales=False,
    value_shape=value_shape, scale_shape=scale_shape, input_multiple=lambda group: INPUT_MULTIPLE,
    bits_per_weight=lambda group: 16.0, quantize=quantize, dequantize=dequantize, tile1=tile1_bf16,
    tile4=tile4_bf16, kind=Bf16Kernels(), error_bound=0.003,
)
