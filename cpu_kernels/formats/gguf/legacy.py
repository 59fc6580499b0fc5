"""Q8_0, the 32-weight block format of llama.cpp's first quantizers (Unsloth's "Q8_0" quant keeps it everywhere).

Block (34 bytes per 32 weights): d f16, then qs int8 [32]; weight j = d * qs[j].

Family contract (shared by every module of this package, formats/gguf/__init__.py dispatches to it): `owns(code)`
tells which ggml type codes the module computes; for one matrix row `row` (uint8, that row's blocks back to back,
n_in weights) and float32 inputs,

    dot1(code, row, x) -> float32                   row . x
    dot4(code, row, X, i0, i1, i2, i3, Y, r)         Y[k, r] = row . X[i_k] for k < 4 (each weight decoded once)
    dequant(code, row, out)                          out float32 [n_in] = the row's weights

Activations stay float32 (llama.cpp quantizes them to 8 bits; we do not, so the kernels equal a float64 matmul on
the dequantized weights to float32 rounding).
"""

import numpy as np
from gguf import GGMLQuantizationType
from numba import njit

from ..spec import FASTMATH
from .halves import f16_at

Q8_0 = int(GGMLQuantizationType.Q8_0)
BLOCK = 32
BLOCK_BYTES = 34


@njit(nogil=True, cache=True, inline="always")
def owns(code):
    return code == Q8_0


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1(code, row, x):
    q = row.view(np.int8)
    acc = np.float32(0.0)
    for b in range(row.shape[0] // BLOCK_BYTES):
        off, c = b * BLOCK_BYTES + 2, b * BLOCK
        s = np.float32(0.0)
        for j in range(BLOCK):
            s += np.float32(q[off + j]) * x[c + j]
        acc += f16_at(row, off - 2) * s
    return acc


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4(code, row, X, i0, i1, i2, i3, Y, r):
    q = row.view(np.int8)
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    a = b_ = c_ = d_ = np.float32(0.0)
    for b in range(row.shape[0] // BLOCK_BYTES):
        off, c = b * BLOCK_BYTES + 2, b * BLOCK
        sa = sb = sc = sd = np.float32(0.0)
        for j in range(BLOCK):
            w = np.float32(q[off + j])
            sa += w * xa[c + j]
            sb += w * xb[c + j]
            sc += w * xc[c + j]
            sd += w * xd[c + j]
        d = f16_at(row, off - 2)
        a += d * sa
        b_ += d * sb
        c_ += d * sc
        d_ += d * sd
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = a, b_, c_, d_


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant(code, row, out):
    q = row.view(np.int8)
    for b in range(row.shape[0] // BLOCK_BYTES):
        off, c = b * BLOCK_BYTES + 2, b * BLOCK
        d = f16_at(row, off - 2)
        for j in range(BLOCK):
            out[c + j] = d * np.float32(q[off + j])
