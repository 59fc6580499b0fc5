"""Eight float32 lanes held in one SIMD register, unchecked loads and f16 scales, for the GGUF kernels.

Shared by the IQ types (groups of 8 weights), the K-quants and Q8_0.

An IQ group is one grid row (8 values, or two 4-value rows) times 8 signs, against 8 consecutive inputs. Written
as 8 scalar lines, LLVM's vectoriser either leaves it scalar or vectorises across groups with one gather per lane
(both measured at 0.5-0.7 G weights/s on IQ2_XXS); as `Lanes8` values every grid row, sign row and input run is
one vector load and the arithmetic is one vector instruction per 8 weights (3.5 G weights/s, same machine; 9 with
the unchecked loads, int8 grids and the f16 conversion below). kquants.py builds on the same type.

`Lanes8` is a numba type whose value is LLVM's <8 x float>: locals and loop-carried accumulators stay in vector
registers, and LLVM lowers the type on any target (one AVX register, two SSE/NEON registers). Values come only from
the functions below; `+`, `-` and `*` work between two Lanes8 and between a Lanes8 and a float32 (broadcast).

Every load here (`load8`, `load4x2`, `lookup16`, `store8` and the scalar `u8`, `u16`, `u32`, `f32`) reads
elements from `i` on of a C-contiguous 1-D array, unchecked: the caller keeps `i` in range, as the kernels do by
construction (whole 256-weight blocks). Why not plain `row[i]`: numba wraps negative indices, and where LLVM cannot
prove an offset non-negative that costs 4 instructions per byte read (IQ3_S read ~40 such bytes per 32 weights);
the integer loads also read a uint16/uint32 field in one instruction (little-endian, as GGUF stores it).
"""

import operator
import platform

import llvmlite.binding as ll
from llvmlite import ir
from numba import njit
from numba.core import cgutils, config, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, overload, register_model

from ..spec import FASTMATH

_FLAGS = tuple(sorted(FASTMATH))
_F8 = ir.VectorType(ir.FloatType(), 8)
_I32 = ir.IntType(32)


class Lanes8Type(types.Type):
    def __init__(self):
        super().__init__(name="Lanes8")


lanes8 = Lanes8Type()


@register_model(Lanes8Type)
class _Lanes8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _F8)


def _check_array(arr, dtype, what):
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype == dtype):
        raise TypingError(f"{what} needs a C-contiguous 1-D {dtype} array, got {arr}")


def _element_ptr(context, builder, arr_type, arr, i, elem_type):
    data = context.make_array(arr_type)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [i]), elem_type.as_pointer())


def _broadcast(builder, s):
    v = builder.insert_element(ir.Constant(_F8, ir.Undefined), s, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))


def _scalar_load(array_dtype, elem_type, result_type, name):
    @intrinsic
    def load(typingctx, arr, i):
        _check_array(arr, array_dtype, name)
        if not isinstance(i, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], elem_type), align=1)
            return builder.zext(v, ir.IntType(64)) if isinstance(elem_type, ir.IntType) else v

        return result_type(arr, i), codegen

    return load


# The uint8/16/32 read from bytes i.. of a uint8 array (little-endian, unaligned), as int64; one float32 element.
u8 = _scalar_load(types.uint8, ir.IntType(8), types.int64, "u8")
u16 = _scalar_load(types.uint8, ir.IntType(16), types.int64, "u16")
u32 = _scalar_load(types.uint8, _I32, types.int64, "u32")
f32 = _scalar_load(types.float32, ir.FloatType(), types.float32, "f32")


@intrinsic
def zeros8(typingctx):
    """Lanes8 of 0.0."""
    return lanes8(), lambda context, builder, sig, args: ir.Constant(_F8, [0.0] * 8)


def _lanes_from(builder, v):
    """float32 lanes from a vector of float32 (as is) or int8 (converted exactly)."""
    return v if v.type.element == ir.FloatType() else builder.sitofp(v, ir.VectorType(ir.FloatType(), v.type.count))


def _check_table(arr, what):
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
            and arr.dtype in (types.float32, types.int8)):
        raise TypingError(f"{what} needs a C-contiguous 1-D float32 or int8 array, got {arr}")
    return ir.FloatType() if arr.dtype == types.float32 else ir.IntType(8)


