"""Expert weight formats: names, group sizes, array shapes and byte sizes.

Dimension legend: E experts, H hidden, I expert width, G group size (input channels per scale),
R tile rows (`TILE_ROWS`), n_out / n_in the output / input size of one projection matrix.

A projection matrix [n_out, n_in] is stored as `ceil(n_out / R)` row tiles of R rows each (the last one
zero-padded); `store.py` documents the byte layout. This module is the single source of the sizes the
planner budgets with (`matrix_bytes`, `expert_bytes`), so it imports nothing but the standard library.

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
levels; smaller groups help. `MATVEC_ERROR_BOUND` is the bound the tests hold each format to (about 1.5x the
worst measured case).
"""

from dataclasses import dataclass

FORMAT_NAMES = ("bf16", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 128
# Rows per tile: a multiple of the 16-float AVX-512 vector, long enough that the inner loop over a tile's
# rows amortises its setup, short enough that a tile row chunk of 4 input columns stays in L1.
TILE_ROWS = 128
SCALE_BYTES = 4  # scales are float32
MATVEC_ERROR_BOUND = {"bf16": 0.003, "int8": 0.02, "int4": 0.35}


@dataclass(frozen=True)
class Format:
    """A weight format: `name` in FORMAT_NAMES, `group_size` G for int8/int4 (None for bf16)."""

    name: str
    group_size: int | None = None

    def __post_init__(self):
        if self.name not in FORMAT_NAMES:
            raise ValueError(f"format name {self.name!r} is not one of {FORMAT_NAMES}")
        if self.name == "bf16":
            if self.group_size is not None:
                raise ValueError("format bf16 takes no group_size")
        elif self.group_size not in GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size!r} for {self.name} is not one of {GROUP_SIZES}")

    @property
    def quantized(self) -> bool:
        return self.name != "bf16"

    def __str__(self) -> str:
        return self.name if self.group_size is None else f"{self.name}-g{self.group_size}"


def parse_format(text: str) -> Format:
    """`"bf16"`, `"int8"`, `"int4"` (group 128) or `"int8-g32"`-style names -> Format."""
    name, _, group = text.partition("-g")
    if name == "bf16":
        if group:
            raise ValueError(f"format {text!r}: bf16 takes no group size")
        return Format("bf16")
    if group and not group.isdigit():
        raise ValueError(f"format {text!r}: group size must be a number")
    return Format(name, int(group) if group else DEFAULT_GROUP_SIZE)


def n_tiles(n_out: int) -> int:
    return -(-n_out // TILE_ROWS)


def check_matrix(fmt: Format, n_out: int, n_in: int) -> None:
    """Raise ValueError unless a [n_out, n_in] matrix can be stored in `fmt`."""
    if n_out <= 0 or n_in <= 0:
        raise ValueError(f"matrix shape ({n_out}, {n_in}) must be positive")
    # The kernels unroll the input dimension by 8 columns (bf16) or within a group (int8/int4).
    step = 8 if fmt.group_size is None else fmt.group_size
    if n_in % step:
        raise ValueError(f"input size {n_in} is not a multiple of {step} as format {fmt} requires")


def value_shape(fmt: Format, n_out: int, n_in: int) -> tuple:
    """Shape of one expert's packed values for a [n_out, n_in] matrix (see store.py for the order)."""
    check_matrix(fmt, n_out, n_in)
    if fmt.name == "bf16":
        return (n_tiles(n_out), n_in, TILE_ROWS)
    n_groups = n_in // fmt.group_size
    per_group = fmt.group_size if fmt.name == "int8" else fmt.group_size // 2
    return (n_tiles(n_out), n_groups, per_group, TILE_ROWS)


def scale_shape(fmt: Format, n_out: int, n_in: int) -> tuple:
    """Shape of one expert's float32 scales; bf16 has none: an empty [nt, 0, 0] placeholder the kernels can index."""
    check_matrix(fmt, n_out, n_in)
    if fmt.name == "bf16":
        return (n_tiles(n_out), 0, 0)
    return (n_tiles(n_out), n_in // fmt.group_size, TILE_ROWS)


def value_dtype_name(fmt: Format) -> str:
    return {"bf16": "uint16", "int8": "int8", "int4": "uint8"}[fmt.name]


def matrix_bytes(fmt: Format, n_out: int, n_in: int) -> int:
    """Bytes one expert's [n_out, n_in] matrix occupies in the store (values + scales, tile padding included)."""
    item = {"bf16": 2, "int8": 1, "int4": 1}[fmt.name]
    n_values = 1
    for d in value_shape(fmt, n_out, n_in):
        n_values *= d
    n_scales = 1
    for d in scale_shape(fmt, n_out, n_in):
        n_scales *= d
    return n_values * item + n_scales * SCALE_BYTES


def expert_bytes(fmt: Format, hidden: int, width: int) -> int:
    """Bytes of one routed expert (gate [I, H] + up [I, H] + down [H, I]) in the store."""
    return 2 * matrix_bytes(fmt, width, hidden) + matrix_bytes(fmt, hidden, width)
