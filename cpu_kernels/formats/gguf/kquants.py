"""The K-quants Q2_K..Q6_K and the ternary TQ1_0 / TQ2_0: 256-weight super-blocks computed as a .gguf stores them.

Block layouts (byte offsets in one block; w = weight 0..255 of the block; f16 little-endian; "bits s.. of b" =
(b >> s) & mask):

    Q2_K  84 B: scales[16] @0, qs[64] @16, d @80, dmin @82. Sub-block k = w // 16: scale scales[k] & 15, min
          scales[k] >> 4. w = 128h + 32s + j: code = bits 2s..2s+1 of qs[32h + j]; weight d*scale*code - dmin*min.
    Q3_K 110 B: hmask[32] @0, qs[64] @32, scales[12] @96, d @108. Sub-block k = w // 16, 6-bit scale: low 4 bits
          = bits 4(k // 8).. of scales[k % 8], high 2 = bits 2(k // 4).. of scales[8 + k % 4], minus 32.
          w = 128h + 32s + j: code = bits 2s.. of qs[32h + j] + 4 * bit (4h + s) of hmask[j]; weight
          d*scale*(code - 4).
    Q4_K 144 B: d @0, dmin @2, scales[12] @4, qs[128] @16. Sub-block k = w // 32, 6-bit scale and min: k < 4:
          scales[k] & 63, scales[k + 4] & 63; k >= 4: (scales[k + 4] & 15) | (scales[k - 4] >> 6) << 4,
          (scales[k + 4] >> 4) | (scales[k] >> 6) << 4. w = 64c + 32t + j: code = bits 4t.. of qs[32c + j];
          weight d*scale*code - dmin*min.
    Q5_K 176 B: as Q4_K with qh[32] @16 and qs[128] @48; code += 16 * bit (2c + t) of qh[j].
    Q6_K 210 B: ql[128] @0, qh[64] @128, scales int8[16] @192, d @208. Sub-block k = w // 16. w = 128h + 32t + j:
          code = bits 4(t // 2).. of ql[64h + 32(t % 2) + j] + 16 * bits 2t.. of qh[32h + j]; weight
          d*scale*(code - 32).
    TQ1_0 54 B: qs[48] @0, qh[4] @48, d @52. Base-3 digits: digit p of byte q is floor(3 ((q 3^p) mod 256) / 256);
          weight d*(digit - 1). w = 32p + j (p < 5) from qs[j]; 160 + 16p + j (p < 5) from qs[32 + j];
          240 + 4p + j (p < 4) from qh[j].
    TQ2_0 66 B: qs[64] @0, d @64. w = 128h + 32s + j: code = bits 2s.. of qs[32h + j]; weight d*(code - 1).

How they compute: a type's loop walks its code bytes 8 at a time. Each 8-byte chunk is widened once to eight
32-bit lanes and every field it holds is cut from that register (`_planes`: shift, mask, convert); widening
per field, or masking the bytes before widening, ran at half the speed. A field of 8 lanes is a group of 8
consecutive weights in one sub-block: weight = code * a + b with the sub-block's (a, b), then one multiply-add
with 8 consecutive inputs. A block's sub-block scales are decoded as lanes too (`_scales_*`) and each (a, b) is
picked once for the two chunks that share it. Numba's scalar integers are int64, which vectorises four times
narrower, so the lanes are LLVM vectors (lanes.Lanes8) built by the intrinsics below.

One loop per type serves the three entry points: its `mode` (a literal, so each mode compiles to its own
branch-free copy) says what `_eat` does with a chunk's four groups: DOT1 adds them into four independent
accumulators, DOT4 multiplies each with four inputs, DEQUANT stores them. Activations stay float32: the kernels
equal a float64 matmul on the dequantized weights to float32 rounding (llama.cpp rounds them to 8 bits instead).
Measured on one Zen 3 core (rows of 7168 in L2): 6-12 G weights/s by type, so decode is compute-bound, not
bandwidth-bound, for every type here.

Longer than the ~400 lines a file should be: seven block formats, each with its loop, and the vector
intrinsics they share; splitting them would scatter one decode scheme over several files.
"""

