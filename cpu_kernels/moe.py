"""MoEExperts: one MoE layer's routed experts on the CPU, the object the runtime calls.

Dimension legend: T tokens, H hidden, I expert width, E experts, K top-k, P = T * K pairs.

    experts = MoEExperts.from_store("layer_03/")             # memory-maps the store
    out = experts.forward(hidden, ids, weights)              # [T, H] float32
    experts.submit(hidden, ids, weights); ...; out = experts.wait()   # same work, begun on the worker's threads

forward computes, for each token t, sum_k weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)) with
e = ids[t, k]; a pair whose id is SKIP (-1) is left out (the caller computes it elsewhere: on the GPU, or as a
dense GEMM). Inputs are validated before any kernel runs; bad input raises ValueError naming the argument.

Threads and scratch belong to a `KernelThreads` worker. Give all layers of a model the same one
(`MoEExperts.from_store(path, threads=worker)`): layers run one after another, so they share its threads and
its scratch (activations, sort buffers, per-thread tiles), which grows only when a call brings more pairs than
any before. The kernels themselves allocate nothing.
"""

import threading
import time

import numpy as np

from .formats import Format
from .formats.activations import quantized_inputs
from .phases import bf16_rows_to_f32, down_phase, gate_up_phase
from .prefill import BLOCK_TOKENS, sort_by_expert
from .store import PROJECTIONS, ExpertStore, build_store, load_store
from .threads import KernelThreads, split_range

SKIP = -1  # the expert id of a (token, expert) pair these kernels leave out


def _readonly(a: np.ndarray) -> np.ndarray:
    # One numba specialisation per format: memory maps are read-only, so in-memory stores are viewed read-only too.
    v = np.asarray(a).view()
    v.flags.writeable = False
    return v