@intrinsic
def load8(typingctx, arr, i):
    """arr[i : i + 8] of a float32 or int8 array, as float32 lanes. Small-integer tables (the grids) are kept as
    int8: a quarter of the cache footprint for one extra convert, which pays where the float32 table would not
    stay in L1 (IQ1_S: 9.1 vs 7.4 G weights/s)."""
    elem = _check_table(arr, "load8")

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(elem, 8))
        return _lanes_from(builder, builder.load(ptr, align=1))

    return lanes8(arr, i), codegen


@intrinsic
def load8_int8(typingctx, arr, i):
    """arr[i : i + 8] of a uint8 array read as int8 (two's complement), as float32 lanes: Q8_0's codes, read
    from the file's bytes. (Through `row.view(np.int8)` instead, a read-only row, as a memory map is, ran 6x
    slower.)"""
    _check_array(arr, types.uint8, "load8_int8")

    def codegen(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(ir.IntType(8), 8))
        return _lanes_from(builder, builder.load(ptr, align=1))

    return lanes8(arr, i), codegen


@intrinsic
def load4x2(typingctx, arr, i, j):
    """arr[i : i + 4] then arr[j : j + 4] (float32 or int8 array) as float32 lanes: two 4-value grid rows."""
    elem = _check_table(arr, "load4x2")

    def codegen(context, builder, sig, args):
        half = ir.VectorType(elem, 4)
        lo = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[1], half), align=1)
        hi = builder.load(_element_ptr(context, builder, sig.args[0], args[0], args[2], half), align=1)
        return _lanes_from(builder, builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 8), list(range(8)))))

    return lanes8(arr, i, j), codegen


@intrinsic
def store8(typingctx, arr, i, v):
    """arr[i : i + 8] = v (float32 array)."""
    _check_array(arr, types.float32, "store8")

    def codegen(context, builder, sig, args):
        builder.store(args[2], _element_ptr(context, builder, sig.args[0], args[0], args[1], _F8), align=4)
        return context.get_dummy_value()

    return types.none(arr, i, lanes8), codegen


@intrinsic
def hsum8(typingctx, v):
    """The sum of the 8 lanes, as float32 (pairwise: halves, then quarters, then the last two)."""

    def codegen(context, builder, sig, args):
        def half(vec, n):
            mask = ir.VectorType(_I32, n)
            lo = builder.shuffle_vector(vec, vec, ir.Constant(mask, list(range(n))))
            hi = builder.shuffle_vector(vec, vec, ir.Constant(mask, list(range(n, 2 * n))))
            return builder.fadd(lo, hi, flags=_FLAGS)

        two = half(half(args[0], 4), 2)
        return builder.fadd(builder.extract_element(two, ir.Constant(_I32, 0)),
                            builder.extract_element(two, ir.Constant(_I32, 1)), flags=_FLAGS)

    return types.float32(lanes8), codegen


def _binary(op):
    @intrinsic
    def vector_op(typingctx, a, b):
        if a == lanes8 and b == lanes8:
            sig = lanes8(lanes8, lanes8)
        elif a == lanes8 and b == types.float32:
            sig = lanes8(lanes8, types.float32)
        elif a == types.float32 and b == lanes8:
            sig = lanes8(types.float32, lanes8)
        else:
            return None

        def codegen(context, builder, sig, args):
            x, y = (_broadcast(builder, v) if t == types.float32 else v for v, t in zip(args, sig.args))
            return getattr(builder, op)(x, y, flags=_FLAGS)

        return sig, codegen

    return vector_op


_add, _sub, _mul = _binary("fadd"), _binary("fsub"), _binary("fmul")


def _register(operator_fn, impl):
    @overload(operator_fn)
    def typed(a, b):
        if lanes8 in (a, b) and {a, b} <= {lanes8, types.float32}:
            return lambda a, b: impl(a, b)


for _op, _impl in ((operator.add, _add), (operator.iadd, _add), (operator.sub, _sub), (operator.isub, _sub),
                   (operator.mul, _mul), (operator.imul, _mul)):
    _register(_op, _impl)


def _x86_byte_shuffle() -> bool:
    """Whether the code numba generates may use SSSE3's pshufb (a 16-entry byte table lookup per lane)."""
    if config.CPU_NAME is not None:  # compiling for a named CPU (NUMBA_CPU_NAME): only what its features list
        return "+ssse3" in (config.CPU_FEATURES or "")
    return platform.machine().lower() in ("x86_64", "amd64") and bool(ll.get_host_cpu_features().get("ssse3"))


