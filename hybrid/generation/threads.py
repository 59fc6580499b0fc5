"""One CPU thread budget per process: N threads (`--threads N`, default this machine's physical cores) for torch's
intra-op pool and the CPU kernels' worker together, so that they never compute on more than N cores at a time.

The split, by when the two compute:
- No GPU (torch computes on the CPU): torch gets N intra-op threads and the kernel worker N (N - 1 threads of
  its own plus the model's thread). The worker does not overlap (KernelThreads.overlap off): a routed-expert call
  runs when the MoE block waits for it, after the shared expert, so torch and the kernels take turns on all N
  cores instead of time-slicing them (torch's OpenMP regions, each ending on a barrier, stall for a time slice
  whenever one of their threads is descheduled).
- Attention on a GPU: torch's CPU work is feeding the GPU and converting activations, so it gets 1 thread; the
  routed experts start on the worker's N - 1 threads at submit, while the model's thread runs the shared expert
  and launches GPU work, and the model's thread joins them when it waits: N.
- Torch's inter-op pool: 1 thread (nothing here runs torch ops alongside each other).
- OpenMP (torch's pool, MKL) spins its threads for a while after each parallel region; spinning, they hold cores
  the kernel threads are waiting for, which on a loaded machine cost an order of magnitude
  (docs/performance.md). `quiet_openmp` makes them sleep instead, before torch loads (OpenMP reads its
  environment once), unless the user chose a wait policy.
"""

import os

from hybrid.errors import ConfigError

# The OpenMP settings that choose how threads wait; a user who sets any of them keeps their choice.
OPENMP_WAIT = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def quiet_openmp(environ=os.environ) -> None:
    """OMP_WAIT_POLICY=PASSIVE, unless the environment already says how OpenMP threads wait. Call before torch is
    imported: the OpenMP runtime reads it when it loads."""
    if not any(key in environ for key in OPENMP_WAIT):
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def default_threads() -> int:
    """The budget without --threads: this machine's physical cores (those this process may run on)."""
    from cpu_kernels.threads import physical_cores

    return physical_cores()


def torch_threads(plan, n_threads: int) -> int:
    """torch's intra-op share of the budget under `plan` (None: the plain torch model, all of it)."""
    from hybrid.run.loader import overlaps_torch

    return 1 if plan is not None and overlaps_torch(plan) else n_threads


def use_threads(plan, n_threads: int):
    """Start using a budget of n_threads in this process: torch gets all of them (for loading, when nothing else
    computes; open_runtime then gives it torch_threads), its inter-op pool 1; returns `plan` with n_threads for
    its kernel worker (placement.plan.with_threads), None for None."""
    import torch

    from placement.plan import with_threads

    if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
        raise ConfigError(f"--threads must be a whole number, 1 or more, got {n_threads!r}")
    torch.set_num_threads(n_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # settable once per process, before any inter-op work: an earlier call in this process did
        pass
    return None if plan is None else with_threads(plan, n_threads)
