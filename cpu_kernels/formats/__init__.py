"""Expert weight formats: the closed registry, format names, array shapes and byte sizes.

Dimension legend: E experts, H hidden, I expert width, G group size (input channels per scale),
n_out / n_in the output / input size of one projection matrix.

`FORMATS` is every format the store, the kernels and plan files know, by the name they write ("bf16", "int8",
"int4"); a `Format` is one of them with its group size ("int8-g32"). Each entry is a `FormatSpec`
(formats/spec.py): its array shapes and tile geometry, bytes per weight, quantizer, dequantizer and kernels, all
from the format's own module (bf16.py, int8.py, int4.py). Plan files name formats, never code; adding one is a
module and a line in `FORMATS` (docs/formats.md). This is also the one source of the sizes the planner budgets
with (`matrix_bytes`, `expert_bytes`).

Measured error of each format (relative error ||W_q x - W x|| / ||W x|| of one matvec with K2's gate shape
2048 x 7168, x ~ N(0, 1); "normal" weights ~ N(0, 1), "heavy" weights Student-t with 3 degrees of freedom;
measured by `quantize.matvec_error`, seed 0):

    format       normal    heavy
    bf16         0.0017    0.0017
    int8 G=128   0.0064    0.0134
    int8 G=64    0.0060    0.0108
    int8 G=32    0.0055    0.0083
    int4 G=128   0.116     0.225
    int4 G=64    0.105     0.179
    int4 G=32    0.096     0.144

Heavy tails hurt because one large weight sets its group's scale and flattens the rest of the group to few
levels; smaller groups help. Each format's `error_bound` is the bound the tests hold it to (about 1.5x the worst
measured case).
"""

import math
from dataclasses import dataclass

import numpy as np

from . import bf16, gguf, int4, int8
from .spec import FormatSpec
from .tiled import DEFAULT_GROUP_SIZE, GROUP_SIZES, TILE_ROWS

# The registry, closed: store manifests, plan files and `hybrid convert` name one of these; a new format is its
# module's SPEC added here (docs/formats.md).
# The GGUF types (formats/gguf/, named as ggml names them: "Q4_K", "IQ2_XXS") are read from .gguf files as released.
FORMATS = {spec.name: spec for spec in (bf16.SPEC, int8.SPEC, int4.SPEC, *gguf.SPECS)}
FORMAT_NAMES = tuple(FORMATS)
WRITABLE_NAMES = tuple(name for name, spec in FORMATS.items() if spec.quantize is not None)
GGUF_NAMES = tuple(name for name, spec in FORMATS.items() if spec.ggml_type is not None)
MATVEC_ERROR_BOUND = {name: spec.error_bound for name, spec in FORMATS.items() if spec.quantize is not None}
# The GGUF types share one marker class (their kernels dispatch on its code), hence setdefault: the first
# spec of a class answers for the kernels and tile_rows they all share.
_BY_KIND = {}
for _spec in FORMATS.values():
    _BY_KIND.setdefault(type(_spec.kind), _spec)

__all__ = ["DEFAULT_GROUP_SIZE", "FORMATS", "FORMAT_NAMES", "GGUF_NAMES", "GROUP_SIZES", "WRITABLE_NAMES", "MATVEC_ERROR_BOUND", "TILE_ROWS",
           "Format", "FormatSpec", "bytes_per_weight", "check_matrix", "expert_bytes", "matrix_bytes",
           "parse_format", "scale_shape", "spec_of_kind", "value_dtype_name", "value_shape"]


