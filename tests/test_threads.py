"""One CPU thread budget per process: the kernel worker's threads never compute more parts at once than its
budget, whoever calls in; --threads reaches torch's pool and the one kernel worker a model has."""

import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cpu_kernels.threads import PART_WORK, PARTS_PER_THREAD, KernelThreads
from hybrid.cli import cli
from hybrid.generation.runtime import open_runtime, plan_for_this_machine
from hybrid.generation.threads import quiet_openmp, torch_threads
from hybrid.read.checkpoint import Checkpoint
from hybrid.run.blocks import BlockLinear
from hybrid.run.experts import HybridExperts
from placement.plan import cpu_threads, with_threads

HYBRID = str(Path(sys.executable).parent / "hybrid")


class Gauge:
    """Counts the parts computing at once (each part holds the GIL only briefly: it sleeps inside)."""

    def __init__(self):
        self.lock, self.now, self.most, self.seen = threading.Lock(), 0, 0, []

    def part(self, tag):
        def fn(p):
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
                self.seen.append((tag, p))
            threading.Event().wait(0.002)  # hold the part long enough for others to start theirs
            with self.lock:
                self.now -= 1
        return fn


@pytest.fixture
def torch_threads_kept():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_run_computes_each_part_once_and_never_more_at_once_than_the_budget():
    worker, gauge = KernelThreads(3), Gauge()
    worker.run(gauge.part("a"), 11)
    assert sorted(gauge.seen) == [("a", p) for p in range(11)]
    # Two Python threads calling run() at once, beside a submitted call: 3 helpers' worth of parts at most.
    def steps():
        yield gauge.part("call"), 9
        return "done"
    future = worker.submit(steps())
    callers = [threading.Thread(target=worker.run, args=(gauge.part(tag), 7)) for tag in ("b", "c")]
    for t in callers:
        t.start()
    assert worker.wait(future) == "done"
    for t in callers:
        t.join()
    assert gauge.most <= 3
    assert sorted(p for tag, p in gauge.seen if tag == "call") == list(range(9))
    assert sorted(p for tag, p in gauge.seen if tag == "b") == sorted(p for tag, p in gauge.seen if tag == "c") == \
        list(range(7))
    worker.close()
    assert not any(t.is_alive() for t in worker._helpers)


def test_a_worker_has_n_minus_one_threads_and_one_thread_runs_everything_here():
    worker = KernelThreads(4)
    assert len(worker._helpers) == 3 and all(t.is_alive() for t in worker._helpers)
    worker.close()
    single, gauge = KernelThreads(1), Gauge()
    assert single._helpers == []
    single.run(gauge.part("a"), 5)
    assert gauge.most == 1 and len(gauge.seen) == 5
    single.close()


def test_calls_run_in_order_at_submit_with_overlap_else_when_waited_for():
    order = []

    def call(name, n_parts):
        order.append(f"{name} starts")
        yield (lambda p: order.append(f"{name} part")), n_parts
        order.append(f"{name} ends")
        return name

    later = KernelThreads(2, overlap=False)
    first, second = later.submit(call("a", 2)), later.submit(call("b", 1))
    assert order == []  # nothing runs until someone waits
    assert later.wait(second) == "b" and later.wait(first) == "a"
    assert order == ["a starts", "a part", "a part", "a ends", "b starts", "b part", "b ends"]
    now = KernelThreads(2, overlap=True)
    order.clear()
    small = now.submit(call("c", 1))  # one part: done right here, in submit
    assert small.done() and order == ["c starts", "c part", "c ends"]
    later.close()
    now.close()


def test_errors_reach_the_caller_and_the_worker_goes_on():
    worker = KernelThreads(2, overlap=False)

    def fails(p):
        if p == 2:
            raise ZeroDivisionError("part 2")

    with pytest.raises(ZeroDivisionError, match="part 2"):
        worker.run(fails, 4)

    def steps():
        yield fails, 3
        raise AssertionError("not reached")

    with pytest.raises(ZeroDivisionError, match="part 2"):
        worker.wait(worker.submit(steps()))
    gauge = Gauge()
    worker.run(gauge.part("after"), 4)
    assert len(gauge.seen) == 4
    worker.close()


def test_small_jobs_run_on_the_caller_large_ones_in_several_parts_per_thread():
    worker = KernelThreads(2)
    assert worker.n_parts(PART_WORK - 1, 100) == 1
    assert worker.n_parts(3 * PART_WORK, 100) == 3
    assert worker.n_parts(1000 * PART_WORK, 100) == PARTS_PER_THREAD * 2
    assert worker.n_parts(1000 * PART_WORK, 5) == 5  # at least a tile per part
    assert KernelThreads(1).n_parts(1000 * PART_WORK, 100) == 1
    worker.close()
    with pytest.raises(ValueError, match="positive int"):
        KernelThreads(0)


def test_threads_reach_torch_and_the_one_kernel_worker(k2_tiny, torch_threads_kept):
    plan = plan_for_this_machine(Checkpoint.open(k2_tiny)).plan  # CPU-only: experts and matrices on the kernels
    plan = replace(plan, rules=tuple(replace(r, options={"threads": 5}) if "threads" in r.options else r
                                     for r in plan.rules))
    assert cpu_threads(plan) == 5 and cpu_threads(with_threads(plan, 3)) == 3
    rt = open_runtime(k2_tiny, plan, threads=3)
    assert torch.get_num_threads() == torch_threads(rt.plan, 3) == 3  # no GPU: torch and the kernels take turns
    workers = {m.experts.cpu._threads for m in rt.model.modules() if isinstance(getattr(m, "experts", None),
                                                                               HybridExperts)}
    workers |= {m.matrix._threads for m in rt.model.modules() if isinstance(m, BlockLinear)}
    assert len(workers) == 1  # routed experts and weight matrices share it
    worker = workers.pop()
    assert worker.n_threads == 3 and not worker.overlap and rt.plan.settings.cpu_threads == 3
    untouched = open_runtime(k2_tiny, plan)  # a library call without threads keeps the plan's
    assert untouched.model.model.layers[1].mlp.experts.cpu.n_threads == 5


def test_threads_flag_on_every_command_and_bad_values_are_one_line(k2_tiny, torch_threads_kept):
    runner = CliRunner()
    r = runner.invoke(cli, ["generate", str(k2_tiny), "--prompt-ids", "1,2,3", "--max-new-tokens", "2",
                            "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    assert torch.get_num_threads() == 1
    for command in ("generate", "chat", "serve", "profile", "bench"):
        assert "--threads" in runner.invoke(cli, [command, "-h"]).output
    for value, words in (("0", "0 is not in the range x>=1"), ("two", "'two' is not a valid integer")):
        r = subprocess.run([HYBRID, "chat", "--demo", "--threads", value, "--prompt", "hi"], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_the_plan_summary_shows_the_budget(k2_tiny):
    r = subprocess.run([HYBRID, "generate", k2_tiny, "--prompt-ids", "1,2", "--max-new-tokens", "1", "--threads",
                        "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "on 1 CPU threads" in r.stderr


def test_openmp_threads_sleep_unless_the_user_chose():
    env = {}
    quiet_openmp(env)
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    for mine in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "10000"}):
        env = dict(mine)
        quiet_openmp(env)
        assert env == mine
