"""DenseMatrix: one weight matrix outside the routed experts, computed by the CPU kernels in its stored format.

Dimension legend: T tokens, n_out / n_in the matrix size, R the format's tile rows, B bytes per row.

A GGUF checkpoint keeps attention, shared experts, the dense layer and the head in block types too (Q4_K, Q6_K,
...). On a machine without a GPU those ~11 B parameters of K2 would take 22 GB as bf16; kept in their blocks
they stay the file's size, memory-mapped, and run on the same kernels as the routed experts:

    m = DenseMatrix.from_blocks(Format("Q6_K"), blocks, threads=worker)   # blocks uint8 [n_out, B], zero-copy
    y = m.forward(x)          # x float32 [T, n_in] -> y float32 [T, n_out]
    w = m.rows(ids)           # dequantized rows [len(ids), n_in]: an embedding lookup without expanding the table
"""

import numpy as np

from .formats import Format, scale_shape, value_shape
from .formats.gguf import dequantize_rows
from .phases import dense_phase
from .prefill import BLOCK_TOKENS
from .threads import KernelThreads, split_range

INLINE_BYTES = 1 << 20  # weight bytes x tokens below which one thread does it (a hand-off costs ~50-100 us)


class DenseMatrix:
    def __init__(self, fmt: Format, values: np.ndarray, n_out: int, n_in: int, threads: KernelThreads):
        self.fmt, self.n_out, self.n_in, self._threads = fmt, n_out, n_in, threads
        self.values = values
        self.scales = np.zeros(scale_shape(fmt, n_out, n_in), np.float32)

    @classmethod
    def from_blocks(cls, fmt: Format, blocks: np.ndarray, n_in: int, threads: KernelThreads) -> "DenseMatrix":
        """A GGUF matrix as stored: blocks uint8 [n_out, B] (a view of the memory-mapped file, not copied)."""
        if fmt.spec.ggml_type is None:
            raise ValueError(f"format {fmt} is not a GGUF type")
        n_out = blocks.shape[0]
        shape = value_shape(fmt, n_out, n_in)
        if blocks.size != np.prod(shape):
            raise ValueError(f"{blocks.shape} bytes do not hold a [{n_out}, {n_in}] matrix in {fmt}")
        return cls(fmt, blocks.reshape(shape), n_out, n_in, threads)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, n_in] (C-contiguous) -> float32 [T, n_out]."""
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.n_in or not x.flags.c_contiguous:
            raise ValueError(f"x must be C-contiguous float32 [T, {self.n_in}], got {x.dtype} {x.shape}")
        y = np.empty((x.shape[0], self.n_out), np.float32)
        kind, n_tiles = self.fmt.spec.kind, self.values.shape[0]
        # A small matrix is done before the thread pool would have handed out its parts: run it here.
        n_parts = 1 if self.values.nbytes * x.shape[0] < INLINE_BYTES else self._threads.n_threads
        ybuf = self._threads.buffer("dense_ybuf", (self._threads.n_threads, BLOCK_TOKENS, self.fmt.spec.tile_rows),
                                    np.float32)
        if n_parts == 1:
            dense_phase(kind, self.values, self.scales, x, y, 0, n_tiles, ybuf[0])
            return y

        def part(p):
            t0, t1 = split_range(n_tiles, p, n_parts)
            dense_phase(kind, self.values, self.scales, x, y, t0, t1, ybuf[p])

        self._threads.run(part)
        return y

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The dequantized rows ids (int) of the matrix -> float32 [len(ids), n_in]."""
        flat = self.values.reshape(self.n_out, -1)
        out = np.empty((len(ids), self.n_in), np.float32)
        dequantize_rows(self.fmt.spec.ggml_type, np.ascontiguousarray(flat[np.asarray(ids)]), out)
        return out
