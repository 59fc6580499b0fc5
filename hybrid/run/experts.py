"""The routed-expert step, one interface: hidden [T, H], expert ids [T, K], weights [T, K] in; [T, H] out.

`submit` starts the work and `wait` returns it, so the MoE block can run the shared expert in between; an
implementation that computes on another device or thread (the CPU kernels) overlaps there. TorchExperts is
the plain torch implementation: it holds the experts as checkpoint-named modules (`experts.{e}.gate_proj`)
and computes eagerly in `submit`.
"""

import numpy as np
import torch
from torch import nn

from hybrid.run.timing import NULL_RECORDER

from hybrid.run.layers import MLP


class TorchExperts(nn.ModuleList):
    """E expert MLPs [I x H]; each token's top-K outputs summed with their router weights."""

    def __init__(self, n_experts: int, hidden: int, width: int):
        super().__init__(MLP(hidden, width) for _ in range(n_experts))
        self._result = None

    def submit(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        out = torch.zeros_like(hidden)
        flat_ids = ids.flatten()
        token_of = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
        # Grouped by expert so each expert's weights are read once per call, whatever the token count.
        for e in torch.unique(flat_ids).tolist():
            slots = (flat_ids == e).nonzero().squeeze(1)
            tokens = token_of[slots]
            y = self[e](hidden[tokens]) * weights.flatten()[slots, None].to(hidden.dtype)
            out.index_add_(0, tokens, y)
        self._result = out

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

    A (token, expert) pair whose expert lives on the GPU is sent to the CPU kernel with weight 0 and the id of
    an expert that token already uses there, so the kernel streams nothing extra for it.
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
        self.filler = int((~on_gpu).nonzero()[0]) if (~on_gpu).any() else 0
        self.host = HostCopy()
        self._gpu_out = None
        self._like = None

    def submit(self, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor):
        ids_c, w_c = ids.to("cpu", torch.int64), weights.to("cpu", torch.float32)
        gpu_pairs = self.on_gpu[ids_c]
        self._like = hidden
        self._gpu_out = None
        if gpu_pairs.any():
            self._gpu_out = self._run_gpu(hidden, ids, weights, gpu_pairs.to(ids.device))
            some_cpu = torch.where(gpu_pairs, -1, ids_c).amax(dim=1, keepdim=True)  # an expert the token uses here
            some_cpu = torch.where(some_cpu < 0, self.filler, some_cpu).expand_as(ids_c)
            ids_c = torch.where(gpu_pairs, some_cpu, ids_c)
            w_c = torch.where(gpu_pairs, 0.0, w_c)
        with self.rec.section("transfers"):
            self._x = self.host.to_host(hidden)
        self._ids, self._w = ids_c.contiguous().numpy(), w_c.contiguous().numpy()
        self.cpu.submit(self._x, self._ids, self._w)

    def _run_gpu(self, hidden, ids, weights, mask):
        out = torch.zeros_like(hidden)
        for e in torch.unique(ids[mask]).tolist():
            slot = (ids == e) & mask
            tokens, k = slot.nonzero(as_tuple=True)
            y = self._modules[str(e)](hidden[tokens]) * weights[tokens, k, None].to(hidden.dtype)
            out.index_add_(0, tokens, y)
        return out

    def wait(self) -> torch.Tensor:
        result = self.cpu.wait()
        with self.rec.section("transfers"):
            out = self.host.to_device(result, self._like)
        if self._gpu_out is not None:
            out = out + self._gpu_out
        return out

    def forward(self, hidden, ids, weights):
        self.submit(hidden, ids, weights)
        return self.wait()
