"""Inputs quantized to int8 for the integer kernels: 32 consecutive inputs share one float32 scale.

Dimension legend: T rows (tokens, or expert pairs for the down projection), n inputs per row, nb = n / 32 blocks.

    quantize_rows(X, Xq, Xd)     X float32 [T, n] -> Xq int8 [T, n], Xd float32 [T, 2, nb]

For block b of row t: Xd[t, 0, b] = d = max|x| / 127 over the block, Xq = round(x / d) in [-127, 127], and
Xd[t, 1, b] = d * sum(Xq over the block), which int4's kernel needs to remove its codes' +8 offset. The kernels
then compute each 32-input block's dot product in integers and scale it once by d and the weight's group scale.

Error: the rounding adds at most d / 2 per input, a relative error of ~0.2-0.4 % of a matvec with Gaussian inputs,
against 0.6 % (int8 G=128) and 12 % (int4 G=128) that the weights' own rounding adds (formats/__init__.py); it is
the scheme llama.cpp uses for its quantized types (Q8_0 / Q8_K activations). A block of 32, not one scale per
weight group: one large input then coarsens 31 others, not 127.
"""

import numpy as np
from numba import njit

BLOCK = 32  # inputs per activation scale; every format's group (32, 64, 128) is a multiple of it


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract", "nsz", "arcp"})
def quantize_rows(X, Xq, Xd):
    """X float32 [T, n] -> Xq int8 [T, n], Xd float32 [T, 2, n // 32] (n a multiple of 32)."""
    n_rows, n = X.shape
    for t in range(n_rows):
        x, q = X[t], Xq[t]
        for b in range(n // BLOCK):
            c0 = b * BLOCK
            amax = np.float32(0.0)
            for j in range(BLOCK):
                a = abs(x[c0 + j])
                if a > amax or a != a:  # a NaN input stays in amax, reaches d and shows in the output
                    amax = a
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            total = 0
            for j in range(BLOCK):
                v = np.int8(np.rint(x[c0 + j] * inv))
                q[c0 + j] = v
                total += v
            Xd[t, 0, b] = d
            Xd[t, 1, b] = d * np.float32(total)


def quantized_inputs(X, wanted: bool, buffer=None, name: str = "x"):
    """(Xq, Xd) for the drivers: X [T, n] quantized when `wanted` (some format reading it has quantized_inputs),
    else zero-length arrays. `buffer(name, shape, dtype)` (KernelThreads.buffer) supplies reused scratch; without
    it the arrays are new."""
    n_rows, n = X.shape
    if not wanted:
        return np.zeros((n_rows, 0), np.int8), np.zeros((n_rows, 2, 0), np.float32)
    make = buffer or (lambda _, shape, dtype: np.empty(shape, dtype))
    Xq, Xd = make(f"{name}_q", (n_rows, n), np.int8), make(f"{name}_d", (n_rows, 2, n // BLOCK), np.float32)
    quantize_rows(X, Xq, Xd)
    return Xq, Xd
