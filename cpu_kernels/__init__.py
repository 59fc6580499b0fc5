"""CPU kernels for routed MoE experts: expert store, formats, decode/prefill kernels and MoEExperts.

numpy and numba only (never torch): bf16 travels as uint16. See store.py for the on-disk layout, decode.py and
prefill.py for the kernels, moe.py for the API the runtime calls, bench.py for `python -m cpu_kernels.bench`.
"""

from .formats import DEFAULT_GROUP_SIZE, FORMAT_NAMES, GROUP_SIZES, TILE_ROWS, Format, expert_bytes, matrix_bytes, parse_format
from .moe import MoEExperts
from .quantize import (
    bf16_to_f32,
    dequantize_fp8,
    dequantize_matrix,
    f32_to_bf16,
    fp8_e4m3_table,
    quantize_fp8_matrix,
    quantize_matrix,
)
from .store import ExpertStore, LayerStoreWriter, build_store, load_store, save_store
from .threads import KernelThreads, physical_cores

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "FORMAT_NAMES",
    "KernelThreads",
    "GROUP_SIZES",
    "TILE_ROWS",
    "ExpertStore",
    "Format",
    "LayerStoreWriter",
    "MoEExperts",
    "bf16_to_f32",
    "build_store",
    "dequantize_fp8",
    "dequantize_matrix",
    "expert_bytes",
    "f32_to_bf16",
    "fp8_e4m3_table",
    "load_store",
    "matrix_bytes",
    "parse_format",
    "physical_cores",
    "quantize_fp8_matrix",
    "quantize_matrix",
    "save_store",
]
