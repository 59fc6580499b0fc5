"""Byte and int16 lanes of one 256-bit register, for the integer dot products of the int8 and int4 kernels.

Why integers. A one-token kernel converting each weight to float32 and multiplying it in float runs ~3 vector
instructions per 8 weights; on an AVX2 core that is ~12 G weights/s, below what one core's share of memory
bandwidth delivers (int4 at 75 % of a Zen 3 core's bandwidth needs ~30 G weights/s). With the activations
quantized to int8 (activations.py), AVX2's `vpmaddubsw` multiplies 32 unsigned bytes by 32 signed bytes and adds
adjacent pairs into 16 int16 lanes: 32 weights per instruction, the same instruction llama.cpp's and
KTransformers' AVX2 paths are built on. LLVM does not form it from plain integer loops (numba widens integer
arithmetic to int64 first), so the kernels call it through the intrinsics below.

`Bytes32` is LLVM's <32 x i8> and `Words16` its <16 x i16>: values stay in registers across numba loops, and
every function here is one to three instructions. The x86 intrinsics exist only on CPUs with AVX2, so the
kernels that use these are chosen at import (`HAS_AVX2`); other CPUs run the float kernels.

Lane order. `zip_lo`/`zip_hi` are vpunpcklbw/vpunpckhbw, which interleave within each 128-bit half: for 32 rows
of bytes a and b, zip_lo holds (a, b) pairs of rows 0-7 and 16-23, zip_hi those of rows 8-15 and 24-31, and
`maddubs` keeps that order in its int16 lanes; `add_rows_scaled` undoes it when it adds the sums into float32 per
row. `zip_words_lo`/`zip_words_hi` do the same for int16 lanes (rows 0-3 and 8-11, rows 4-7 and 12-15), undone by
`add_ints_scaled`.
"""

import platform

import llvmlite.binding as ll
from llvmlite import ir
from numba.core import cgutils, config, types
from numba.core.errors import TypingError
from numba.extending import intrinsic, models, register_model

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_B32 = ir.VectorType(_I8, 32)
_W16 = ir.VectorType(_I16, 16)


def _host_has(feature: str) -> bool:
    if config.CPU_NAME is not None:  # compiling for a named CPU (NUMBA_CPU_NAME): only what its features list
        return f"+{feature}" in (config.CPU_FEATURES or "")
    return platform.machine().lower() in ("x86_64", "amd64") and bool(ll.get_host_cpu_features().get(feature))


HAS_AVX2 = _host_has("avx2")


class _LanesType(types.Type):
    def __init__(self, name, llvm_type):
        self.llvm_type = llvm_type
        super().__init__(name=name)


bytes32 = _LanesType("Bytes32", _B32)
words16 = _LanesType("Words16", _W16)


@register_model(_LanesType)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, fe_type.llvm_type)


def _check_array(arr, dtypes, what):
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C" and arr.dtype in dtypes):
        raise TypingError(f"{what} needs a C-contiguous 1-D array of {dtypes}, got {arr}")


def _ptr(context, builder, arr_type, arr, i, elem_type):
    data = context.make_array(arr_type)(context, builder, arr).data
    return builder.bitcast(builder.gep(data, [i]), elem_type.as_pointer())


def _splat(builder, vec_type, value):
    v = builder.insert_element(ir.Constant(vec_type, ir.Undefined), value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, vec_type.count), [0] * vec_type.count))


def _x86(builder, name, ret, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


_F8 = ir.VectorType(ir.FloatType(), 8)
_FLAGS = ("arcp", "contract", "nsz", "reassoc")


def _add_scaled(context, builder, sig, args, offset, part):
    """y[i + offset : i + offset + 8] += float(part) * ws[same] * factor, for intrinsics (y, i, ..., ws, factor)
    whose y is their first argument, i the second, ws and factor the last two; part: <8 x i32>."""
    at = builder.add(args[1], ir.Constant(args[1].type, offset))
    py = _ptr(context, builder, sig.args[0], args[0], at, _F8)
    w = builder.load(_ptr(context, builder, sig.args[-2], args[-2], at, _F8), align=4)
    prod = builder.fmul(builder.fmul(builder.sitofp(part, _F8), w, flags=_FLAGS), _splat(builder, _F8, args[-1]),
                        flags=_FLAGS)
    builder.store(builder.fadd(builder.load(py, align=4), prod, flags=_FLAGS), py, align=4)


@intrinsic
def load32(typingctx, arr, i):
    """arr[i : i + 32] of a uint8 or int8 array (unchecked: the caller keeps it in range)."""
    _check_array(arr, (types.uint8, types.int8), "load32")

    def codegen(context, builder, sig, args):
        return builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _B32), align=1)

    return bytes32(arr, i), codegen


