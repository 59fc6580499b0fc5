"""CPU kernels for routed MoE experts: expert store, formats, decode/prefill kernels and MoEExperts.

numpy and numba only (never torch): bf16 travels as uint16. See formats/ for the format registry (each format's
layout, quantizer and kernels), store.py for the on-disk layout, phases.py for how a call runs the kernels, moe.py
for the API the runtime calls, bench.py for `python -m cpu_kernels.bench`.
"""

from .floats import bf16_to_f32, dequantize_fp8, f32_to_bf16, fp8_e4m3_table
from .formats import (
    DEFAULT_GROUP_SIZE,
    FORMAT_NAMES,
    FORMATS,
    GROUP_SIZES,
    TILE_ROWS,
    Format,
    bytes_per_weight,
    expert_bytes,
    matrix_bytes,
    parse_format,
)
from .moe import SKIP, MoEExperts
from .quantize import dequantize_matrix, quantize_fp8_matrix, quantize_matrix
from .store import ExpertStore, LayerStoreWriter, MemoryLayerWriter, build_store, load_store, save_store
from .threads import KernelThreads, physical_cores

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "FORMATS",
    "FORMAT_NAMES",
    "KernelThreads",
    "GROUP_SIZES",
    "TILE_ROWS",
    "ExpertStore",
    "Format",
    "LayerStoreWriter",
    "MemoryLayerWriter",
    "MoEExperts",
    "SKIP",
    "bf16_to_f32",
    "build_store",
    "bytes_per_weight",
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
