"""The routed-expert step, one interface: hidden [T, H], expert ids [T, K], weights [T, K] in; [T, H] out.

`submit` starts the work and `wait` returns it, so the MoE block can run the shared expert in between; an
implementation that computes on another device or thread (the CPU kernels) overlaps there. TorchExperts is
the plain torch implementation: it holds the experts as checkpoint-named modules (`experts.{e}.gate_proj`)
and computes eagerly in `submit`.
"""

import torch
from torch import nn

from hybrid.layers import MLP


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