@dataclass(frozen=True)
class Format:
    """A weight format: `name` in FORMATS, `group_size` G from its spec's group_sizes (None if it has none)."""

    name: str
    group_size: int | None = None

    def __post_init__(self):
        if self.name not in FORMATS:
            raise ValueError(f"format name {self.name!r} is not one of {FORMAT_NAMES}")
        groups = FORMATS[self.name].group_sizes
        if not groups:
            if self.group_size is not None:
                raise ValueError(f"format {self.name} takes no group_size")
        elif self.group_size not in groups:
            raise ValueError(f"group_size {self.group_size!r} for {self.name} is not one of {groups}")

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self.name]

    @property
    def quantized(self) -> bool:
        """Whether the format keeps scales (int8, int4), i.e. a scales array and file per projection."""
        return self.spec.has_scales

    def __str__(self) -> str:
        return self.name if self.group_size is None else f"{self.name}-g{self.group_size}"


def parse_format(text: str) -> Format:
    """`"bf16"`, `"int8"`, `"int4"` (their default group) or `"int8-g32"`-style names -> Format."""
    name, _, group = text.partition("-g")
    spec = FORMATS.get(name)
    if spec is not None and not spec.group_sizes:
        if group:
            raise ValueError(f"format {text!r}: {name} takes no group size")
        return Format(name)
    if group and not group.isdigit():
        raise ValueError(f"format {text!r}: group size must be a number")
    return Format(name, int(group) if group else spec.default_group if spec else None)


def spec_of_kind(kind_class: type) -> FormatSpec:
    """A format whose numba marker (FormatSpec.kind) is an instance of `kind_class`: the one for bf16/int8/int4,
    the first GGUF type for GGUFKernels (kernels and tile rows are the same for all of them)."""
    spec = _BY_KIND.get(kind_class)
    if spec is None:
        raise ValueError(f"{kind_class!r} is not the kernel marker of any format in {FORMAT_NAMES}")
    return spec


def check_matrix(fmt: Format, n_out: int, n_in: int) -> None:
    """Raise ValueError unless a [n_out, n_in] matrix can be stored in `fmt`."""
    if n_out <= 0 or n_in <= 0:
        raise ValueError(f"matrix shape ({n_out}, {n_in}) must be positive")
    step = fmt.spec.input_multiple(fmt.group_size)
    if n_in % step:
        raise ValueError(f"input size {n_in} is not a multiple of {step} as format {fmt} requires")
    if n_out % fmt.spec.output_multiple:
        raise ValueError(f"output size {n_out} is not a multiple of {fmt.spec.output_multiple} as format {fmt} "
                         "requires")


def value_shape(fmt: Format, n_out: int, n_in: int) -> tuple:
    """Shape of one expert's values for a [n_out, n_in] matrix, tile axis first (the format's module says more)."""
    check_matrix(fmt, n_out, n_in)
    return fmt.spec.value_shape(fmt.group_size, n_out, n_in)


def scale_shape(fmt: Format, n_out: int, n_in: int) -> tuple:
    """Shape of one expert's scales; a format without scales gives an empty [nt, 0, 0] placeholder."""
    check_matrix(fmt, n_out, n_in)
    return fmt.spec.scale_shape(fmt.group_size, n_out, n_in)


def value_dtype_name(fmt: Format) -> str:
    return fmt.spec.value_dtype


def matrix_bytes(fmt: Format, n_out: int, n_in: int) -> int:
    """Bytes one expert's [n_out, n_in] matrix occupies in the store (values + scales, tile padding included)."""
    spec = fmt.spec
    values = math.prod(value_shape(fmt, n_out, n_in)) * np.dtype(spec.value_dtype).itemsize
    return values + math.prod(scale_shape(fmt, n_out, n_in)) * np.dtype(spec.scale_dtype).itemsize


def expert_bytes(fmt: Format, hidden: int, width: int) -> int:
    """Bytes of one routed expert (gate [I, H] + up [I, H] + down [H, I]) in the store."""
    return 2 * matrix_bytes(fmt, width, hidden) + matrix_bytes(fmt, hidden, width)


def bytes_per_weight(fmt: Format) -> float:
    """Store bytes per weight, scales included, tile padding not (int4-g128: 0.53125)."""
    return fmt.spec.bits_per_weight(fmt.group_size) / 8
