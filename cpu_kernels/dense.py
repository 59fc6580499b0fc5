"""DenseMatrix: one weight matrix outside the routed experts, computed by the CPU kernels in a cpu_kernels format.

Dimension legend: T tokens, n_out / n_in the matrix size, R the format's tile rows, B bytes per row, n matrices
of a stack.

Attention projections, shared experts, the dense MLP and the head (plan kernel cpu_linear) run on the same tile
kernels as the routed experts: quantized at load into int8 (or int4, or bf16 tiles) from a bf16/FP8 checkpoint,
or, for a GGUF checkpoint, in their stored blocks (Q4_K, Q6_K, ...): memory-mapped, never expanded.

    m = DenseMatrix.quantized(Format("int8", 128), w, threads=worker)    # w float32 or bf16 bits [n_out, n_in]
    m = DenseMatrix.from_blocks(Format("Q6_K"), blocks, n_in, worker)   # blocks uint8 [n_out, B], zero-copy
    y = m.forward(x)          # x float32 [T, n_in] -> y float32 [T, n_out]
    w = m.rows(ids)           # dequantized rows [len(ids), n_in]: an embedding lookup without expanding the table

DenseStack holds n matrices of one shape, each applied to its own inputs: MLA's absorbed products, one
[R, N] (key half, transposed) and one [V, R] (value half) matrix per head.
"""

import numpy as np

from .formats import Format, scale_shape, value_shape
from .formats.gguf import dequantize_rows
from .formats.activations import quantized_inputs
from .phases import dense_phase
from .prefill import BLOCK_TOKENS
from .quantize import dequantize_matrix, quantize_matrix
from .threads import KernelThreads, split_range

# Rows quantized at a time: bounds the float32 temporaries of quantizing K2's head (163840 x 7168) to ~0.5 GB.
QUANTIZE_ROWS = 4096