import numpy as np
from gguf import GGMLQuantizationType as T
from llvmlite import ir
from numba import literally, njit
from numba.core import cgutils, types
from numba.core.errors import TypingError
from numba.extending import intrinsic

from ..spec import FASTMATH
from .lanes import half_at, hsum8, lanes8, load8, store8, zeros8

Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = int(T.Q2_K), int(T.Q3_K), int(T.Q4_K), int(T.Q5_K), int(T.Q6_K)
TQ1_0, TQ2_0 = int(T.TQ1_0), int(T.TQ2_0)
QK = 256  # weights per super-block
DOT1, DOT4, DEQUANT = 1, 4, 0  # what a type's loop does with its weights (`_eat`)


# --- 8 codes per lane vector -------------------------------------------------------------------------------------

_I32x8 = ir.VectorType(ir.IntType(32), 8)
_F32x8 = ir.VectorType(ir.FloatType(), 8)


def _wide_bytes(context, builder, arr_type, arr, i, n=8):
    """arr[i : i + n] (uint8, C-contiguous 1-D) zero-extended to eight int32 lanes (n = 4: the 4 bytes twice)."""
    if not (isinstance(arr_type, types.Array) and arr_type.ndim == 1 and arr_type.layout == "C"
            and arr_type.dtype == types.uint8):
        raise TypingError(f"needs a C-contiguous 1-D uint8 array, got {arr_type}")
    data = context.make_array(arr_type)(context, builder, arr).data
    ptr = builder.bitcast(builder.gep(data, [i]), ir.VectorType(ir.IntType(8), n).as_pointer())
    v = builder.load(ptr, align=1)
    if n == 4:
        v = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), 8), [0, 1, 2, 3] * 2))
    return builder.zext(v, _I32x8)


def _splat(builder, value):
    v = builder.insert_element(ir.Constant(_I32x8, ir.Undefined), builder.trunc(value, ir.IntType(32)),
                               ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, v, ir.Constant(_I32x8, [0] * 8))


