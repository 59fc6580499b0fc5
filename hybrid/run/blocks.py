"""Weight matrices the CPU kernels compute (plan kernel cpu_linear), as torch modules.

Dimension legend: T tokens, n_out / n_in the matrix size, B batch, Hh heads, N nope dims, V value dims,
R kv_lora_rank.

They stand where an nn.Linear or nn.Embedding would: the CPU kernels (cpu_kernels.dense) multiply by the matrix
in its cpu_kernels format, int8 quantized at load or a GGUF's memory-mapped blocks, so a machine without a GPU
streams 1 byte per weight (or the file's size) instead of bf16's 2, and never expands K2's ~11 B non-expert
parameters to 22 GB. Inputs come from any device and dtype; the kernels compute in float32 and results go back to
the input's device and dtype.
"""

import numpy as np
import torch
from torch import nn


class BlockLinear(nn.Module):
    """y = x @ W.T with W a cpu_kernels DenseMatrix."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = matrix
        self.in_features, self.out_features = matrix.n_in, matrix.n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to("cpu", torch.float32).contiguous().numpy()
        y = torch.from_numpy(self.matrix.forward(flat))
        return y.to(x.device, x.dtype).view(*x.shape[:-1], self.out_features)

    def dense_weight(self, dtype) -> torch.Tensor:
        """The whole matrix dequantized (for a caller that needs W itself)."""
        return torch.from_numpy(self.matrix.rows(np.arange(self.out_features))).to(dtype)


class AbsorbedKvB(nn.Module):
    """MLA's kv_b_proj [Hh x (N + V), R] kept as the absorbed attention uses it, two cpu_kernels DenseStacks of one
    matrix per head: `key_half` [Hh][R, N] (transposed) and `value_half` [Hh][V, R]."""

    def __init__(self, key_half, value_half):
        super().__init__()
        self.key_half, self.value_half = key_half, value_half

    @staticmethod
    def _per_head(stack, x: torch.Tensor) -> torch.Tensor:
        B, T, Hh, n_in = x.shape
        heads = x.to("cpu", torch.float32).permute(2, 0, 1, 3).reshape(Hh, B * T, n_in).contiguous().numpy()
        y = torch.from_numpy(stack.forward(heads))  # [Hh, B * T, n_out]
        return y.view(Hh, B, T, stack.n_out).permute(1, 2, 0, 3).to(x.device, x.dtype)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, T, Hh, N] -> the latent query [B, T, Hh, R] (q_nope times each head's key half)."""
        return self._per_head(self.key_half, q_nope)

    def absorb_output(self, o_lat: torch.Tensor) -> torch.Tensor:
        """The attention's latent output [B, T, Hh, R] -> values [B, T, Hh, V] (times each head's value half)."""
        return self._per_head(self.value_half, o_lat)


class BlockEmbedding(nn.Module):
    """An embedding table kept in its GGUF blocks: a lookup dequantizes only the rows of the tokens asked for."""

    def __init__(self, matrix, dtype: torch.dtype):
        super().__init__()
        self.matrix, self.dtype = matrix, dtype
        self.num_embeddings, self.embedding_dim = matrix.n_out, matrix.n_in

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.matrix.rows(ids.reshape(-1).cpu().numpy())
        return torch.from_numpy(rows).to(self.dtype).view(*ids.shape, self.embedding_dim)
