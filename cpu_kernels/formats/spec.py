"""What a weight format is: the contract one registry entry (formats/__init__.py `FORMATS`) fills in.

Dimension legend: n_out / n_in the output / input size of one projection matrix ([n_out, n_in], as in
`nn.Linear.weight`), G group size (None for a format without groups), R the format's `tile_rows`,
nt = ceil(n_out / R) tiles.

A format keeps one expert's matrix as two arrays, `values` and `scales`, with the shapes and dtypes it defines
(`value_shape`, `scale_shape`, `value_dtype`, `scale_dtype`). The first axis of both is the tile: tile t holds
everything the kernels need to produce output rows [t*R, (t+1)*R), rows past n_out zero. What a tile holds is the
format's own business: bf16/int8/int4 keep 128-row tiles with one scale per (row, group of G inputs)
(formats/tiled.py); a GGUF K-quant would keep, per tile, its rows' 256-weight super-blocks along the input with
their sub-block scales. The store (store.py) stacks all E experts: values [E, nt, ...], scales [E, nt, ...]; the
drivers (phases.py) split the tiles among the threads and call the format's kernels on one tile at a time:

    tile1(kind, values[t], scales[t], x, xq, xd, y)                   y[r] = sum_c W[t*R + r, c] * x[c]   y [R]
    tile4(kind, values[t], scales[t], X, Xq, Xd, i0, i1, i2, i3, Y)   Y[k] = tile @ X[i_k] for k < 4      Y [4, R]

x is float32 [n_in], X float32 [*, n_in], y and Y float32; xq, xd (Xq, Xd: one row per row of X) are x quantized to
int8 (activations.py: xq int8 [n_in], xd float32 [2, n_in / 32]) for a format whose `quantized_inputs` is True,
whose kernels read them instead of x (the integer kernels, int_lanes.py); the drivers quantize each input row once
per call, not per tile, and pass zero-length arrays to the other formats. Both kernels overwrite their output, allocate nothing, and are compiled
with `@njit(nogil=True, cache=True, fastmath=FASTMATH)` (threads run them in parallel). A format without scales
(`has_scales` False) still gets a scales argument: an empty [nt, 0, 0] float32 placeholder.

`kind` tells numba which format a call is for: an instance of a `typing.NamedTuple` class of the format's own
module, field-less for bf16/int8/int4. The GGUF types (formats/gguf/) share one class whose field is the ggml
type code, so one compiled driver serves every GGUF type and the type is picked at run time; kernels get the
marker as their first argument for that reason (the others ignore it). The drivers take it as their first argument; numba compiles one specialisation per marker class and
looks the kernels up in the registry while compiling, so kernels are chosen by format, never by the dtype of the
values (Q4_K and int4 would both keep uint8). Why a NamedTuple: numba types it by its class for ~0.6 us per call
and caches what it compiled; a custom numba type measured ~6 us per call (its typeof runs in Python), and passing
the kernels themselves as arguments disables numba's on-disk cache.
"""

from dataclasses import dataclass
from typing import Callable

# Reassociation lets LLVM vectorise the float sums; no NaN/inf assumptions, so bad weights still show up.
FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@dataclass(frozen=True)
class FormatSpec:
    """One weight format. Functions take the group size G (None without groups), never a Format, so a format's
    module needs nothing from the registry."""

    name: str  # as plan files, `hybrid convert --experts` and store manifests write it
    group_sizes: tuple  # the G it accepts; () for a format without groups
    default_group: int | None  # G when a name gives none ("int4" = "int4-g128")
    tile_rows: int  # R: output rows per tile, what one kernel call produces
    value_dtype: str  # numpy dtype name of the values array
    has_scales: bool  # False: no scales file in the store, and an empty placeholder in memory
    value_shape: Callable  # (G, n_out, n_in) -> shape of one expert's values, tile axis first
    scale_shape: Callable  # (G, n_out, n_in) -> shape of one expert's scales, tile axis first
    input_multiple: Callable  # (G) -> n_in must be a multiple of this (the kernels' unrolling)
    bits_per_weight: Callable  # (G) -> bits per weight, scales included, tile padding not
    quantize: Callable | None  # (w [n_out, n_in] float32 or bf16 bits as uint16, G) -> (values, scales); None:
    # a format read as released (GGUF) that hybrid never writes
    dequantize: Callable  # (values, scales, G, n_out, n_in) -> float32 [n_out, n_in]: what the kernels multiply by
    tile1: Callable  # the one-token kernel above
    tile4: Callable  # the four-token kernel above
    kind: tuple  # numba's marker for this format (above)
    error_bound: float  # bound on quantize.matvec_error that tests hold the quantizer to (nan: no quantizer)
    scale_dtype: str = "float32"
    output_multiple: int = 1  # n_out must be a multiple of this (GGUF tiles are views of the file: no padding)
    ggml_type: int | None = None  # the GGUF type code of a format read from .gguf files
    quantized_inputs: bool = False  # tile1 multiplies by the int8-quantized input (xq, xd), not x