class MoEExperts:
    """Routed experts of one layer from an ExpertStore.

    `threads`: a KernelThreads worker to share with other layers; without one, the layer makes its own with
    `n_threads` threads (default: physical cores) and closes it in close().
    """

    def __init__(self, store: ExpertStore, n_threads: int | None = None, threads: KernelThreads | None = None):
        if threads is not None and n_threads not in (None, threads.n_threads):
            raise ValueError(f"n_threads {n_threads} differs from the given worker's {threads.n_threads}")
        self.store = store
        self.fmt = store.fmt
        self._kinds = {name: store.format_of(name).spec.kind for name in PROJECTIONS}
        self._tile_rows = {name: store.format_of(name).spec.tile_rows for name in PROJECTIONS}
        self._quantized = {name: store.format_of(name).spec.quantized_inputs for name in PROJECTIONS}
        if self._tile_rows["gate_proj"] != self._tile_rows["up_proj"]:
            raise ValueError(f"gate and up formats {store.format_of('gate_proj')}, {store.format_of('up_proj')} "
                             "have different tile rows; phase 1 computes their tiles together")
        self.n_experts, self.hidden, self.width = store.n_experts, store.hidden, store.width
        self._v = {k: _readonly(a) for k, a in store.values.items()}
        self._s = {k: _readonly(a) for k, a in store.scales.items()}
        self._owns_threads = threads is None
        self._threads = KernelThreads(n_threads) if threads is None else threads
        self.n_threads = self._threads.n_threads
        nbytes = {k: (a.nbytes + store.scales[k].nbytes) // self.n_experts for k, a in store.values.items()}
        self._pair_bytes = {"gate_up": nbytes["gate_proj"] + nbytes["up_proj"], "down": nbytes["down_proj"]}
        self.expert_nbytes = sum(nbytes.values())  # one expert's bytes in the store, scales included
        self._pending = None
        self.busy_s = 0.0  # seconds spent computing, summed over calls
        self._lock = threading.Lock()

    @property
    def threads(self) -> KernelThreads:
        """The worker whose threads compute this layer's calls (shared with the model's other layers)."""
        return self._threads

    @classmethod
    def from_store(cls, directory, n_threads: int | None = None, mmap: bool = True,
                   threads: KernelThreads | None = None) -> "MoEExperts":
        """Open a layer store directory written by store.save_store / LayerStoreWriter."""
        return cls(load_store(directory, mmap=mmap), n_threads, threads)

    @classmethod
    def from_weights(cls, gate, up, down, fmt: Format, n_threads: int | None = None,
                     threads: KernelThreads | None = None) -> "MoEExperts":
        """Quantize in-memory weights: gate, up [E, I, H], down [E, H, I], float32 or bf16 as uint16."""
        return cls(build_store(gate, up, down, fmt), n_threads, threads)

    def _validate(self, hidden, ids, weights, out):
        for name, a in (("hidden", hidden), ("ids", ids), ("weights", weights)):
            if not isinstance(a, np.ndarray):
                raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
            if a.ndim != 2:
                raise ValueError(f"{name} must be 2-D, got shape {a.shape}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{name} must be C-contiguous (np.ascontiguousarray)")
        if hidden.dtype not in (np.float32, np.uint16):
            raise ValueError(f"hidden must be float32 or bf16 as uint16, got {hidden.dtype}")
        if hidden.shape[1] != self.hidden:
            raise ValueError(f"hidden has size {hidden.shape[1]} per token, this layer's hidden size is {self.hidden}")
        n_tokens = hidden.shape[0]
        if ids.shape[0] != n_tokens or weights.shape[0] != n_tokens:
            raise ValueError(f"ids {ids.shape} and weights {weights.shape} must have T = {n_tokens} rows like hidden")
        if ids.dtype not in (np.int64, np.int32):
            raise ValueError(f"ids must be int64 or int32, got {ids.dtype}")
        if weights.dtype != np.float32:
            raise ValueError(f"weights must be float32, got {weights.dtype}")
        if weights.shape != ids.shape or ids.shape[1] < 1:
            raise ValueError(f"weights {weights.shape} must match ids {ids.shape}, with top-k >= 1")
        if ids.size and (ids.min() < SKIP or ids.max() >= self.n_experts):
            raise ValueError(f"ids must lie in [0, {self.n_experts}) or be {SKIP} (skip), got range "
                             f"[{ids.min()}, {ids.max()}]")
        if out is not None:
            if not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != (n_tokens, self.hidden):
                got = (getattr(out, "shape", None), getattr(out, "dtype", type(out).__name__))
                raise ValueError(f"out must be float32 [{n_tokens}, {self.hidden}], got {got}")
            if not out.flags.c_contiguous or not out.flags.writeable:
                raise ValueError("out must be C-contiguous and writeable")

    def forward(self, hidden: np.ndarray, ids: np.ndarray, weights: np.ndarray, out: np.ndarray | None = None):
        """Routed experts for hidden [T, H] (float32 or bf16 as uint16), ids [T, K] int, weights [T, K] float32.

        Returns out [T, H] float32; when `out` is given the result is added into it (accumulate) and it is returned.
        """
        self.submit(hidden, ids, weights, out)
        return self.wait()

    def submit(self, hidden, ids, weights, out=None) -> None:
        """Validate, then hand forward's work to the worker; collect it with wait(). With an overlapping worker
        (KernelThreads.overlap) it starts now and its parts run on the worker's threads while the caller goes on;
        otherwise it runs when wait() is called.

        The arrays must stay unchanged until wait() returns. One call may be in flight at a time.
        """
        self._validate(hidden, ids, weights, out)
        with self._lock:
            if self._pending is not None:
                raise RuntimeError("submit() called again before wait(); one call may be in flight at a time")
            if out is None:
                out = np.zeros((hidden.shape[0], self.hidden), np.float32)
            self._pending = self._threads.submit(self._steps(hidden, ids.astype(np.int64, copy=False), weights, out))

    def wait(self) -> np.ndarray:
        """Compute the submitted call's parts with the worker's threads until it is done; returns its out [T, H]
        float32 (re-raises its error)."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            raise RuntimeError("wait() without a submit()")
        return self._threads.wait(pending)

    def _steps(self, hidden, ids, weights, out):
        """forward's work as the worker's jobs (a generator, see KernelThreads.submit); returns out."""
        t_start = time.perf_counter()
        try:
            return (yield from self._compute(hidden, ids, weights, out))
        finally:
            self.busy_s += time.perf_counter() - t_start  # the profiler's kernel time (hybrid profile)

    def _compute(self, hidden, ids, weights, out):
        n_tokens, top_k = ids.shape
        n_pairs = n_tokens * top_k
        if n_pairs == 0:
            return out
        buf, v, s = self._threads.buffer, self._v, self._s
        x = hidden
        if hidden.dtype == np.uint16:
            x = buf("x32", (n_tokens, self.hidden), np.float32)
            bf16_rows_to_f32(hidden, x)
        used, starts = buf("used", (self.n_experts,), np.int64), buf("starts", (self.n_experts + 1,), np.int64)
        pair_token, pair_weight = buf("pair_token", (n_pairs,), np.int64), buf("pair_weight", (n_pairs,), np.float32)
        n_used = sort_by_expert(ids, weights, buf("counts", (self.n_experts,), np.int64), starts, pair_token,
                                pair_weight, used)
        h = buf("h", (n_pairs, self.width), np.float32)
        n_tiles_i, n_tiles_h = v["gate_proj"].shape[1], v["down_proj"].shape[1]
        # Parts by the work of each phase (weight bytes x pairs): a decode step of a small layer runs on one thread.
        n_up = self._threads.n_parts(self._pair_bytes["gate_up"] * n_pairs, n_tiles_i)
        n_down = self._threads.n_parts(self._pair_bytes["down"] * n_pairs, n_tiles_h)
        ybuf = buf("ybuf", (max(n_up, n_down), 2, BLOCK_TOKENS, max(self._tile_rows.values())), np.float32)
        sort = (used, n_used, starts, pair_token)
        kinds = self._kinds  # which formats' kernels the phases run (formats/spec.py)
        # Inputs the integer kernels read quantized are quantized once here, not once per tile.
        xq, xd = quantized_inputs(x, self._quantized["gate_proj"] or self._quantized["up_proj"], buf, "x")

        def gate_up(part):
            t0, t1 = split_range(n_tiles_i, part, n_up)
            gate_up_phase(kinds["gate_proj"], kinds["up_proj"], v["gate_proj"], s["gate_proj"], v["up_proj"],
                          s["up_proj"], x, xq, xd, *sort, pair_weight, h, t0, t1, ybuf[part])

        def down(part):
            t0, t1 = split_range(n_tiles_h, part, n_down)
            down_phase(kinds["down_proj"], v["down_proj"], s["down_proj"], h, hq, hd, *sort, out, t0, t1, ybuf[part])

        yield gate_up, n_up
        hq, hd = quantized_inputs(h, self._quantized["down_proj"], buf, "h")
        yield down, n_down
        return out

    def close(self) -> None:
        """Stop this layer's worker threads if it made its own (a shared worker is closed by its owner)."""
        if self._owns_threads:
            self._threads.close()
