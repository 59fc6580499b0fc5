"""Many-token path: group (token, expert) pairs by expert, and four-token tile kernels.

Dimension legend: T tokens, K top-k, P = T * K pairs, E experts, R = TILE_ROWS, n_in input columns,
G group size, ng = n_in / G. Tile arrays are laid out as in store.py (see decode.py for the one-token kernels).

`sort_by_expert` is a counting sort of the P pairs by expert, stable in token order, so each expert's tokens are
one contiguous run and its weights are read once per call however many tokens chose it.

The four-token kernels compute Y[4, R] = W_tile @ X[rows]^T for four input rows at once. Each weight is
dequantized once into a register (`s * q`) and multiplied into four accumulators, so the cost per token falls
as tokens per expert grow until the FMA units, not memory, bound it: 2 * 4 * R * n_in FLOPs per tile call. The
loop has the same shape as decode.py's (inner loop over the tile's 128 contiguous rows, inputs as broadcast
scalars) with 2 input columns per chunk: 2 columns x 4 tokens keep 8 broadcast inputs, 2 weight vectors and 4
accumulators in registers. Dequantizing whole tiles into float32 and calling BLAS (np.dot; numba's np.dot
needs SciPy, which we do not depend on) measured slower: writing the float32 tile costs as much as the
multiply at 32-64 tokens per expert.
"""

import numpy as np
from numba import njit

from .decode import FASTMATH, SIXTEENTH, widen_bf16

BLOCK_TOKENS = 4


@njit(nogil=True, cache=True)
def sort_by_expert(ids, weights, counts, starts, pair_token, pair_weight, used):
    """Counting sort of the pairs (t, k) by expert ids[t, k]; returns the number of distinct experts.

    ids int64 [T, K] (values in [0, E)), weights float32 [T, K]. Outputs, preallocated: counts int64 [E]
    (scratch), starts int64 [E + 1] (expert e's pairs are sorted positions starts[e] .. starts[e + 1]),
    pair_token int64 [P] and pair_weight float32 [P] per sorted position, used int64 [E] (experts with
    pairs, ascending, first n_used entries).
    """
    n_tokens, top_k = ids.shape
    n_experts = counts.shape[0]
    for e in range(n_experts):
        counts[e] = 0
    for t in range(n_tokens):
        for k in range(top_k):
            counts[ids[t, k]] += 1
    starts[0] = 0
    n_used = 0
    for e in range(n_experts):
        starts[e + 1] = starts[e] + counts[e]
        if counts[e] > 0:
            used[n_used] = e
            n_used += 1
        counts[e] = starts[e]  # now the next free position of expert e
    for t in range(n_tokens):
        for k in range(top_k):
            e = ids[t, k]
            p = counts[e]
            pair_token[p] = t
            pair_weight[p] = weights[t, k]
            counts[e] = p + 1
    return n_used


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_bf16(values, scales, X, i0, i1, i2, i3, Y):
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


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_int8(values, scales, X, i0, i1, i2, i3, Y):
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


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def tile4_int4(values, scales, X, i0, i1, i2, i3, Y):
    """int4 tile [ng, G/2, R] with scales [ng, R] times rows i0..i3 of X -> Y [4, R]."""
    n_groups, half, n_rows = values.shape
    group = 2 * half
    Y[:, :] = 0.0
    y0, y1, y2, y3 = Y[0], Y[1], Y[2], Y[3]
    xa, xb, xc, xd = X[i0], X[i1], X[i2], X[i3]
    for g in range(n_groups):
        qg = values[g]
        sg = scales[g]
        for k in range(half):
            c = g * group + 2 * k
            a0, a1, b0, b1 = xa[c], xa[c + 1], xb[c], xb[c + 1]
            c0, c1, d0, d1 = xc[c], xc[c + 1], xd[c], xd[c + 1]
            bk = qg[k]
            for r in range(n_rows):
                byte = np.float32(bk[r])
                hi = np.floor(byte * SIXTEENTH)
                lo = byte - np.float32(16.0) * hi
                w0 = sg[r] * (lo - np.float32(8.0))
                w1 = sg[r] * (hi - np.float32(8.0))
                y0[r] += w0 * a0 + w1 * a1
                y1[r] += w0 * b0 + w1 * b1
                y2[r] += w0 * c0 + w1 * c1
                y3[r] += w0 * d0 + w1 * d1
