"""The two phases of a routed-experts call, each run by every kernel thread on its own slice of output rows.

Dimension legend: T tokens, H hidden, I expert width, P pairs (sorted by expert, see prefill.sort_by_expert),
E experts, R the format's rows per tile (`tile_rows`).

1. `gate_up_phase`: for each used expert and each tile t of its gate/up matrices in the thread's slice,
   h[p, t*R:(t+1)*R] = w_p * silu(gate_tile @ x_p) * (up_tile @ x_p) for every pair p of that expert. The gate
   and up tiles of the same rows are computed back to back on the same inputs and combined at once, so h is
   written once and neither projection's output goes through memory.
2. `down_phase` (after all threads finished phase 1): for each used expert and each row tile of its down
   matrix in the thread's slice, out[token_p, rows] += down_tile @ h[p]. Threads own disjoint output rows, so
   the accumulation needs no locks.

An expert's tokens go through the four-token kernel (tile4) in blocks of four and the rest one at a
time (tile1); the tile stays in L2 between them. Threads split by tiles, so each streams its own contiguous
byte range of every expert. Both phases take the format's marker `kind` (formats/spec.py) first: `tile1`,
`tile4` and `tile_rows` look the format up in the registry while numba compiles, so there is one compiled
specialisation per format, chosen by format and not by the dtype of its arrays.

numba's on-disk cache of these drivers is keyed on this file only: after editing a format's kernels
(cpu_kernels/formats/), delete cpu_kernels/__pycache__/*.nbi and *.nbc, or the drivers keep the old kernels
compiled in (an install or reinstall rewrites every file, which invalidates the whole cache).
"""

import numpy as np
from numba import njit
from numba.extending import overload

from .formats import spec_of_kind
from .formats.spec import FASTMATH
from .prefill import BLOCK_TOKENS


def tile1(kind, values, scales, x, xq, xd, y):
    """y[R] = tile @ x with the one-token kernel of the format whose marker is `kind` (xq, xd: x quantized, for
    a format with quantized_inputs; see formats/spec.py)."""
    spec_of_kind(type(kind)).tile1(kind, values, scales, x, xq, xd, y)


