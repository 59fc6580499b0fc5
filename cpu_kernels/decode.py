"""One-token tile kernels: y[R] = W_tile @ x for one row tile of one expert's matrix, per format.

Dimension legend: R = TILE_ROWS rows per tile, n_in input columns, G group size, ng = n_in / G groups.
Tile arrays are one expert's tile as laid out in store.py: bf16 [n_in, R] uint16; int8 [ng, G, R] int8 with
scales [ng, R]; int4 [ng, G/2, R] uint8 with scales [ng, R]. x is float32 [n_in], y float32 [R] (overwritten).

These run when an expert has fewer than 4 tokens in a call (decode), so they are bound by how fast weights
stream from memory: each weight byte is used once. What bounds them: bytes of the tile (R * n_in * bits / 8
plus R * ng * 4 bytes of scales).

Why the loops have this shape. The innermost loop runs over the tile's R = 128 rows, which are contiguous in
memory, with the input element(s) as broadcast scalars: LLVM turns it into 16-lane AVX-512 code with no
horizontal reductions. The per-(row, group) scale varies along that same row axis, so it is one contiguous
vector load and one multiply, applied per chunk of 4 (int8) or 8 (int4) input columns -- the chunk amortises
the load/store of y. The obvious alternative, a dot product along each row with a scalar accumulator, must
either reduce horizontally once per group (32..128 elements) or leave a short group loop that LLVM does not
vectorise (its main vector body wants 64 elements); both measured 3-10x slower than this shape.
int4 codes are decoded in float (byte -> float, high nibble = floor(byte / 16), low nibble = byte - 16 * high)
because numba promotes integer shifts and masks to int64, which vectorises 8 lanes wide and ran at half the
speed; the -8 offset and the low-nibble subtraction are folded into scalars outside the row loop. bf16 widens
to float32 by shifting its bits into the high half of a uint32 and reinterpreting (`widen_bf16`).
All loops use float32 accumulators: integer accumulation measured slower on this machine.
"""

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

# Reassociation lets LLVM vectorise the float sums; no NaN/inf assumptions, so bad weights still show up.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
SIXTEENTH = np.float32(1.0 / 16.0)


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
def tile1_bf16(values, scales, x, y):
    """bf16 tile [n_in, R] uint16 times x [n_in] -> y [R]; `scales` is unused (bf16 has none)."""
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
def tile1_int8(values, scales, x, y):
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
def tile1_int4(values, scales, x, y):
    """int4 tile [ng, G/2, R] (two codes per byte) with scales [ng, R] times x [ng * G] -> y [R]."""
    n_groups, half, n_rows = values.shape
    group = 2 * half
    for r in range(n_rows):
        y[r] = 0.0
    for g in range(n_groups):
        qg = values[g]
        sg = scales[g]
        for k in range(0, half, 4):
            c = g * group + 2 * k
            # byte b = lo + 16 * hi; lo * xl + hi * xh = b * xl + hi * (xh - 16 * xl); codes are value + 8.
            xl0 = x[c]
            xh0 = x[c + 1] - np.float32(16.0) * x[c]
            xl1 = x[c + 2]
            xh1 = x[c + 3] - np.float32(16.0) * x[c + 2]
            xl2 = x[c + 4]
            xh2 = x[c + 5] - np.float32(16.0) * x[c + 4]
            xl3 = x[c + 6]
            xh3 = x[c + 7] - np.float32(16.0) * x[c + 6]
            offset = np.float32(8.0) * (x[c] + x[c + 1] + x[c + 2] + x[c + 3] + x[c + 4] + x[c + 5] + x[c + 6] + x[c + 7])
            b0 = qg[k]
            b1 = qg[k + 1]
            b2 = qg[k + 2]
            b3 = qg[k + 3]
            for r in range(n_rows):
                a0 = np.float32(b0[r])
                a1 = np.float32(b1[r])
                a2 = np.float32(b2[r])
                a3 = np.float32(b3[r])
                y[r] += sg[r] * (
                    (a0 * xl0 + np.floor(a0 * SIXTEENTH) * xh0 + a1 * xl1 + np.floor(a1 * SIXTEENTH) * xh1)
                    + (a2 * xl2 + np.floor(a2 * SIXTEENTH) * xh2 + a3 * xl3 + np.floor(a3 * SIXTEENTH) * xh3)
                    - offset
                )