@intrinsic
def _planes(typingctx, row, i, n, step, mask, j, hshift, hstep, hmask, up):
    """n lanes vectors (n a literal): plane p holds, for l < 8,
        ((row[i + l] >> step p) & mask) | (((row[j + l] >> (hshift + hstep p)) & hmask) << up)
    as float32: the codes of 8 consecutive weights. hmask = 0 reads no high bits."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    count = n.literal_value

    def codegen(context, builder, sig, args):
        row_t = sig.args[0]
        row_v, i_v, _, step_v, mask_v, j_v, hshift_v, hstep_v, hmask_v, up_v = args
        lo, hi = _wide_bytes(context, builder, row_t, row_v, i_v), _wide_bytes(context, builder, row_t, row_v, j_v)
        step, mask, hstep, hmask = (_splat(builder, v) for v in (step_v, mask_v, hstep_v, hmask_v))
        hi = builder.lshr(hi, _splat(builder, hshift_v))  # one uniform shift; the per-plane shifts are constants
        up = _splat(builder, up_v)
        out = []
        for p in range(count):
            pc = _splat(builder, ir.Constant(ir.IntType(64), p))
            code = builder.and_(builder.lshr(lo, builder.mul(step, pc)), mask)
            high = builder.and_(builder.lshr(hi, builder.mul(hstep, pc)), hmask)
            out.append(builder.sitofp(builder.or_(code, builder.shl(high, up)), _F32x8))
        return context.make_tuple(builder, sig.return_type, out)

    return types.UniTuple(lanes8, count)(row, i, n, step, mask, j, hshift, hstep, hmask, up), codegen


def _digits(builder, q, next_scale, prev_scale):
    """floor(q * next_scale) - 3 floor(q * prev_scale), lane-wise (float32): a base-3 digit of q."""
    floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32x8, [_F32x8]), "llvm.floor.v8f32")
    hi = builder.call(floor, [builder.fmul(q, ir.Constant(_F32x8, next_scale))])
    lo = builder.call(floor, [builder.fmul(q, ir.Constant(_F32x8, prev_scale))])
    return builder.fsub(hi, builder.fmul(lo, ir.Constant(_F32x8, [3.0] * 8)))


@intrinsic
def _trits(typingctx, row, i, n):
    """n lanes vectors (n a literal): digit p < n of each byte row[i + l], l < 8 (TQ1_0's qs).
    Digit p of q is floor(3 ((q 3^p) mod 256) / 256) = F(p + 1) - 3 F(p) with F(p) = floor(q 3^p / 256), all
    exact in float32 (q 3^p < 2^16)."""
    if not isinstance(n, types.IntegerLiteral):
        return None
    count = n.literal_value

    def codegen(context, builder, sig, args):
        q = builder.sitofp(_wide_bytes(context, builder, sig.args[0], args[0], args[1]), _F32x8)
        out = [_digits(builder, q, [3 ** (p + 1) / 256] * 8, [3 ** p / 256 if p else 0.0] * 8) for p in range(count)]
        return context.make_tuple(builder, sig.return_type, out)

    return types.UniTuple(lanes8, count)(row, i, n), codegen


@intrinsic
def _trits_tail(typingctx, row, i):
    """TQ1_0's last 16 weights from the 4 bytes row[i:i + 4], as two lanes vectors: digits 0 | 1, then 2 | 3."""

    def codegen(context, builder, sig, args):
        q = builder.sitofp(_wide_bytes(context, builder, sig.args[0], args[0], args[1], n=4), _F32x8)
        first = _digits(builder, q, [3 / 256] * 4 + [9 / 256] * 4, [0.0] * 4 + [3 / 256] * 4)
        second = _digits(builder, q, [27 / 256] * 4 + [81 / 256] * 4, [9 / 256] * 4 + [27 / 256] * 4)
        return context.make_tuple(builder, sig.return_type, [first, second])

    return types.UniTuple(lanes8, 2)(row, i), codegen


@intrinsic
def _lane(typingctx, v, k):
    """Lane k of a Lanes8 (the scale of one sub-block), as float32."""
    if v != lanes8 or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], builder.trunc(args[1], ir.IntType(32)))

    return types.float32(lanes8, k), codegen


def _lanes_i32(values):
    return ir.Constant(_I32x8, list(values))


