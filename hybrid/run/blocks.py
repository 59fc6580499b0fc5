"""Weight matrices of a GGUF checkpoint kept in their blocks on the CPU (plan kernel cpu_gguf), as torch modules.

Dimension legend: T tokens, n_out / n_in the matrix size.

They stand where an nn.Linear or nn.Embedding would: the CPU kernels (cpu_kernels.dense) multiply by the
memory-mapped blocks, so a machine without a GPU runs K2's ~11 B non-expert parameters at the file's size
rather than expanding them to 22 GB of bf16. Inputs come from any device and results go back to it.
"""

import numpy as np
import torch
from torch import nn


class BlockLinear(nn.Module):
    """y = x @ W.T with W a cpu_kernels DenseMatrix (its stored blocks)."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = matrix
        self.in_features, self.out_features = matrix.n_in, matrix.n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to("cpu", torch.float32).contiguous().numpy()
        y = torch.from_numpy(self.matrix.forward(flat))
        return y.to(x.device, x.dtype).view(*x.shape[:-1], self.out_features)

    def dense_weight(self, dtype) -> torch.Tensor:
        """The whole matrix dequantized (for a caller that needs W itself, such as MLA's absorbed kv_b)."""
        return torch.from_numpy(self.matrix.rows(np.arange(self.out_features))).to(dtype)


class BlockEmbedding(nn.Module):
    """An embedding table kept in its blocks: a lookup dequantizes only the rows of the tokens asked for."""

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
