"""GGUF block formats: routed experts computed on llama.cpp's quantized blocks exactly as a .gguf file stores them.

Dimension legend: n_out / n_in the output / input size of one matrix, QK weights per block (32 or 256), BB bytes
per block, B = n_in / QK * BB bytes per matrix row, R = TILE_ROWS, nt = n_out / R.

A GGUF matrix is n_out rows, each row its n_in / QK blocks back to back (ggml's ne0 = n_in innermost), and an
expert tensor stacks E such matrices. Viewed as [E, nt, R, B] (a reshape, no copy) that is the store layout of
formats/spec.py: tile t is rows [t*R, (t+1)*R), and the scales live inside the blocks (has_scales False). So a
layer of a memory-mapped GGUF is an ExpertStore as it lies on disk, and the MoE drivers (phases.py) stream it
like any other format. Nothing is expanded: each kernel decodes one row's blocks while it multiplies.

Every type here shares one numba marker class, `GGUFKernels(code)`, whose field is the ggml type code: the drivers
and these kernels are compiled once for all GGUF types (a "dynamic" quant mixes several types in one layer), and
the type is chosen per call at run time by `code`, a branch per matrix row that costs nothing next to the row.
Each family module (legacy.py, kquants.py, iquants.py) computes its own types behind the same three functions
(legacy.py describes the contract); `FORMATS` holds one FormatSpec per type, named as ggml names it ("Q4_K").
These formats are read as released: hybrid never writes them (`quantize` is None).
"""

import math
from typing import NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from numba import njit

from ..spec import FASTMATH, FormatSpec
from . import iquants, kquants, legacy

# Rows per tile: 16 rows x 7168 inputs of a 4-bit type is ~63 KB, one L2-resident tile; K2's 2048 and 7168 rows
# split into 128 and 448 tiles, enough to share among any thread count.
TILE_ROWS = 16

# What Unsloth's K2 quants use on routed experts (docs/formats.md); each needs its family module to own it.
TYPE_NAMES = ("Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS",
              "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M")


class GGUFKernels(NamedTuple):
    """numba's marker for every GGUF type (formats/spec.py); `code` is the ggml type, read at run time."""

    code: int


@njit(nogil=True, cache=True, inline="always")
def _dot1(code, row, x):
    if legacy.owns(code):
        return legacy.dot1(code, row, x)
    if kquants.owns(code):
        return kquants.dot1(code, row, x)
    return iquants.dot1(code, row, x)


@njit(nogil=True, cache=True, inline="always")
def _dot4(code, row, X, i0, i1, i2, i3, Y, r):
    if legacy.owns(code):
        legacy.dot4(code, row, X, i0, i1, i2, i3, Y, r)
    elif kquants.owns(code):
        kquants.dot4(code, row, X, i0, i1, i2, i3, Y, r)
    else:
        iquants.dot4(code, row, X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile1(kind, values, scales, x, xq, xd, y):
    """Tile [R, B] uint8 (R rows of blocks) times x [n_in] -> y [R]; `scales` is the empty placeholder, xq and xd
    are unused (the GGUF kernels multiply in float32)."""
    code = kind.code
    for r in range(values.shape[0]):
        y[r] = _dot1(code, values[r], x)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    """Tile [R, B] uint8 times rows i0..i3 of X [*, n_in] -> Y [4, R]."""
    code = kind.code
    for r in range(values.shape[0]):
        _dot4(code, values[r], X, i0, i1, i2, i3, Y, r)


@njit(nogil=True, cache=True)
def dequantize_rows(code, rows, out):
    """rows [n, B] uint8 -> out [n, n_in] float32: the weights the kernels multiply by."""
    for r in range(rows.shape[0]):
        if legacy.owns(code):
            legacy.dequant(code, rows[r], out[r])
        elif kquants.owns(code):
            kquants.dequant(code, rows[r], out[r])
        else:
            iquants.dequant(code, rows[r], out[r])


def block_geometry(name: str) -> tuple[int, int]:
    """(QK weights per block, BB bytes per block) of ggml type `name`, from gguf's own table."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]


def _spec(name: str) -> FormatSpec:
    code = int(GGMLQuantizationType[name])
    qk, bb = block_geometry(name)

    def value_shape(group, n_out, n_in):
        return (n_out // TILE_ROWS, TILE_ROWS, n_in // qk * bb)

    def scale_shape(group, n_out, n_in):
        return (n_out // TILE_ROWS, 0, 0)

    def dequantize(values, scales, group, n_out, n_in):
        out = np.empty((n_out, n_in), np.float32)
        dequantize_rows(code, np.ascontiguousarray(values).reshape(n_out, -1), out)
        return out

    return FormatSpec(
        name=name, group_sizes=(), default_group=None, tile_rows=TILE_ROWS, value_dtype="uint8", has_scales=False,
        value_shape=value_shape, scale_shape=scale_shape, input_multiple=lambda group: qk,
        bits_per_weight=lambda group: 8 * bb / qk, quantize=None, dequantize=dequantize, tile1=tile1, tile4=tile4,
        kind=GGUFKernels(code), error_bound=math.nan, output_multiple=TILE_ROWS, ggml_type=code,
    )


SPECS = tuple(_spec(name) for name in TYPE_NAMES)