@intrinsic
def _scales_k4(typingctx, row, i):
    """Q4_K / Q5_K: (scale, min) of sub-blocks 0..7 as two Lanes8, from the 12 packed bytes row[i:i + 12]."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        u8x16 = ir.VectorType(ir.IntType(8), 16)
        b = builder.load(builder.bitcast(builder.gep(data, [args[1]]), u8x16.as_pointer()), align=1)

        def pick(idx):
            return builder.zext(builder.shuffle_vector(b, b, _lanes_i32(idx)), _I32x8)


        low, high = [0] * 4 + [48] * 4, [63] * 4 + [15] * 4
        six = _lanes_i32([6] * 8)
        top_sc = builder.and_(builder.shl(builder.lshr(pick([0, 1, 2, 3, 0, 1, 2, 3]), six), _lanes_i32([4] * 8)),
                              _lanes_i32(low))
        top_m = builder.and_(builder.shl(builder.lshr(pick([4, 5, 6, 7, 4, 5, 6, 7]), six), _lanes_i32([4] * 8)),
                             _lanes_i32(low))
        sc = builder.or_(builder.and_(pick([0, 1, 2, 3, 8, 9, 10, 11]), _lanes_i32(high)), top_sc)
        m = builder.or_(builder.and_(builder.lshr(pick([4, 5, 6, 7, 8, 9, 10, 11]), _lanes_i32([0] * 4 + [4] * 4)),
                                     _lanes_i32(high)), top_m)
        return context.make_tuple(builder, sig.return_type, [builder.sitofp(sc, _F32x8), builder.sitofp(m, _F32x8)])

    return types.UniTuple(lanes8, 2)(row, i), codegen


@intrinsic
def _scales_q3k(typingctx, row, i, half):
    """Q3_K: the signed 6-bit scales of sub-blocks 8 half .. 8 half + 7 as a Lanes8, from row[i:i + 12]."""

    def codegen(context, builder, sig, args):
        row_t, row_v, i_v, half_v = sig.args[0], args[0], args[1], args[2]
        lo = _wide_bytes(context, builder, row_t, row_v, i_v)
        hi = _wide_bytes(context, builder, row_t, row_v, builder.add(i_v, ir.Constant(ir.IntType(64), 8)), n=4)
        four_half = _splat(builder, builder.mul(half_v, ir.Constant(ir.IntType(64), 4)))
        lo = builder.and_(builder.lshr(lo, four_half), _lanes_i32([15] * 8))
        hi = builder.and_(builder.lshr(hi, builder.add(four_half, _lanes_i32([0] * 4 + [2] * 4))), _lanes_i32([3] * 8))
        scale = builder.sub(builder.or_(lo, builder.shl(hi, _lanes_i32([4] * 8))), _lanes_i32([32] * 8))
        return builder.sitofp(scale, _F32x8)

    return lanes8(row, i, half), codegen


@intrinsic
def _scales_i8(typingctx, row, i):
    """Q6_K: the int8 scales row[i:i + 8] as a Lanes8."""

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8x8 = ir.VectorType(ir.IntType(8), 8)
        v = builder.load(builder.bitcast(builder.gep(data, [args[1]]), i8x8.as_pointer()), align=1)
        return builder.sitofp(v, _F32x8)

    return lanes8(row, i), codegen


@intrinsic
def _opaque(typingctx, n):
    """n, hidden from LLVM: a loop over range(_opaque(2)) stays a loop. Fully unrolled, a block's loops had all
    its sub-blocks' scales and codes live at once and spilled them (Q2_K 12% slower)."""
    if not isinstance(n, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        return builder.asm(ir.FunctionType(ir.IntType(64), [ir.IntType(64)]), "", "=r,0", [args[0]],
                           side_effect=False)

    return types.int64(n), codegen


# --- what a loop does with its weights ---------------------------------------------------------------------------

@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _eat(mode, acc, w0, w1, w2, w3, xa, xb, xc, xd, i0, i1, i2, i3):
    """Four groups of 8 weights, for inputs [i_p, i_p + 8). DOT1: acc[p] += w_p * xa[..] (independent
    accumulators); DOT4: acc[2k + p % 2] += w_p * x_k[..] for the four inputs x_k = xa..xd; DEQUANT: xa[..] = w_p
    (xa is the output row)."""
    literally(mode)
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    if mode == DEQUANT:
        store8(xa, i0, w0)
        store8(xa, i1, w1)
        store8(xa, i2, w2)
        store8(xa, i3, w3)
        return acc
    if mode == DOT1:
        return (a0 + w0 * load8(xa, i0), a1 + w1 * load8(xa, i1), a2 + w2 * load8(xa, i2),
                a3 + w3 * load8(xa, i3), a4, a5, a6, a7)
    return (a0 + w0 * load8(xa, i0) + w2 * load8(xa, i2), a1 + w1 * load8(xa, i1) + w3 * load8(xa, i3),
            a2 + w0 * load8(xb, i0) + w2 * load8(xb, i2), a3 + w1 * load8(xb, i1) + w3 * load8(xb, i3),
            a4 + w0 * load8(xc, i0) + w2 * load8(xc, i2), a5 + w1 * load8(xc, i1) + w3 * load8(xc, i3),
            a6 + w0 * load8(xd, i0) + w2 * load8(xd, i2), a7 + w1 * load8(xd, i1) + w3 * load8(xd, i3))


@njit(nogil=True, cache=True)
def _zero():
    z = zeros8()
    return (z, z, z, z, z, z, z, z)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _sums(mode, acc):
    """The accumulators summed: DOT1 (row . x, 0, 0, 0), DOT4 (row . x_k for k < 4); four floats, so a type's
    loop returns in registers (returning the eight vectors cost ~10% on 2048-wide rows)."""
    literally(mode)
    a0, a1, a2, a3, a4, a5, a6, a7 = acc
    if mode == DOT4:
        return hsum8(a0 + a1), hsum8(a2 + a3), hsum8(a4 + a5), hsum8(a6 + a7)
    zero = np.float32(0.0)
    return hsum8((a0 + a1) + (a2 + a3)), zero, zero, zero


# --- one loop per type ------------------------------------------------------------------------------------------
# Each walks a block's code bytes in 8-byte chunks; a chunk's four groups lie in four sub-blocks, whose (a, b)
# are picked from the scale lanes once for the two chunks that share them.

@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _q2k_tq2(mode, ternary, row, xa, xb, xc, xd):
    """Q2_K (ternary False) or TQ2_0 (True): the same 2-bit code planes, with 16 sub-block scales or one."""
    literally(mode)
    literally(ternary)
    bb, qs = (66, 0) if ternary else (84, 16)
    acc = _zero()
    for blk in range(row.shape[0] // bb):
        o, c = blk * bb, blk * QK
        d = half_at(row, o + (64 if ternary else 80))
        dmin = d if ternary else half_at(row, o + 82)
        sc0, mn0 = _planes(row, o, 2, 4, 15, o, 0, 0, 0, 0)  # Q2_K sub-blocks 0..7
        sc1, mn1 = _planes(row, o + 8, 2, 4, 15, o, 0, 0, 0, 0)  # 8..15
        sa0, sb0, sa1, sb1 = sc0 * d, mn0 * -dmin, sc1 * d, mn1 * -dmin
        for t in range(_opaque(2)):  # see _opaque
            for h in range(2):  # weights 128h + 32s + 16t + .., sub-block 8h + 2s + t
                sa, sb = (sa0, sb0) if h == 0 else (sa1, sb1)
                if ternary:
                    a0 = a1 = a2 = a3 = d
                    b0 = b1 = b2 = b3 = -d
                else:
                    a0, a1, a2, a3 = _lane(sa, t), _lane(sa, t + 2), _lane(sa, t + 4), _lane(sa, t + 6)
                    b0, b1, b2, b3 = _lane(sb, t), _lane(sb, t + 2), _lane(sb, t + 4), _lane(sb, t + 6)
                for jc in range(2 * t, 2 * t + 2):
                    q0, q1, q2, q3 = _planes(row, o + qs + 32 * h + 8 * jc, 4, 2, 3, o, 0, 0, 0, 0)
                    i = c + 128 * h + 8 * jc
                    acc = _eat(mode, acc, q0 * a0 + b0, q1 * a1 + b1, q2 * a2 + b2, q3 * a3 + b3,
                               xa, xb, xc, xd, i, i + 32, i + 64, i + 96)
    return _sums(mode, acc)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _q3k(mode, row, xa, xb, xc, xd):
    """Codes 0..7 for -4..3: weight = a * code - 4a."""
    literally(mode)
    acc = _zero()
    for blk in range(row.shape[0] // 110):
        o, c = blk * 110, blk * QK
        d = half_at(row, o + 108)
        sa0, sa1 = _scales_q3k(row, o + 96, 0) * d, _scales_q3k(row, o + 96, 1) * d  # sub-blocks 0..7, 8..15
        four = np.float32(-4.0)
        sb0, sb1 = sa0 * four, sa1 * four
        for t in range(_opaque(2)):
            for h in range(2):  # as Q2_K
                sa, sb = (sa0, sb0) if h == 0 else (sa1, sb1)
                a0, a1, a2, a3 = _lane(sa, t), _lane(sa, t + 2), _lane(sa, t + 4), _lane(sa, t + 6)
                b0, b1, b2, b3 = _lane(sb, t), _lane(sb, t + 2), _lane(sb, t + 4), _lane(sb, t + 6)
                for jc in range(2 * t, 2 * t + 2):
                    q0, q1, q2, q3 = _planes(row, o + 32 + 32 * h + 8 * jc, 4, 2, 3, o + 8 * jc, 4 * h, 1, 1, 2)
                    i = c + 128 * h + 8 * jc
                    acc = _eat(mode, acc, q0 * a0 + b0, q1 * a1 + b1, q2 * a2 + b2, q3 * a3 + b3,
                               xa, xb, xc, xd, i, i + 32, i + 64, i + 96)
    return _sums(mode, acc)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _q45k(mode, five, row, xa, xb, xc, xd):
    """Q4_K (five False) or Q5_K (True): 4-bit codes, Q5_K's fifth bit from qh."""
    literally(mode)
    literally(five)
    bb, qs = (176, 48) if five else (144, 16)
    hbit = 1 if five else 0
    acc = _zero()
    for blk in range(row.shape[0] // bb):
        o, c = blk * bb, blk * QK
        d, dmin = half_at(row, o), half_at(row, o + 2)
        sc, mn = _scales_k4(row, o + 4)
        sa, sb = sc * d, mn * -dmin
        for cc in range(_opaque(4)):  # sub-blocks 2cc (low nibbles) and 2cc + 1 (high) of qs[32cc:32cc + 32]
            a0, b0, a1, b1 = _lane(sa, 2 * cc), _lane(sb, 2 * cc), _lane(sa, 2 * cc + 1), _lane(sb, 2 * cc + 1)
            for jc in range(0, 4, 2):  # two chunks per step: four groups
                q = o + qs + 32 * cc + 8 * jc
                l0, h0 = _planes(row, q, 2, 4, 15, o + 16 + 8 * jc, 2 * cc, 1, hbit, 4)
                l1, h1 = _planes(row, q + 8, 2, 4, 15, o + 24 + 8 * jc, 2 * cc, 1, hbit, 4)
                i = c + 64 * cc + 8 * jc
                acc = _eat(mode, acc, l0 * a0 + b0, h0 * a1 + b1, l1 * a0 + b0, h1 * a1 + b1,
                           xa, xb, xc, xd, i, i + 32, i + 8, i + 40)
    return _sums(mode, acc)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _q6k(mode, row, xa, xb, xc, xd):
    """Codes 0..63 for -32..31: weight = a * code - 32a."""
    literally(mode)
    acc = _zero()
    for blk in range(row.shape[0] // 210):
        o, c = blk * 210, blk * QK
        d = half_at(row, o + 208)
        sa0, sa1 = _scales_i8(row, o + 192) * d, _scales_i8(row, o + 200) * d  # sub-blocks 0..7, 8..15
        m32 = np.float32(-32.0)
        sb0, sb1 = sa0 * m32, sa1 * m32
        for half in range(_opaque(2)):
            for h in range(2):  # weights 128h + 32t + 16 half + .., sub-block 8h + 2t + half
                sa, sb = (sa0, sb0) if h == 0 else (sa1, sb1)
                a0, a1, a2, a3 = _lane(sa, half), _lane(sa, half + 2), _lane(sa, half + 4), _lane(sa, half + 6)
                b0, b1, b2, b3 = _lane(sb, half), _lane(sb, half + 2), _lane(sb, half + 4), _lane(sb, half + 6)
                for jc in range(2 * half, 2 * half + 2):
                    ql, qh = o + 64 * h + 8 * jc, o + 128 + 32 * h + 8 * jc
                    q0, q2 = _planes(row, ql, 2, 4, 15, qh, 0, 4, 3, 4)  # t = 0, 2
                    q1, q3 = _planes(row, ql + 32, 2, 4, 15, qh, 2, 4, 3, 4)  # t = 1, 3
                    i = c + 128 * h + 8 * jc
                    acc = _eat(mode, acc, q0 * a0 + b0, q1 * a1 + b1, q2 * a2 + b2, q3 * a3 + b3,
                               xa, xb, xc, xd, i, i + 32, i + 64, i + 96)
    return _sums(mode, acc)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _tq1(mode, row, xa, xb, xc, xd):
    """Digits 0..2 are weights -d..d: weight = d * digit - d. A block is 32 groups: 4 chunks of qs[0:32] with 5
    digits each, 2 chunks of qs[32:48] with 5 each, and qh's 16 weights (2 groups); fed to `_eat` four at a time."""
    literally(mode)
    acc = _zero()
    for blk in range(row.shape[0] // 54):
        o, c = blk * 54, blk * QK
        d = half_at(row, o + 52)
        a0, a1, a2, a3, a4 = _trits(row, o, 5)
        b0, b1, b2, b3, b4 = _trits(row, o + 8, 5)
        acc = _eat(mode, acc, a0 * d - d, a1 * d - d, a2 * d - d, a3 * d - d, xa, xb, xc, xd,
                   c, c + 32, c + 64, c + 96)
        acc = _eat(mode, acc, b0 * d - d, b1 * d - d, b2 * d - d, b3 * d - d, xa, xb, xc, xd,
                   c + 8, c + 40, c + 72, c + 104)
        e0, e1, e2, e3, e4 = _trits(row, o + 16, 5)
        f0, f1, f2, f3, f4 = _trits(row, o + 24, 5)
        acc = _eat(mode, acc, e0 * d - d, e1 * d - d, e2 * d - d, e3 * d - d, xa, xb, xc, xd,
                   c + 16, c + 48, c + 80, c + 112)
        acc = _eat(mode, acc, f0 * d - d, f1 * d - d, f2 * d - d, f3 * d - d, xa, xb, xc, xd,
                   c + 24, c + 56, c + 88, c + 120)
        acc = _eat(mode, acc, a4 * d - d, b4 * d - d, e4 * d - d, f4 * d - d, xa, xb, xc, xd,
                   c + 128, c + 136, c + 144, c + 152)
        g0, g1, g2, g3, g4 = _trits(row, o + 32, 5)  # qs[32:48]: digit p of qs[32 + j] is weight 160 + 16p + j
        h0, h1, h2, h3, h4 = _trits(row, o + 40, 5)
        acc = _eat(mode, acc, g0 * d - d, g1 * d - d, g2 * d - d, g3 * d - d, xa, xb, xc, xd,
                   c + 160, c + 176, c + 192, c + 208)
        acc = _eat(mode, acc, h0 * d - d, h1 * d - d, h2 * d - d, h3 * d - d, xa, xb, xc, xd,
                   c + 168, c + 184, c + 200, c + 216)
        t0, t1 = _trits_tail(row, o + 48)
        acc = _eat(mode, acc, g4 * d - d, h4 * d - d, t0 * d - d, t1 * d - d, xa, xb, xc, xd,
                   c + 224, c + 232, c + 240, c + 248)
    return _sums(mode, acc)


# --- the family contract (legacy.py) -----------------------------------------------------------------------------

@njit(nogil=True, cache=True, inline="always")
def owns(code):
    return (code == Q2_K or code == Q3_K or code == Q4_K or code == Q5_K or code == Q6_K or code == TQ1_0
            or code == TQ2_0)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def _run(code, mode, row, xa, xb, xc, xd):
    """The type's loop for `code`: (DOT1) row . xa, or (DOT4) row . x_k, or (DEQUANT) the weights into xa."""
    literally(mode)
    if code == Q4_K:
        return _q45k(mode, False, row, xa, xb, xc, xd)
    if code == Q5_K:
        return _q45k(mode, True, row, xa, xb, xc, xd)
    if code == Q6_K:
        return _q6k(mode, row, xa, xb, xc, xd)
    if code == Q3_K:
        return _q3k(mode, row, xa, xb, xc, xd)
    if code == Q2_K:
        return _q2k_tq2(mode, False, row, xa, xb, xc, xd)
    if code == TQ1_0:
        return _tq1(mode, row, xa, xb, xc, xd)
    return _q2k_tq2(mode, True, row, xa, xb, xc, xd)


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot1(code, row, x):
    return _run(code, DOT1, row, x, x, x, x)[0]


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dot4(code, row, X, i0, i1, i2, i3, Y, r):
    Y[0, r], Y[1, r], Y[2, r], Y[3, r] = _run(code, DOT4, row, X[i0], X[i1], X[i2], X[i3])


@njit(nogil=True, cache=True, fastmath=FASTMATH)
def dequant(code, row, out):
    _run(code, DEQUANT, row, out, out, out, out)
