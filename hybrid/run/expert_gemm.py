"""Prefill's many-token experts as dense GEMMs in CPU torch: oneDNN reaches AVX-512 BF16 and AMX, the kernels do not.

Dimension legend: T tokens, K top-k, H hidden, I expert width, n tokens of one expert in a call.

In a long prefill chunk an expert gets dozens of tokens. The CPU kernels then run at the FMA units' fp32 rate
(~155 GFLOP/s on a Zen 4 socket), while torch's bf16 GEMM reaches ~620 there and more with AMX. An expert with at
least `min_tokens` tokens in a call is therefore dequantized once to dense float32 (cpu_kernels.dequant, on the
kernel worker's threads), cast to `dtype` and multiplied by torch; the rest stay on the kernels. Where that pays
off is measured on this machine, not guessed: `measure_crossover` times both paths on one expert at growing token
counts (the loader runs it once per model); on a CPU without fast bf16 or AMX the kernels may win at every count,
and the GEMM path stays off.

cpu_kernels stays free of torch: this module is the runtime's.
"""

import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from cpu_kernels import SKIP
from cpu_kernels.dequant import dense_matrix, dense_shape
from cpu_kernels.store import PROJECTIONS, projection_shape
from hybrid.run.routed import add_routed

# Token counts per expert the crossover is measured at (a K2 prefill chunk of 512-8192 tokens gives its
# experts ~11-170 tokens each).
CROSSOVER_COUNTS = (8, 16, 32, 64, 128, 256)


@functools.cache
def gemm_dtype() -> torch.dtype:
    """bf16 where oneDNN multiplies it natively (AVX-512 BF16 or AMX), else float32: on plain AVX2/AVX-512 CPUs
    torch's bf16 GEMM converts each element and runs at a fraction of its fp32 rate."""
    fast_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


class ExpertGemm:
    """The GEMM path of one layer's CPU experts (`cpu`, a cpu_kernels.MoEExperts): experts with >= min_tokens
    tokens in a call. Dense scratch comes from `scratch` (one DenseScratch shared by a model's layers)."""

    def __init__(self, cpu, min_tokens: int, scratch: "DenseScratch", dtype: torch.dtype | None = None):
        if min_tokens < 1:
            raise ValueError(f"min_tokens must be at least 1, got {min_tokens}")
        self.cpu, self.min_tokens, self.scratch = cpu, min_tokens, scratch
        self.dtype = dtype or gemm_dtype()
        self.pairs_run = 0  # (token, expert) pairs computed here (profile, tests)

    def pairs(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T, K] int64 (CPU; SKIP for pairs computed elsewhere) -> bool [T, K]: the pairs whose expert has
        at least min_tokens pairs in this call."""
        counts = torch.bincount(ids[ids != SKIP], minlength=self.cpu.n_experts)
        return (ids != SKIP) & (counts[ids.clamp(min=0)] >= self.min_tokens)

    def run(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [T, H] float32 CPU; ids [T, K], weights [T, K] float32; mask [T, K] from pairs() -> [T, H] float32: the
        sum over masked pairs of weight * expert(x)."""
        self.pairs_run += int(mask.sum())

        def expert(e, rows):
            gate, up, down = self.matrices(e)
            rows = rows.to(self.dtype)
            return (F.silu(rows @ gate) * (rows @ up)) @ down

        return add_routed(torch.zeros(x.shape, dtype=torch.float32), x, ids, weights,
                          torch.unique(ids[mask]).tolist(), expert, mask)

    def matrices(self, e: int) -> tuple[torch.Tensor, ...]:
        """Expert e's (gate, up, down) as [in, out] torch views in self.dtype, valid until the next call."""
        store, threads = self.cpu.store, self.cpu.threads
        out = []
        for name in PROJECTIONS:
            fmt = store.format_of(name)
            n_out, n_in = projection_shape(name, store.hidden, store.width)
            shape, _ = dense_shape(fmt, n_out, n_in)
            dense = self.scratch.array(name, shape)
            transposed = dense_matrix(fmt, store.values[name][e], store.scales[name][e], n_out, n_in, dense, threads)
            w = torch.from_numpy(dense)
            w = w[:, :n_out] if transposed else w.T  # [in, out] either way: x @ w
            out.append(w if self.dtype == torch.float32 else w.to(self.dtype))
        return tuple(out)


class DenseScratch:
    """One dense float32 matrix per projection, shared by a model's layers (they compute one after another):
    three K2 expert matrices, 176 MB, allocated at first use and grown, never per call."""

    def __init__(self):
        self._arrays = {}

    def array(self, name: str, shape: tuple) -> np.ndarray:
        a = self._arrays.get(name)
        if a is None or a.size < shape[0] * shape[1]:
            a = self._arrays[name] = np.empty(shape[0] * shape[1], np.float32)
        return a[:shape[0] * shape[1]].reshape(shape)


def measure_crossover(cpu, scratch: DenseScratch, counts=CROSSOVER_COUNTS, dtype=None) -> int | None:
    """The fewest tokens per expert from which the GEMM path beats the kernels on `cpu`'s expert 0 (best of two
    runs each; first_winning); None when it never does. Stops at the second count in a row where the GEMM path
    wins."""
    gemm = ExpertGemm(cpu, 1, scratch, dtype)
    rng = np.random.default_rng(0)
    wins = []
    for n in counts:
        x = rng.standard_normal((n, cpu.hidden), dtype=np.float32)
        ids, weights = np.zeros((n, 1), np.int64), np.ones((n, 1), np.float32)
        xt, ids_t, w_t = torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(weights)
        kernel_s = best_of(lambda: cpu.forward(x, ids, weights), 2)
        gemm_s = best_of(lambda: gemm.run(xt, ids_t, w_t, torch.ones_like(ids_t, dtype=torch.bool)), 2)
        wins.append(gemm_s < kernel_s)
        if len(wins) >= 2 and wins[-1] and wins[-2]:
            break
    return first_winning(counts, wins)


def first_winning(counts, wins: list) -> int | None:
    """counts[i] for the first i from which the GEMM path won at every count measured (wins[i:] all True);
    None when it lost at the last one: a win the larger counts do not confirm is noise."""
    if not wins or not wins[-1]:
        return None
    first = len(wins) - 1
    while first > 0 and wins[first - 1]:
        first -= 1
    return counts[first]


def best_of(fn, n: int) -> float:
    """The shortest of n timed calls of fn(), in seconds (a shared machine's noise only ever adds time)."""
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


__all__ = ["CROSSOVER_COUNTS", "DenseScratch", "ExpertGemm", "best_of", "first_winning", "gemm_dtype",
           "measure_crossover"]
