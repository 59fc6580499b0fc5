"""One routed expert's matrices from the CPU expert store as dense torch tensors, on any device.

Dimension legend: E experts, H hidden, I expert width, R rows per tile (128), nt tiles, ng groups, G group size.

The prefill paths that compute experts as dense GEMMs (hybrid/run/expert_gemm.py on the CPU, and streamed to the
GPU) need each expert's weights as [n_out, n_in] matrices. They are unpacked here in torch from the store's own
arrays (cpu_kernels/store.py documents the layouts), so the same code runs where the bytes are: on the CPU for
the GEMM path, on the GPU after the quantized bytes crossed PCIe (int4 crosses at a quarter of bf16's bytes).
Every value is q * scale computed in float32, as the store's numpy dequantizer (cpu_kernels.dequantize_matrix)
does, then rounded once to the compute dtype. GGUF block types, whose decoders live in the numba kernels, are
decoded there to float32 on the host.
"""

import warnings

import numpy as np
import torch

from cpu_kernels import dequantize_matrix
from cpu_kernels.store import PROJECTIONS, projection_shape

TILED = ("bf16", "int8", "int4")  # the formats unpacked in torch; the others are decoded on the host


def as_tensor(a: np.ndarray) -> torch.Tensor:
    """A torch view of a (possibly read-only, memory-mapped) store array: nothing writes through it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(a))


def unpack(fmt_name: str, values: torch.Tensor, scales: torch.Tensor, n_out: int, dtype) -> torch.Tensor:
    """One expert's tiled values and scales (torch tensors, on any device) -> [n_out, n_in] in `dtype`.

    bf16 values [nt, n_in, R] (bf16 bits as int16); int8 values [nt, ng, G, R] and int4 [nt, ng, G/2, R] (two
    codes per byte: low nibble column 2k, high nibble 2k + 1, each minus 8) with scales [nt, ng, R]."""
    if fmt_name == "bf16":
        w = values.view(torch.bfloat16).transpose(1, 2)  # [nt, R, n_in]
        return w.reshape(-1, w.shape[-1])[:n_out].to(dtype)
    if fmt_name == "int8":
        q = values.to(torch.float32)
    elif fmt_name == "int4":
        codes = values.to(torch.int16)  # uint8 has no right shift on every device; int16 does
        q = torch.stack(((codes & 15) - 8, (codes >> 4) - 8), dim=3).to(torch.float32)  # [nt, ng, G/2, 2, R]
        q = q.flatten(2, 3)
    else:
        raise ValueError(f"format {fmt_name} is not unpacked in torch (one of {TILED})")
    w = (q * scales[:, :, None, :]).permute(0, 3, 1, 2)  # [nt, R, ng, G]
    return w.reshape(w.shape[0] * w.shape[1], -1)[:n_out].to(dtype)


def host_arrays(store, e: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Expert e's values and scales of projection `name`, as the store holds them (bf16's uint16 seen as int16,
    a dtype torch has)."""
    values = store.values[name][e]
    return (values.view(np.int16) if values.dtype == np.uint16 else values), store.scales[name][e]


def expert_matrices(store, e: int, dtype=torch.bfloat16, device="cpu") -> tuple[torch.Tensor, ...]:
    """Expert e of an ExpertStore -> (gate [I, H], up [I, H], down [H, I]) dense in `dtype` on `device`."""
    out = []
    for name in PROJECTIONS:
        fmt = store.format_of(name)
        n_out, n_in = projection_shape(name, store.hidden, store.width)
        values, scales = host_arrays(store, e, name)
        if fmt.name in TILED:
            w = unpack(fmt.name, as_tensor(values).to(device), as_tensor(scales).to(device), n_out, dtype)
        else:
            w = torch.from_numpy(dequantize_matrix(values, scales, fmt, n_out, n_in)).to(device, dtype)
        out.append(w)
    return tuple(out)