@intrinsic
def pair_splat(typingctx, arr, i):
    """The two bytes arr[i], arr[i + 1] repeated 16 times: one input pair against 16 rows' weight pairs."""
    _check_array(arr, (types.uint8, types.int8), "pair_splat")

    def codegen(context, builder, sig, args):
        pair = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], _I16), align=1)
        return builder.bitcast(_splat(builder, _W16, pair), _B32)

    return bytes32(arr, i), codegen


def _unary(name, build):
    @intrinsic
    def op(typingctx, a):
        if a != bytes32:
            raise TypingError(f"{name} takes Bytes32, got {a}")
        return bytes32(bytes32), lambda context, builder, sig, args: build(builder, args[0])

    return op


_MASK15 = ir.Constant(_B32, [15] * 32)
# Low and high 4-bit halves of each byte (vpand; vpsrlw + vpand: x86 has no byte shift, LLVM picks the word one).
low_nibbles = _unary("low_nibbles", lambda b, v: b.and_(v, _MASK15))
high_nibbles = _unary("high_nibbles", lambda b, v: b.and_(b.lshr(v, ir.Constant(_B32, [4] * 32)), _MASK15))


def _zip(half):
    # vpunpck{l,h}bw: per 128-bit half, bytes 0-7 (lo) or 8-15 (hi) of a and b alternated.
    mask = [j + off for base in (0, 16) for k in range(8) for j, off in ((base + half * 8 + k, 0), (base + half * 8 + k, 32))]

    @intrinsic
    def zip_(typingctx, a, b):
        if (a, b) != (bytes32, bytes32):
            raise TypingError(f"zip takes two Bytes32, got {a}, {b}")
        return bytes32(bytes32, bytes32), lambda context, builder, sig, args: builder.shuffle_vector(
            args[0], args[1], ir.Constant(ir.VectorType(_I32, 32), mask))

    return zip_


zip_lo, zip_hi = _zip(0), _zip(1)


@intrinsic
def maddubs(typingctx, u, s):
    """u (unsigned bytes) times s (signed bytes), adjacent products summed into 16 int16 lanes (vpmaddubsw; the
    sums saturate, which callers rule out by the ranges they feed it)."""
    if (u, s) != (bytes32, bytes32):
        raise TypingError(f"maddubs takes two Bytes32, got {u}, {s}")
    return words16(bytes32, bytes32), lambda context, builder, sig, args: _x86(
        builder, "llvm.x86.avx2.pmadd.ub.sw", _W16, list(args))


@intrinsic
def zero_words(typingctx):
    return words16(), lambda context, builder, sig, args: ir.Constant(_W16, [0] * 16)


@intrinsic
def add_words(typingctx, a, b):
    """a + b in int16 lanes (wrapping; callers keep sums in range)."""
    if (a, b) != (words16, words16):
        raise TypingError(f"add_words takes two Words16, got {a}, {b}")
    return words16(words16, words16), lambda context, builder, sig, args: builder.add(args[0], args[1])


@intrinsic
def add_rows_scaled(typingctx, y, i, lo, hi, ws, factor):
    """y[i : i + 32] += float(sums) * ws[i : i + 32] * factor for the int16 sums lo (zip_lo pairs) and hi (zip_hi
    pairs) of 32 consecutive rows (y, ws float32; factor float32): a block's integer dot products, scaled."""
    _check_array(y, (types.float32,), "add_rows_scaled")
    _check_array(ws, (types.float32,), "add_rows_scaled")
    if (lo, hi) != (words16, words16) or factor != types.float32:
        raise TypingError(f"add_rows_scaled takes two Words16 and a float32, got {lo}, {hi}, {factor}")

    def codegen(context, builder, sig, args):
        for src, half, offset in ((args[2], 0, 0), (args[3], 0, 8), (args[2], 1, 16), (args[3], 1, 24)):
            part = builder.shuffle_vector(src, src, ir.Constant(ir.VectorType(_I32, 8), list(range(8 * half, 8 * half + 8))))
            _add_scaled(context, builder, sig, args, offset, builder.sext(part, ir.VectorType(_I32, 8)))
        return context.get_dummy_value()

    return types.none(y, i, words16, words16, ws, factor), codegen


_D8 = ir.VectorType(_I32, 8)
ints8 = _LanesType("Ints8", _D8)


@intrinsic
def load16_words(typingctx, arr, i):
    """arr[i : i + 16] of an int8 (or uint8 read as int8) array, sign-extended to 16 int16 lanes (vpmovsxbw)."""
    _check_array(arr, (types.uint8, types.int8), "load16_words")

    def codegen(context, builder, sig, args):
        v = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, 16)), align=1)
        return builder.sext(v, _W16)

    return words16(arr, i), codegen


