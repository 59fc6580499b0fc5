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

from gguf import GGMLQuantizationType
from numba import njit

from ..spec import FASTMATH
from .lanes import half_at, hsum8, load8, load8_int8, store8, zeros8

Q8_0 = int(GGMLQuantizationType.Q8_0)
BLOCK = 32
BLOCK_BYTES = 34


@njit(nogil=True, cache=True, inline="always")
def owns(code):
    return code == Q8_0


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1(code, row, x):
    acc = zeros8()
    for b in range(row.shape[0] // BLOCK_BYTES):
        off, c = b * BLOCK_BYTES + 2, b * BLOCK
        s = load8_int8(row, off) * load8(x, c) + load8_int8(row, off + 8) * load8(x, c + 8)
        s = s + load8_int8(row, off + 16) * load8(x, c + 16) + load8_int8(row, off + 24) * load8(x, c + 24)
        acc = acc + s * half_at(row, off - 2)
    return hsum8(acc)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4(code, row, X, i0, i1, i2, i3, Y, r):
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    a, b_, c_, d_ = zeros8(), zeros8(), zeros8(), zeros8()
    for b in range(row.shape[0] // BLOCK_BYTES):
        off, c = b * BLOCK_BYTES + 2, b * BLOCK
        d = half_at(row, off - 2)
        for j in range(0, BLOCK, 8):
            w = load8_int8(row, off + j) * d
            a = a + w * load8(xa, c + j)
            b_ = b_ + w * load8(xb, c + j)
            c_ = c_ + w * load8(xc, c + j)
            d_ = d_ + w * load8(xd, c + j)
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = hsum8(a), hsum8(b_), hsum8(c_), hsum8(d_)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant(code, row, out):
    for b in range(row.shape[0] // BLOCK_BYTES):
        off, c = b * BLOCK_BYTES + 2, b * BLOCK
        d = half_at(row, off - 2)
        for j in range(0, BLOCK, 8):
            store8(out, c + j, load8_int8(row, off + j) * d)
