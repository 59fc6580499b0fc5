"""Reading the little-endian fields of a GGUF block inside numba: f16 scales, and int8 / int16 views of bytes.

GGUF blocks keep their scales as IEEE half floats (`d`, `dmin`); numba has no float16 arithmetic, so the bits
are widened by hand. One conversion per block (or per sub-block) costs nothing next to the 32-256 weights it
scales.
"""

import math

import numpy as np
from numba import njit


@njit(nogil=True, cache=True, inline="always")
def f16_at(row, offset):
    """The IEEE half float stored little-endian at row[offset:offset + 2] (row uint8), as float32. Exact."""
    bits = np.int64(row[offset]) | (np.int64(row[offset + 1]) << 8)
    sign = -1.0 if bits & 0x8000 else 1.0
    exponent = (bits >> 10) & 0x1F
    mantissa = bits & 0x3FF
    if exponent == 0:
        return np.float32(sign * math.ldexp(float(mantissa), -24))
    if exponent == 31:
        return np.float32(sign * (math.inf if mantissa == 0 else math.nan))
    return np.float32(sign * math.ldexp(float(mantissa | 0x400), exponent - 25))


@njit(nogil=True, cache=True, inline="always")
def u16_at(row, offset):
    """The little-endian uint16 at row[offset:offset + 2]."""
    return np.int64(row[offset]) | (np.int64(row[offset + 1]) << 8)


@njit(nogil=True, cache=True, inline="always")
def i8_at(row, offset):
    """row[offset] (uint8) read as a two's-complement int8, widened to int64."""
    v = np.int64(row[offset])
    return v - 256 if v >= 128 else v
