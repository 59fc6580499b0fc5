"""The routed-experts sum every implementation shares (TorchExperts, the GPU-resident experts of HybridExperts, the
CPU GEMM path and GPU prefill): each expert's (token, slot) pairs gathered, its rows computed in one call, the
results weighted and added back per token.

Legend: T tokens, K top-k, H hidden.
"""

import torch


def add_routed(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts, expert_fn,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """out [T, H] += weights[t, k] * expert_fn(e, x[t]) for every pair (t, k) with ids[t, k] = e, e in `experts`
    (and mask[t, k], when a bool mask [T, K] is given); expert_fn(e, rows [n, H]) -> [n, H]. Grouped by expert so
    each expert's weights are used once per call, whatever its number of tokens. Returns out."""
    for e in experts:
        pairs = ids == e if mask is None else (ids == e) & mask
        tokens, k = pairs.nonzero(as_tuple=True)
        y = expert_fn(e, x[tokens])
        out.index_add_(0, tokens, y.to(out.dtype) * weights[tokens, k, None].to(out.dtype))
    return out