def _zip_words(half):
    # vpunpck{l,h}wd: per 128-bit half, words 0-3 (lo) or 4-7 (hi) of a and b alternated.
    mask = [j + off for base in (0, 8) for k in range(4) for j, off in ((base + half * 4 + k, 0), (base + half * 4 + k, 16))]

    @intrinsic
    def zip_(typingctx, a, b):
        if (a, b) != (words16, words16):
            raise TypingError(f"zip_words takes two Words16, got {a}, {b}")
        return words16(words16, words16), lambda context, builder, sig, args: builder.shuffle_vector(
            args[0], args[1], ir.Constant(ir.VectorType(_I32, 16), mask))

    return zip_


zip_words_lo, zip_words_hi = _zip_words(0), _zip_words(1)


@intrinsic
def pair_splat_words(typingctx, arr, i):
    """arr[i], arr[i + 1] (int8) as int16, the pair repeated 8 times: one input pair against 8 rows' pairs."""
    _check_array(arr, (types.int8,), "pair_splat_words")

    def codegen(context, builder, sig, args):
        pair = builder.load(_ptr(context, builder, sig.args[0], args[0], args[1], ir.VectorType(_I8, 2)), align=1)
        wide = builder.bitcast(builder.sext(pair, ir.VectorType(_I16, 2)), _I32)
        return builder.bitcast(_splat(builder, _D8, wide), _W16)

    return words16(arr, i), codegen


@intrinsic
def madd_words(typingctx, a, b):
    """a times b in int16 lanes, adjacent products summed into 8 int32 lanes (vpmaddwd)."""
    if (a, b) != (words16, words16):
        raise TypingError(f"madd_words takes two Words16, got {a}, {b}")
    return ints8(words16, words16), lambda context, builder, sig, args: _x86(
        builder, "llvm.x86.avx2.pmadd.wd", _D8, list(args))


@intrinsic
def zero_ints(typingctx):
    return ints8(), lambda context, builder, sig, args: ir.Constant(_D8, [0] * 8)


@intrinsic
def add_ints(typingctx, a, b):
    if (a, b) != (ints8, ints8):
        raise TypingError(f"add_ints takes two Ints8, got {a}, {b}")
    return ints8(ints8, ints8), lambda context, builder, sig, args: builder.add(args[0], args[1])


@intrinsic
def add_ints_scaled(typingctx, y, i, lo, hi, ws, factor):
    """y[i : i + 16] += float(sums) * ws[i : i + 16] * factor for the int32 sums lo (zip_words_lo pairs: rows 0-3,
    8-11) and hi (zip_words_hi: rows 4-7, 12-15) of 16 consecutive rows."""
    _check_array(y, (types.float32,), "add_ints_scaled")
    _check_array(ws, (types.float32,), "add_ints_scaled")
    if (lo, hi) != (ints8, ints8) or factor != types.float32:
        raise TypingError(f"add_ints_scaled takes two Ints8 and a float32, got {lo}, {hi}, {factor}")

    def codegen(context, builder, sig, args):
        order = ir.Constant(ir.VectorType(_I32, 8), [0, 1, 2, 3, 8, 9, 10, 11])
        first = builder.shuffle_vector(args[2], args[3], order)  # rows 0-7
        second = builder.shuffle_vector(args[2], args[3], ir.Constant(ir.VectorType(_I32, 8), [4, 5, 6, 7, 12, 13, 14, 15]))
        for part, offset in ((first, 0), (second, 8)):
            _add_scaled(context, builder, sig, args, offset, part)
        return context.get_dummy_value()

    return types.none(y, i, ints8, ints8, ws, factor), codegen



def _widen(half):
    @intrinsic
    def widen(typingctx, a):
        if a != words16:
            raise TypingError(f"widen takes Words16, got {a}")
        lanes = ir.Constant(ir.VectorType(_I32, 8), list(range(8 * half, 8 * half + 8)))
        return ints8(words16), lambda context, builder, sig, args: builder.sext(
            builder.shuffle_vector(args[0], args[0], lanes), _D8)

    return widen


# int16 lanes 0-7 / 8-15 sign-extended to int32 (vpmovsxwd; the high half after vextracti128).
widen_lo, widen_hi = _widen(0), _widen(1)


@intrinsic
def add_rows8_scaled(typingctx, y, i, s, ws, factor):
    """y[i : i + 8] += float(s) * ws[i : i + 8] * factor for the int32 sums s of 8 consecutive rows."""
    _check_array(y, (types.float32,), "add_rows8_scaled")
    _check_array(ws, (types.float32,), "add_rows8_scaled")
    if s != ints8 or factor != types.float32:
        raise TypingError(f"add_rows8_scaled takes Ints8 and a float32, got {s}, {factor}")

    def codegen(context, builder, sig, args):
        _add_scaled(context, builder, sig, args, 0, args[2])
        return context.get_dummy_value()

    return types.none(y, i, ints8, ws, factor), codegen
