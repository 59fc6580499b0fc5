"""The two phases of a routed-experts call, each run by every kernel thread on its own slice of output rows.

Dimension legend: T tokens, H hidden, I expert width, P pairs (sorted by expert, see prefill.sort_by_expert),
E experts, R = TILE_ROWS.

1. `gate_up_phase`: for each used expert and each row tile t of its gate/up matrices in the thread's slice,
   h[p, t*R:(t+1)*R] = w_p * silu(gate_tile @ x_p) * (up_tile @ x_p) for every pair p of that expert. The gate
   and up tiles of the same rows are computed back to back on the same inputs and combined at once, so h is
   written once and neither projection's output goes through memory.
2. `down_phase` (after all threads finished phase 1): for each used expert and each row tile of its down
   matrix in the thread's slice, out[token_p, rows] += down_tile @ h[p]. Threads own disjoint output rows, so
   the accumulation needs no locks.

An expert's tokens go through the four-token kernels (prefill.py) in blocks of four and the rest one at a
time (decode.py); the tile stays in L2 between them. Threads split by tiles, so each streams its own
contiguous byte range of every expert. `tile1` / `tile4` pick the format's kernel from the values dtype at
compile time: one compiled specialisation per format.

numba's on-disk cache of these drivers is keyed on this file only: after editing decode.py or prefill.py, delete
cpu_kernels/__pycache__/*.nbi and *.nbc, or the drivers keep the old kernels compiled in (an install or
reinstall rewrites every file, which invalidates the whole cache).
"""

import numpy as np
from numba import njit, types
from numba.extending import overload

from .decode import FASTMATH, tile1_bf16, tile1_int4, tile1_int8
from .prefill import BLOCK_TOKENS, tile4_bf16, tile4_int4, tile4_int8

# Values dtype -> format kernel: uint16 is bf16, int8 is int8, uint8 is int4 (packed pairs).
_TILE1 = {np.dtype(np.uint16): tile1_bf16, np.dtype(np.int8): tile1_int8, np.dtype(np.uint8): tile1_int4}
_TILE4 = {np.dtype(np.uint16): tile4_bf16, np.dtype(np.int8): tile4_int8, np.dtype(np.uint8): tile4_int4}
_NUMBA_DTYPE = {types.uint16: np.dtype(np.uint16), types.int8: np.dtype(np.int8), types.uint8: np.dtype(np.uint8)}


def tile1(values, scales, x, y):
    """y[R] = tile @ x for a tile of any format (dispatch on values.dtype; at compile time inside numba)."""
    _TILE1[values.dtype](values, scales, x, y)


def tile4(values, scales, X, i0, i1, i2, i3, Y):
    """Y[4, R] = tile @ X[[i0, i1, i2, i3]].T for a tile of any format (dispatch as in tile1)."""
    _TILE4[values.dtype](values, scales, X, i0, i1, i2, i3, Y)


@overload(tile1)
def _tile1_typed(values, scales, x, y):
    kernel = _TILE1[_NUMBA_DTYPE[values.dtype]]
    return lambda values, scales, x, y: kernel(values, scales, x, y)


@overload(tile4)
def _tile4_typed(values, scales, X, i0, i1, i2, i3, Y):
    kernel = _TILE4[_NUMBA_DTYPE[values.dtype]]
    return lambda values, scales, X, i0, i1, i2, i3, Y: kernel(values, scales, X, i0, i1, i2, i3, Y)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _store_activation(yg, yu, k, weight, h_row, row0, n_rows):
    # h = w * silu(g) * u; silu(g) = g / (1 + exp(-g)).
    for r in range(n_rows):
        g = yg[k, r]
        h_row[row0 + r] = weight * g / (np.float32(1.0) + np.exp(-g)) * yu[k, r]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def gate_up_phase(gate_values, gate_scales, up_values, up_scales, x, used, n_used, starts, pair_token,
                  pair_weight, h, tile_start, tile_stop, ybuf):
    """Phase 1 for tiles [tile_start, tile_stop) of I: fills h [P, I] (float32) for all pairs.

    gate/up values and scales: one layer's store arrays [E, nt, ...]; x float32 [T, H]; used/starts/pair_token/
    pair_weight from sort_by_expert; ybuf float32 [2, 4, R] this thread's scratch.
    """
    n_rows_tile = gate_values.shape[-1]
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
                tile4(gv, gs, x, t0, t1, t2, t3, yg)
                tile4(uv, us, x, t0, t1, t2, t3, yu)
                for k in range(BLOCK_TOKENS):
                    _store_activation(yg, yu, k, pair_weight[p + k], h[p + k], row0, n_rows)
                p += BLOCK_TOKENS
            while p < p_end:
                tile1(gv, gs, x[pair_token[p]], yg[0])
                tile1(uv, us, x[pair_token[p]], yu[0])
                _store_activation(yg, yu, 0, pair_weight[p], h[p], row0, n_rows)
                p += 1


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def down_phase(down_values, down_scales, h, used, n_used, starts, pair_token, out, tile_start, tile_stop, ybuf):
    """Phase 2 for tiles [tile_start, tile_stop) of H: out[T, H] (float32) += down(h) per pair's token.

    down values and scales: [E, nt, ...]; h float32 [P, I] from phase 1; ybuf float32 [2, 4, R] scratch.
    """
    n_rows_tile = down_values.shape[-1]
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
                tile4(dv, ds, h, p, p + 1, p + 2, p + 3, y)
                for k in range(BLOCK_TOKENS):
                    o = out[pair_token[p + k]]
                    for r in range(n_rows):
                        o[row0 + r] += y[k, r]
                p += BLOCK_TOKENS
            while p < p_end:
                tile1(dv, ds, h[p], y[0])
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