@intrinsic
def lookup16(typingctx, table, row, i, shift):
    """table[(row[i + j] >> shift) & 15] for j < 8, as float32 lanes: one 4-bit code per lane looked up in a
    16-entry int8 table (IQ4's levels). LLVM has no portable vector table lookup: on x86 this is one pshufb (SSSE3)
    on the codes, elsewhere a gather, which LLVM may split into 8 scalar loads (measured 2.2 vs 7 G weights/s)."""
    _check_array(table, types.int8, "lookup16")
    _check_array(row, types.uint8, "lookup16")

    def codegen(context, builder, sig, args):
        u8x8, u8x16 = ir.VectorType(ir.IntType(8), 8), ir.VectorType(ir.IntType(8), 16)
        codes = builder.load(_element_ptr(context, builder, sig.args[1], args[1], args[2], u8x8), align=1)
        s = builder.trunc(args[3], ir.IntType(8))
        sv = builder.insert_element(ir.Constant(u8x8, ir.Undefined), s, ir.Constant(_I32, 0))
        sv = builder.shuffle_vector(sv, sv, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
        codes = builder.and_(builder.lshr(codes, sv), ir.Constant(u8x8, [15] * 8))
        if _x86_byte_shuffle():
            levels = builder.load(_element_ptr(context, builder, sig.args[0], args[0], ir.Constant(ir.IntType(64), 0),
                                               u8x16), align=1)
            wide = builder.shuffle_vector(codes, codes, ir.Constant(ir.VectorType(_I32, 16), list(range(8)) * 2))
            pshufb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(u8x16, [u8x16, u8x16]),
                                                    "llvm.x86.ssse3.pshuf.b.128")
            picked = builder.call(pshufb, [levels, wide])
            values = builder.shuffle_vector(picked, picked, ir.Constant(ir.VectorType(_I32, 8), list(range(8))))
        else:
            i64x8 = ir.VectorType(ir.IntType(64), 8)
            base = builder.ptrtoint(context.make_array(sig.args[0])(context, builder, args[0]).data, ir.IntType(64))
            bv = builder.insert_element(ir.Constant(i64x8, ir.Undefined), base, ir.Constant(_I32, 0))
            bv = builder.shuffle_vector(bv, bv, ir.Constant(ir.VectorType(_I32, 8), [0] * 8))
            ptrs = builder.inttoptr(builder.add(bv, builder.zext(codes, i64x8)),
                                    ir.VectorType(ir.PointerType(ir.IntType(8)), 8))
            gather = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(u8x8, [ptrs.type, _I32, ir.VectorType(ir.IntType(1), 8), u8x8]),
                "llvm.masked.gather.v8i8.v8p0")
            values = builder.call(gather, [ptrs, ir.Constant(_I32, 1), ir.Constant(ir.VectorType(ir.IntType(1), 8),
                                                                                    [1] * 8), ir.Constant(u8x8, ir.Undefined)])
        return builder.sitofp(values, _F8)

    return lanes8(table, row, i, shift), codegen


@intrinsic
def half_to_float(typingctx, bits):
    """The IEEE half float with bit pattern `bits` (an integer < 2^16), as float32: exact for every pattern
    (subnormals, inf, nan), branch-free integer ops and one bitcast. Building it with math.ldexp gave the same
    values at ~30 cycles per block (the call also spilled the vector accumulators)."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = _I32
        h = args[0] if bits.bitwidth == 32 else (builder.trunc if bits.bitwidth > 32 else builder.zext)(args[0], i32)
        magnitude = builder.and_(h, ir.Constant(i32, 0x7FFF))
        shifted = builder.shl(magnitude, ir.Constant(i32, 13))
        normal = builder.add(shifted, ir.Constant(i32, 112 << 23))  # exponent bias 15 -> 127
        inf_nan = builder.add(shifted, ir.Constant(i32, 224 << 23))  # exponent 31 -> 255
        tiny = builder.fmul(builder.uitofp(magnitude, ir.FloatType()), ir.Constant(ir.FloatType(), 2.0 ** -24))
        value = builder.select(builder.icmp_unsigned(">=", magnitude, ir.Constant(i32, 0x7C00)), inf_nan, normal)
        value = builder.select(builder.icmp_unsigned("<", magnitude, ir.Constant(i32, 0x400)),
                               builder.bitcast(tiny, i32), value)
        sign = builder.shl(builder.and_(h, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
        return builder.bitcast(builder.or_(value, sign), ir.FloatType())

    return types.float32(bits), codegen


@njit(nogil=True, cache=True, inline="always")
def half_at(row, offset):
    """The f16 stored little-endian at row[offset:offset + 2] (row uint8), as float32 (see half_to_float)."""
    return half_to_float(u16(row, offset))
