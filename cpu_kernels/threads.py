"""The kernels' share of the process's thread budget: one worker whose threads compute every kernel call's parts.

A process computes on at most `n_threads` cores at a time (`hybrid ... --threads N`, default the physical cores,
`physical_cores()`). One `KernelThreads` worker holds that budget for the CPU kernels: n_threads - 1 helper
threads plus the thread that calls in (the model's thread), which computes parts too instead of waiting. Every
MoE layer and every weight matrix on the kernels shares it, so a model has n_threads - 1 kernel threads however
many layers and matrices it has. How torch's intra-op pool takes turns with it: hybrid/generation/threads.py.

- Work comes as jobs of parts, claimed one at a time by whichever thread is free; a thread holds one of
  n_threads core slots while it computes a part, so the threads computing never outnumber the budget, however
  many Python threads call in at once.
- A job too small to be worth a hand-off (under PART_WORK) runs on the calling thread: waking a thread costs
  ~50-100 us, and a scheduler time slice (ms) when that thread's core is busy with another process.
- A larger job gets up to PARTS_PER_THREAD parts per thread, so a thread slowed by other work on its core takes
  fewer parts and the job waits for one part of it, not for half the job (an even split on a 2-core machine
  with one core busy takes twice as long).
- Idle threads block on a condition (no spinning): they cost nothing while torch computes.

Calls (`submit` / `wait`): a call is a generator of jobs (fn, n_parts), run one after another with its own code
between them (the thread that finishes a job's last part carries on with it, no coordinator thread). Calls run
one at a time in submission order, since they share the worker's scratch (`buffer`). With `overlap` a call
starts as it is submitted, so its parts run on the helpers while the caller goes on (to the shared expert on a
GPU), and the caller joins in when it waits. Without it (CPU-only runs, where torch would compute on the same
cores meanwhile) a call starts when someone waits for it: torch and the kernels take turns on all cores.

We use our own threads rather than numba's parallel layer because numba's OpenMP/workqueue pools spin after a
parallel region and do not support being entered from several Python threads, while torch brings its own OpenMP.
"""

import os
import threading
import weakref
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import numpy as np

# Weight bytes x tokens a part streams at least: ~50 us at 20 GB/s, about what handing it to a thread costs.
PART_WORK = 1 << 20
# Parts per thread for a large job, so that a thread on a core shared with another process takes fewer of them.
PARTS_PER_THREAD = 4


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


class _Job:
    """fn(0) .. fn(n_parts - 1); `call`: the submitted call it is a step of (None: a run() caller's own)."""

    def __init__(self, fn, n_parts: int, call=None):
        self.fn, self.n_parts, self.call = fn, n_parts, call
        self.claimed = self.done = 0
        self.error = None


class _Call:
    def __init__(self, steps):
        self.steps, self.future = steps, Future()


class _State:
    """Everything the threads share, apart from KernelThreads so that a worker dropped without close() still
    ends its helpers (they hold this, not the worker). One lock; helpers wait on `idle`, callers on `callers`."""

    def __init__(self, n_threads: int, overlap: bool):
        self.overlap = overlap
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.callers = threading.Condition(self.lock)  # run()/wait() callers: their job, any part, a core slot
        self.jobs = deque()  # jobs with unclaimed parts, oldest first
        self.free = n_threads  # core slots not computing a part now
        self.calls = deque()  # submitted calls not started yet, in order
        self.running = None  # the call whose steps are under way
        self.waiters = 0  # threads in wait()
        self.closed = False

    def help(self) -> None:
        """A helper thread's loop: the oldest job's next part whenever there is one and a core slot."""
        while True:
            with self.lock:
                while not self.closed and not (self.jobs and self.free):
                    self.idle.wait()
                if self.closed:
                    return
                job, part = self.claim(self.jobs[0])
            self.compute(job, part)
            # Drop the job here, not when the next one comes: a daemon thread still holding its closure (and the
            # torch-backed arrays in it) at interpreter exit is killed while torch frees them (abort, "terminate
            # called without an active exception").
            del job, part

    def claim(self, job) -> tuple:
        """Under the lock: (job, its next part), with a core slot taken for it."""
        part = job.claimed
        job.claimed += 1
        if job.claimed == job.n_parts:
            self.jobs.remove(job)
        self.free -= 1
        return job, part

    def post(self, job) -> None:
        with self.lock:
            self.jobs.append(job)
            self.idle.notify(job.n_parts)
            self.callers.notify_all()  # a caller in wait() helps with any job

    def release(self) -> None:
        """Under the lock: give a core slot back."""
        self.free += 1
        if self.jobs:  # a helper may have been left waiting for a slot
            self.idle.notify()
        if self.free == 1:  # and callers
            self.callers.notify_all()

    def compute(self, job, part) -> None:
        """job.fn(part) on this thread, which holds a core slot; the slot is given back, and when the part was
        its job's last, the job's call carries on here."""
        error = self.call_fn(job.fn, part)
        with self.lock:
            job.error = job.error or error
            job.done += 1
            finished = job.done == job.n_parts
            self.release()
            if finished:
                self.callers.notify_all()
        if finished and job.call is not None:
            self.advance(job.call, job.error)

    @staticmethod
    def call_fn(fn, part):
        try:
            fn(part)
        except BaseException as e:  # re-raised by whoever waits for the job
            return e
        return None

    def run_here(self, fn):
        """fn(0) on this thread, with a core slot (waiting for one); returns its error or None."""
        with self.lock:
            while not self.free:
                self.callers.wait()
            self.free -= 1
        error = self.call_fn(fn, 0)
        with self.lock:
            self.release()
        return error

    def next_call(self, now: bool):
        """Under the lock: the queued call to start, marked running, or None (one is running, none is queued,
        or not `now`)."""
        if not now or self.running is not None or not self.calls:
            return None
        self.running = self.calls.popleft()
        return self.running

    def advance(self, call, error=None) -> None:
        """Run `call`'s steps up to its next job of several parts (posted for the threads) or its end; at its end
        start the next call (with overlap, or when someone waits), and so on."""
        while call is not None:
            try:
                if error is not None:
                    raise error
                fn, n_parts = next(call.steps)
            except StopIteration as stop:
                value, error = stop.value, None
            except BaseException as e:
                call.steps.close()
                value, error = None, e
            else:
                if n_parts > 1:
                    self.post(_Job(fn, n_parts, call))
                    return
                error = self.run_here(fn)
                continue
            with self.lock:
                self.running = None
                following = self.next_call(self.overlap or self.waiters > 0)
            if error is None:
                call.future.set_result(value)
            else:
                call.future.set_exception(error)
            with self.lock:
                self.callers.notify_all()
            call, error = following, None

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.idle.notify_all()


