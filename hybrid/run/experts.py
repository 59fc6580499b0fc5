"""The routed-expert step, one interface: hidden [T, H], expert ids [T, K], weights [T, K] in; [T, H] out.

`submit` starts the work and `wait` returns it, so the MoE block can run the shared expert in between; an
implementation that computes on another device or thread (the CPU kernels) overlaps there. TorchExperts is
the plain torch implementation: it holds the experts as checkpoint-named modules (`experts.{e}.gate_proj`)
and computes eagerly in `submit`.
"""

import numpy as np
import torch
from torch import nn

from cpu_kernels import SKIP
from hybrid.run.routed import add_routed
from hybrid.run.timing import NULL_RECORDER

from hybrid.run.layers import MLP


class TorchExperts(nn.ModuleList):
    """E expert MLPs [I x H]; each token's top-K outputs summed with their router weights."""

    def __init__(self, n_experts: int, hidden: int, width: int):
        super().__init__(MLP(hidden, width) for _ in range(n_experts))
        self._result = None

    def submit(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        self._result = add_routed(torch.zeros_like(hidden), hidden, ids, weights, torch.unique(ids).tolist(),
                                  lambda e, rows: self[e](rows))

    def wait(self) -> torch.Tensor:
        out, self._result = self._result, None
        return out

    def forward(self, hidden, ids, weights):
        self.submit(hidden, ids, weights)
        return self.wait()


class HostCopy:
    """The one path for activations between the torch device and the CPU kernels: float32 numpy on the host,
    through a pinned staging buffer when the device is a GPU (so the copy is a single DMA)."""

    def __init__(self):
        self._pinned = None

    def to_host(self, t: torch.Tensor) -> np.ndarray:
        """[T, H] tensor on any device -> float32 C-contiguous numpy array (kept alive by the caller)."""
        if t.device.type == "cpu":
            return t.detach().to(torch.float32).contiguous().numpy()
        n = t.numel()
        if self._pinned is None or self._pinned.numel() < n:
            self._pinned = torch.empty(n, dtype=torch.float32, pin_memory=True)
        staged = self._pinned[:n].view(t.shape)
        staged.copy_(t.detach())
        # Safe to hand out without a copy: each layer's HybridExperts owns its buffer, and only its own next
        # submit (after wait) writes it again.
        return staged.numpy()

    @staticmethod
    def to_device(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(a).to(device=like.device, dtype=like.dtype, non_blocking=True)


class HybridExperts(nn.Module):
    """One layer's routed experts split by the plan: most on the CPU kernels (`cpu`, a cpu_kernels.MoEExperts
    holding every expert of the layer), some optionally as torch modules on the GPU (`experts.{e}`).

    A (token, expert) pair whose expert lives on the GPU goes to the CPU kernel with the id SKIP, which leaves it
    out. In a long prefill chunk two other paths may take pairs the same way: `gemm` (hybrid/run/expert_gemm.py:
    experts with many tokens as dense GEMMs in CPU torch) and `streamer` (hybrid/run/expert_streaming.py: the
    whole layer's experts streamed to the GPU and computed there).
    """

    rec = NULL_RECORDER

    def __init__(self, cpu, n_experts: int, gpu_experts: dict[int, nn.Module] | None = None):
        super().__init__()
        self.cpu = cpu
        on_gpu = torch.zeros(n_experts, dtype=torch.bool)
        for e, module in (gpu_experts or {}).items():
            self.add_module(str(e), module)  # named like the checkpoint: experts.{e}.gate_proj.weight
            on_gpu[e] = True
        self.on_gpu = on_gpu
        self.gemm = None  # an ExpertGemm when the loader measured that dense GEMMs pay off here
        self.streamer, self.layer = None, None  # an ExpertStreamer and this layer's number, when the plan streams
        self.host = HostCopy()
        self._gpu_out = self._gemm_work = self._streamed = None
        self._like = None

    def submit(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        self._like = hidden
        if self.streamer is not None and self.streamer.takes(hidden.shape[0]):
            gpu_pairs = self.on_gpu.to(ids.device)[ids]
            streamed = self.streamer.compute(self.layer, hidden, torch.where(gpu_pairs, SKIP, ids), weights)
            if gpu_pairs.any():
                streamed = streamed + self._run_gpu(hidden, ids, weights, gpu_pairs)
            self._streamed = streamed
            return
        ids_c, w_c = ids.to("cpu", torch.int64), weights.to("cpu", torch.float32)
        gpu_pairs = self.on_gpu[ids_c]
        self._gpu_out = None
        if gpu_pairs.any():
            self._gpu_out = self._run_gpu(hidden, ids, weights, gpu_pairs.to(ids.device))
            ids_c = torch.where(gpu_pairs, SKIP, ids_c)
        with self.rec.section("transfers"):
            self._x = self.host.to_host(hidden)
        if self.gemm is not None:
            gemm_pairs = self.gemm.pairs(ids_c)
            if gemm_pairs.any():  # computed in wait(), by torch on the cores the kernels take turns with
                self._gemm_work = (ids_c, w_c, gemm_pairs)
                ids_c = torch.where(gemm_pairs, SKIP, ids_c)
        self._ids, self._w = ids_c.contiguous().numpy(), w_c.contiguous().numpy()
        self.cpu.submit(self._x, self._ids, self._w)

    def _run_gpu(self, hidden, ids, weights, mask):
        return add_routed(torch.zeros_like(hidden), hidden, ids, weights, torch.unique(ids[mask]).tolist(),
                          lambda e, rows: self._modules[str(e)](rows), mask)

    def wait(self) -> torch.Tensor:
        if self._streamed is not None:
            out, self._streamed = self._streamed, None
            return out
        gemm_out = None
        if self._gemm_work is not None:
            gemm_out = self.gemm.run(torch.from_numpy(self._x), *self._gemm_work)
            self._gemm_work = None
        result = self.cpu.wait()
        if gemm_out is not None:
            result += gemm_out.numpy()
        with self.rec.section("transfers"):
            out = self.host.to_device(result, self._like)
        if self._gpu_out is not None:
            out = out + self._gpu_out
        return out

    def forward(self, hidden, ids, weights):
        self.submit(hidden, ids, weights)
        return self.wait()
