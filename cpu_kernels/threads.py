"""The kernel's thread count and the small pool that runs one call's work split across threads.

One setting: `n_threads` of the `KernelThreads` worker (default `physical_cores()`, the physical cores this
process may run on), made once and handed to every layer's `MoEExperts` (or given as `n_threads` to a layer that
makes its own). The threads call nogil numba kernels, so they run in parallel with each other and with the
Python thread that submitted the work.

Sharing cores with torch: the kernel threads block on a queue between calls (no spinning), so they cost nothing
while torch works. During a call they want every core they were given. In the GPU runtime torch's CPU threads
are idle while the experts run (torch waits on the GPU), so kernel threads = physical cores is right. When torch
computes on the CPU at the same time (the shared expert on a CPU-only run), give the two pools disjoint shares:
`torch.set_num_threads(cores - n_threads)`, or accept that the two time-slice the same cores. We use our own
threads rather than numba's parallel layer because numba's OpenMP/workqueue pools spin after a parallel region
and do not support being entered from several Python threads, while torch brings its own OpenMP runtime.
"""

import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may run on; os.cpu_count() if unknown."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def split_range(n: int, part: int, n_parts: int) -> tuple[int, int]:
    """The part-th of n_parts nearly equal contiguous slices of range(n), as (start, stop)."""
    return n * part // n_parts, n * (part + 1) // n_parts


class KernelThreads:
    """The kernel worker: n_threads threads for one call's parts, one background thread that runs submitted
    calls one at a time, and the scratch buffers those calls share.

    One instance can serve every MoE layer of a model (layers run one after another), so a 60-layer model has
    n_threads + 1 threads and one set of scratch buffers, not one per layer.
    """

    def __init__(self, n_threads: int | None = None):
        n_threads = physical_cores() if n_threads is None else n_threads
        if not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
        self.n_threads = n_threads
        self._pool = ThreadPoolExecutor(n_threads - 1, thread_name_prefix="cpu-kernel") if n_threads > 1 else None
        self._background = ThreadPoolExecutor(1, thread_name_prefix="cpu-kernel-submit")
        self._buffers = {}

    def submit(self, fn, *args) -> Future:
        """Run fn(*args) on the background thread, after any call submitted before it."""
        return self._background.submit(fn, *args)

    def buffer(self, name: str, shape: tuple, dtype) -> np.ndarray:
        """Scratch array `name` of `shape` (C-contiguous, contents undefined) for use inside a submitted call.

        Grown when a call needs more than any before, never shrunk; safe to share because submitted calls run
        one at a time.
        """
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(name)
        if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
            buf = self._buffers[name] = np.zeros(max(n, 1), dtype)
        return buf[:n].reshape(shape)

    def run(self, fn) -> None:
        """Call fn(0) .. fn(n_threads - 1) concurrently and return when all are done; re-raises the first error."""
        futures = [self._pool.submit(fn, part) for part in range(1, self.n_threads)] if self._pool else []
        try:
            fn(0)
        finally:
            for f in futures:
                f.result()

    def close(self) -> None:
        self._background.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._buffers = {}