class KernelThreads:
    """The kernel worker: n_threads - 1 helper threads and the calling thread compute each job's parts; calls
    submitted with `submit` run one at a time; `buffer` is the scratch those calls share.

    One instance serves every MoE layer and weight matrix of a model: a 60-layer model has n_threads - 1 threads
    and one set of scratch buffers, not one per layer.
    """

    def __init__(self, n_threads: int | None = None, overlap: bool = True):
        n_threads = physical_cores() if n_threads is None else n_threads
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise ValueError(f"n_threads must be a positive int, got {n_threads!r}")
        self.n_threads, self.overlap = n_threads, overlap
        self._state = state = _State(n_threads, overlap)
        self._helpers = [threading.Thread(target=state.help, name=f"cpu-kernel-{i}", daemon=True)
                         for i in range(1, n_threads)]
        for t in self._helpers:
            t.start()
        # Also at exit or when dropped without close(): the helpers end before the interpreter does.
        self._stop = weakref.finalize(self, _stop, state, self._helpers)
        self._buffers = {}

    def n_parts(self, work: int, n_tiles: int) -> int:
        """Parts for a job of `work` (weight bytes x tokens) over n_tiles tiles: 1 below PART_WORK (the caller
        runs it, no hand-off), else up to PARTS_PER_THREAD per thread, at least one tile each."""
        most = PARTS_PER_THREAD * self.n_threads if self.n_threads > 1 else 1
        return max(1, min(int(work) // PART_WORK, most, n_tiles))

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

    def run(self, fn, n_parts: int | None = None) -> None:
        """Call fn(0) .. fn(n_parts - 1) (default: one part per thread), each once, on this thread and the
        helpers, and return when all are done; re-raises the first error. Safe from several threads at once."""
        state = self._state
        n_parts = self.n_threads if n_parts is None else n_parts
        if n_parts == 1:
            error = state.run_here(fn)
        else:
            job = _Job(fn, n_parts)
            state.post(job)
            while True:
                with state.lock:
                    while job.done < n_parts and not (job.claimed < n_parts and state.free):
                        state.callers.wait()
                    if job.done == n_parts:
                        break
                    _, part = state.claim(job)
                state.compute(job, part)
            error = job.error
        if error is not None:
            raise error

    def submit(self, steps) -> Future:
        """Queue a call: `steps`, a generator of jobs (fn, n_parts) run one after another; what it returns is
        the Future's result. It starts after every call submitted before it: as soon as it can with `overlap`
        (on this thread if the worker is idle, up to its first job of several parts), else when someone waits.
        Collect it with wait()."""
        state = self._state
        call = _Call(steps)
        with state.lock:
            state.calls.append(call)
            start = state.next_call(self.overlap)
        if start is not None:
            state.advance(start)
        return call.future

    def wait(self, future: Future):
        """Compute parts of any job until the call of `future` is done (the caller is one of the budget's
        threads), and return its result; re-raises its error."""
        state = self._state
        with state.lock:
            state.waiters += 1
            start = state.next_call(True)
        try:
            if start is not None:
                state.advance(start)
            while True:
                with state.lock:
                    while not future.done() and not (state.jobs and state.free):
                        state.callers.wait()
                    if future.done():
                        break
                    job, part = state.claim(state.jobs[0])
                state.compute(job, part)
        finally:
            with state.lock:
                state.waiters -= 1
        return future.result()

    def close(self) -> None:
        """Stop the helper threads (after their current parts); nothing runs on the worker after."""
        self._stop()
        self._buffers = {}


def _stop(state: _State, helpers: list) -> None:
    state.close()
    for t in helpers:
        if t is not threading.current_thread():  # the last reference may go on a helper
            t.join()