def tile4(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    """Y[4, R] = tile @ X[[i0, i1, i2, i3]].T with the four-token kernel of the format whose marker is `kind`."""
    spec_of_kind(type(kind)).tile4(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y)


def tile_rows(kind):
    """R, the output rows per tile of the format whose marker is `kind`."""
    return spec_of_kind(type(kind)).tile_rows


# Inside numba, `kind` is typed by its NamedTuple class: the registry lookup happens once, at compile time.
@overload(tile1)
def _tile1_typed(kind, values, scales, x, xq, xd, y):
    kernel = spec_of_kind(kind.instance_class).tile1
    return lambda kind, values, scales, x, xq, xd, y: kernel(kind, values, scales, x, xq, xd, y)


@overload(tile4)
def _tile4_typed(kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y):
    kernel = spec_of_kind(kind.instance_class).tile4
    return lambda kind, values, scales, X, Xq, Xd, i0, i1, i2, i3, Y: kernel(kind, values, scales, X, Xq, Xd, i0, i1,
                                                                             i2, i3, Y)


@overload(tile_rows)
def _tile_rows_typed(kind):
    n_rows = spec_of_kind(kind.instance_class).tile_rows
    return lambda kind: n_rows


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _store_activation(yg, yu, k, weight, h_row, row0, n_rows):
    # h = w * silu(g) * u; silu(g) = g / (1 + exp(-g)).
    for r in range(n_rows):
        g = yg[k, r]
        h_row[row0 + r] = weight * g / (np.float32(1.0) + np.exp(-g)) * yu[k, r]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def gate_up_phase(gate_kind, up_kind, gate_values, gate_scales, up_values, up_scales, x, xq, xd, used, n_used,
                  starts, pair_token, pair_weight, h, tile_start, tile_stop, ybuf):
    """Phase 1 for tiles [tile_start, tile_stop) of I: fills h [P, I] (float32) for all pairs.

    gate_kind, up_kind: the markers of the gate's and the up projection's formats (a GGUF layer may keep them in
    two types; both have the same tile rows R); gate/up values and scales: one layer's store arrays [E, nt, ...];
    x float32 [T, H] and xq, xd its rows quantized (activations.quantize_rows; zero-length where neither format
    has quantized_inputs); used/starts/pair_token/pair_weight from sort_by_expert; ybuf float32 [2, 4, R] scratch.
    """
    n_rows_tile = tile_rows(gate_kind)
    width = h.shape[1]
    yg = ybuf[0]
    yu = ybuf[1]
    for i in range(n_used):
        e = used[i]
        p_end = starts[e + 1]
        for t in range(tile_start, tile_stop):
            gv, gs, uv, us = gate_values[e, t], gate_scales[e, t], up_values[e, t], up_scales[e, t]
            row0 = t * n_rows_tile
            n_rows = min(n_rows_tile, width - row0)
            p = starts[e]
            while p + BLOCK_TOKENS <= p_end:
                t0, t1, t2, t3 = pair_token[p], pair_token[p + 1], pair_token[p + 2], pair_token[p + 3]
                tile4(gate_kind, gv, gs, x, xq, xd, t0, t1, t2, t3, yg)
                tile4(up_kind, uv, us, x, xq, xd, t0, t1, t2, t3, yu)
                for k in range(BLOCK_TOKENS):
                    _store_activation(yg, yu, k, pair_weight[p + k], h[p + k], row0, n_rows)
                p += BLOCK_TOKENS
            while p < p_end:
                token = pair_token[p]
                tile1(gate_kind, gv, gs, x[token], xq[token], xd[token], yg[0])
                tile1(up_kind, uv, us, x[token], xq[token], xd[token], yu[0])
                _store_activation(yg, yu, 0, pair_weight[p], h[p], row0, n_rows)
                p += 1


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def down_phase(kind, down_values, down_scales, h, hq, hd, used, n_used, starts, pair_token, out, tile_start,
               tile_stop, ybuf):
    """Phase 2 for tiles [tile_start, tile_stop) of H: out[T, H] (float32) += down(h) per pair's token.

    kind: the store format's marker; down values and scales: [E, nt, ...]; h float32 [P, I] from phase 1 and
    hq, hd its rows quantized (as gate_up_phase's xq, xd); ybuf float32 [2, 4, R] scratch.
    """
    n_rows_tile = tile_rows(kind)
    hidden = out.shape[1]
    y = ybuf[0]
    for i in range(n_used):
        e = used[i]
        p_end = starts[e + 1]
        for t in range(tile_start, tile_stop):
            dv, ds = down_values[e, t], down_scales[e, t]
            row0 = t * n_rows_tile
            n_rows = min(n_rows_tile, hidden - row0)
            p = starts[e]
            while p + BLOCK_TOKENS <= p_end:
                tile4(kind, dv, ds, h, hq, hd, p, p + 1, p + 2, p + 3, y)
                for k in range(BLOCK_TOKENS):
                    o = out[pair_token[p + k]]
                    for r in range(n_rows):
                        o[row0 + r] += y[k, r]
                p += BLOCK_TOKENS
            while p < p_end:
                tile1(kind, dv, ds, h[p], hq[p], hd[p], y[0])
                o = out[pair_token[p]]
                for r in range(n_rows):
                    o[row0 + r] += y[0, r]
                p += 1


@njit(nogil=True, cache=True)
def bf16_rows_to_f32(src, dst):
    """dst[T, H] float32 = src[T, H] bf16 bits (uint16), exact."""
    flat_src = src.reshape(-1)
    flat_dst = dst.reshape(-1).view(np.uint32)
    for i in range(flat_src.shape[0]):
        flat_dst[i] = np.uint32(flat_src[i]) << 16


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dense_phase(kind, values, scales, X, Xq, Xd, Y, tile_start, tile_stop, ybuf):
    """Y[T, n_out] = X[T, n_in] @ W.T for W's tiles [tile_start, tile_stop): one matrix (a projection outside the
    routed experts, kept in its GGUF blocks), every token through each tile while it sits in L2.

    kind: the format's marker; values/scales: the matrix's [nt, ...] arrays; X, Y float32; Xq, Xd: X quantized
    (as gate_up_phase's xq, xd); ybuf float32 [4, R].
    """
    n_rows_tile = tile_rows(kind)
    n_out, n_tokens = Y.shape[1], X.shape[0]
    for t in range(tile_start, tile_stop):
        row0 = t * n_rows_tile
        n_rows = min(n_rows_tile, n_out - row0)
        p = 0
        while p + BLOCK_TOKENS <= n_tokens:
            tile4(kind, values[t], scales[t], X, Xq, Xd, p, p + 1, p + 2, p + 3, ybuf)
            for k in range(BLOCK_TOKENS):
                for r in range(n_rows):
                    Y[p + k, row0 + r] = ybuf[k, r]
            p += BLOCK_TOKENS
        while p < n_tokens:
            tile1(kind, values[t], scales[t], X[p], Xq[p], Xd[p], ybuf[0])
            for r in range(n_rows):
                Y[p, row0 + r] = ybuf[0, r]
            p += 1