class DenseMatrix:
    def __init__(self, fmt: Format, values: np.ndarray, scales: np.ndarray, n_out: int, n_in: int,
                 threads: KernelThreads):
        if values.shape != value_shape(fmt, n_out, n_in) or scales.shape != scale_shape(fmt, n_out, n_in):
            raise ValueError(f"values {values.shape} / scales {scales.shape} are not a [{n_out}, {n_in}] matrix in "
                             f"{fmt}")
        self.fmt, self.n_out, self.n_in, self._threads = fmt, n_out, n_in, threads
        self.values, self.scales = values, scales

    @classmethod
    def quantized(cls, fmt: Format, w: np.ndarray, threads: KernelThreads) -> "DenseMatrix":
        """w [n_out, n_in] (float32, or bf16 bits as uint16) quantized into `fmt` (bf16, int8 or int4 tiles; the
        last tile's rows past n_out are zero), QUANTIZE_ROWS rows at a time."""
        values, scales = _quantized_arrays(fmt, w)
        return cls(fmt, values, scales, *w.shape, threads)

    @classmethod
    def from_blocks(cls, fmt: Format, blocks: np.ndarray, n_in: int, threads: KernelThreads) -> "DenseMatrix":
        """A GGUF matrix as stored: blocks uint8 [n_out, B] (a view of the memory-mapped file, not copied)."""
        if fmt.spec.ggml_type is None:
            raise ValueError(f"format {fmt} is not a GGUF type")
        n_out = blocks.shape[0]
        shape = value_shape(fmt, n_out, n_in)
        if blocks.size != np.prod(shape):
            raise ValueError(f"{blocks.shape} bytes do not hold a [{n_out}, {n_in}] matrix in {fmt}")
        return cls(fmt, blocks.reshape(shape), np.zeros(scale_shape(fmt, n_out, n_in), np.float32), n_out, n_in,
                   threads)

    @property
    def nbytes(self) -> int:
        return self.values.nbytes + self.scales.nbytes

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, n_in] (C-contiguous) -> float32 [T, n_out]."""
        if x.dtype != np.float32 or x.ndim != 2 or x.shape[1] != self.n_in or not x.flags.c_contiguous:
            raise ValueError(f"x must be C-contiguous float32 [T, {self.n_in}], got {x.dtype} {x.shape}")
        y = np.empty((x.shape[0], self.n_out), np.float32)
        kind, n_tiles = self.fmt.spec.kind, self.values.shape[0]
        xq, xd = quantized_inputs(x, self.fmt.spec.quantized_inputs)
        # A small matrix is done here before another thread would have woken up (KernelThreads.n_parts).
        n_parts = self._threads.n_parts(self.values.nbytes * x.shape[0], n_tiles)
        ybuf = self._threads.buffer("dense_ybuf", (n_parts, BLOCK_TOKENS, self.fmt.spec.tile_rows), np.float32)
        if n_parts == 1:
            dense_phase(kind, self.values, self.scales, x, xq, xd, y, 0, n_tiles, ybuf[0])
            return y

        def part(p):
            t0, t1 = split_range(n_tiles, p, n_parts)
            dense_phase(kind, self.values, self.scales, x, xq, xd, y, t0, t1, ybuf[p])

        self._threads.run(part, n_parts)
        return y

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The dequantized rows ids (int) of the matrix -> float32 [len(ids), n_in]."""
        ids = np.asarray(ids)
        out = np.empty((len(ids), self.n_in), np.float32)
        if self.fmt.spec.ggml_type is not None:  # a GGUF row is its own blocks
            flat = self.values.reshape(self.n_out, -1)
            dequantize_rows(self.fmt.spec.ggml_type, np.ascontiguousarray(flat[ids]), out)
            return out
        n_rows = self.fmt.spec.tile_rows
        for t in np.unique(ids // n_rows):  # a tile's rows are interleaved: dequantize the tiles that hold them
            tile = dequantize_matrix(self.values[t:t + 1], self.scales[t:t + 1], self.fmt, n_rows, self.n_in)
            here = ids // n_rows == t
            out[here] = tile[ids[here] - t * n_rows]
        return out


class DenseStack:
    """n matrices [n_out, n_in] of one format, matrix i applied to its own inputs x[i] (MLA's per-head products)."""

    def __init__(self, matrices: list):
        first = matrices[0]
        if any((m.fmt, m.n_out, m.n_in) != (first.fmt, first.n_out, first.n_in) for m in matrices):
            raise ValueError("a DenseStack's matrices share one format and shape")
        self.matrices, self.fmt, self.n_out, self.n_in = matrices, first.fmt, first.n_out, first.n_in

    @classmethod
    def quantized(cls, fmt: Format, w: np.ndarray, threads: KernelThreads) -> "DenseStack":
        """w [n, n_out, n_in] (float32 or bf16 bits as uint16), each matrix quantized into `fmt`."""
        return cls([DenseMatrix.quantized(fmt, m, threads) for m in w])

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.matrices)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """x float32 [n, T, n_in] (C-contiguous) -> float32 [n, T, n_out], y[i] = x[i] @ W_i.T."""
        n = len(self.matrices)
        if x.dtype != np.float32 or x.ndim != 3 or x.shape[0] != n or x.shape[2] != self.n_in \
                or not x.flags.c_contiguous:
            raise ValueError(f"x must be C-contiguous float32 [{n}, T, {self.n_in}], got {x.dtype} {x.shape}")
        # One matrix after another, each split among the threads as DenseMatrix splits it (a decode step's are
        # small, so each runs on this thread: K2's are 64K weights).
        return np.stack([m.forward(x[i]) for i, m in enumerate(self.matrices)])


def _quantized_arrays(fmt: Format, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values, scales) of w [n_out, n_in] in `fmt`, quantized a block of whole tiles at a time: the tiled formats
    quantize each tile of R rows on its own, so blocks of rows give consecutive tiles."""
    if w.ndim != 2:
        raise ValueError(f"weights must be 2-D [n_out, n_in], got shape {w.shape}")
    n_out, n_in = w.shape
    spec = fmt.spec
    values = np.empty(value_shape(fmt, n_out, n_in), spec.value_dtype)
    scales = np.empty(scale_shape(fmt, n_out, n_in), spec.scale_dtype)
    step = max(1, QUANTIZE_ROWS // spec.tile_rows) * spec.tile_rows
    for row0 in range(0, n_out, step):
        v, s = quantize_matrix(w[row0:row0 + step], fmt)
        t0 = row0 // spec.tile_rows
        values[t0:t0 + v.shape[0]] = v
        scales[t0:t0 + s.shape[0]] = s
    return values, scales
