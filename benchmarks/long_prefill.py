"""Long-prompt prefill: the routed experts' prefill paths at K2's widths, and a K2-width model's prefill tokens/s.

    python benchmarks/long_prefill.py experts [--experts 64] [--tokens 512,2048] [--device cuda]
    python benchmarks/long_prefill.py model [--work /tmp/hybrid-k2w-prefill] [--prompts 512,2048,8192]

`experts`: one MoE layer (hidden 7168, experts 2048 wide, top-8, E random experts in int4 and int8) at T tokens,
every path on the same blocks in the same run: the CPU kernels alone; the runtime's choice (HybridExperts with the
GEMM crossover measured here: kernels below it, dense GEMMs in CPU torch from it); the GEMM path forced for
every expert; the transformers-style torch loop over bf16 and fp32 weights (torch's own GEMMs, no dequantizing);
and, with a GPU (--device cuda), the experts streamed to it and computed there (hybrid/run/expert_streaming.py). GFLOP/s count 2 x 3 x H x I x K per token; the target is the runtime's choice >= 0.9x
the torch bf16 loop.

`model`: a K2-width checkpoint (make_tiny: one dense and two MoE layers, 32 experts, int4 experts) planned for
this machine, prefill tokens/s of one prompt per length with the plan's chunk. It uses only open_runtime,
plan_for_this_machine and prefill_rows, so the same command measures an older checkout (PYTHONPATH=that tree):
before and after.
"""

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

H, I, K = 7168, 2048, 8


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def best_of(fn, repeats: int) -> float:
    # Not hybrid.run.expert_gemm.best_of: `model` also runs against checkouts older than that module.
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def batch(n_tokens: int, n_experts: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(n_experts, K, replace=False) for _ in range(n_tokens)]).astype(np.int64)
    return rng.standard_normal((n_tokens, H), dtype=np.float32), ids, rng.random((n_tokens, K), dtype=np.float32)


def torch_loop(dtype, n_experts: int, seed: int = 0):
    """transformers' per-expert loop over dense weights in `dtype`: torch's GEMMs on the same block shapes."""
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(n_experts, I, H, generator=g).mul_(0.02).to(dtype) for _ in range(2))
    down = torch.randn(n_experts, H, I, generator=g).mul_(0.02).to(dtype)

    def run(x, ids, w):
        out = torch.zeros(x.shape, dtype=torch.float32)
        x = x.to(dtype)
        for e in torch.unique(ids).tolist():
            tok, slot = torch.nonzero(ids == e, as_tuple=True)
            h = F.silu(F.linear(x[tok], gate[e])) * F.linear(x[tok], up[e])
            out.index_add_(0, tok, F.linear(h, down[e]).float() * w[tok, slot, None])
        return out
    return run


def experts_rows(fmt_name: str, n_experts: int, tokens: list, device: str, threads) -> list:
    from cpu_kernels import MoEExperts, parse_format
    from cpu_kernels.bench import random_store
    from hybrid.run.expert_gemm import DenseScratch, ExpertGemm, measure_crossover
    from hybrid.run.expert_streaming import ExpertStreamer, group_size
    from hybrid.run.experts import HybridExperts

    experts = MoEExperts(random_store(parse_format(fmt_name), n_experts), threads=threads)
    scratch = DenseScratch()
    crossover = measure_crossover(experts, scratch)
    chosen, forced = HybridExperts(experts, n_experts), HybridExperts(experts, n_experts)
    chosen.gemm = ExpertGemm(experts, crossover, scratch) if crossover else None
    forced.gemm = ExpertGemm(experts, 1, scratch)
    streamer = ExpertStreamer({0: experts.store}, device, 1, group_size(experts.store, 1 << 29))
    rows = []
    for n in tokens:
        x, ids, w = batch(n, n_experts)
        xt, idt, wt = torch.from_numpy(x), torch.from_numpy(ids), torch.from_numpy(w)
        xd = xt.to(device, torch.bfloat16 if device != "cpu" else torch.float32)

        def streamed():
            streamer.compute(0, xd, idt, wt)
            if device != "cpu":
                torch.cuda.synchronize()
        paths = {"kernels": lambda: experts.forward(x, ids, w), "runtime's choice": lambda: chosen(xt, idt, wt),
                 "GEMM path, every expert": lambda: forced(xt, idt, wt)}
        if device != "cpu":  # on the CPU the streamed path unpacks in torch, a correctness path only (tests)
            paths[f"streamed to {device}"] = streamed
        for name, fn in paths.items():
            fn()  # warm: compile, first touch of the scratch
            s = best_of(fn, 2)
            rows.append({"path": name, "format": fmt_name, "tokens": n, "s": s, "gflops": 2 * 3 * H * I * K * n / s / 1e9})
        next(r for r in rows if r["path"] == "runtime's choice" and r["tokens"] == n)["crossover"] = crossover
    return rows


def torch_rows(n_experts: int, tokens: list) -> list:
    rows = []
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        run = torch_loop(dtype, n_experts)
        for n in tokens:
            x, ids, w = (torch.from_numpy(a) for a in batch(n, n_experts))
            run(x, ids, w)
            s = best_of(lambda: run(x, ids, w), 2)
            rows.append({"path": f"torch loop, {dtype_name} weights", "format": dtype_name, "tokens": n, "s": s,
                         "gflops": 2 * 3 * H * I * K * n / s / 1e9})
    return rows


def bench_experts(args):
    from cpu_kernels import KernelThreads
    from hybrid.run.expert_gemm import gemm_dtype

    torch.set_num_threads(args.threads)
    threads = KernelThreads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    rows = torch_rows(args.experts, tokens)
    for fmt in ("int4", "int8"):
        rows += experts_rows(fmt, args.experts, tokens, args.device, threads)
    threads.close()
    table = Table(title=f"one K2-width MoE layer, {args.experts} experts, {args.threads} threads, {cpu_name()}; "
                        f"GEMM dtype {str(gemm_dtype()).split('.')[-1]}")
    for col in ("path", "format", "tokens", "ms", "GFLOP/s", "/ torch bf16", "crossover"):
        table.add_column(col, justify="left" if col == "path" else "right")
    bf16 = {r["tokens"]: r["gflops"] for r in rows if r["path"] == "torch loop, bf16 weights"}
    for r in rows:
        cross = r.get("crossover", "")
        table.add_row(r["path"], r["format"], str(r["tokens"]), f"{1e3 * r['s']:.0f}", f"{r['gflops']:.1f}",
                      f"{r['gflops'] / bf16[r['tokens']]:.2f}", "never" if cross is None else str(cross))
    Console().print(table)


def bench_model(args):
    from hybrid.generation.generate import prefill_rows
    from hybrid.generation.runtime import open_runtime, plan_for_this_machine
    from hybrid.read.checkpoint import Checkpoint
    from hybrid.read.tiny import K2_WIDTHS, TinySpec, make_tiny
    from placement.planner import PlanRequest

    work = Path(args.work)
    ckpt_dir = work / "ckpt"
    if not (ckpt_dir / "config.json").exists():
        make_tiny(ckpt_dir, TinySpec(layers=3, dense_layers=1, experts=32, top_k=8, seed=0, **K2_WIDTHS),
                  overwrite=True)
    prompts = [int(p) for p in args.prompts.split(",")]
    ckpt = Checkpoint.open(ckpt_dir)
    plan = plan_for_this_machine(ckpt, request=PlanRequest(context_length=max(prompts) + 16,
                                                            expert_format="int4")).plan
    rt = open_runtime(ckpt, plan)
    table = Table(title=f"K2-width model (1 dense + 2 MoE layers, 32 experts, int4), CPU-only plan, {cpu_name()}, "
                        f"prefill chunk {rt.prefill_chunk}")
    for col in ("prompt tokens", "prefill s", "tok/s"):
        table.add_column(col, justify="right")
    prefill_rows(rt.model, rt.new_cache(64), torch.arange(64)[None] % 256, rt.prefill_chunk)  # warm
    for n in prompts:
        ids = torch.arange(n)[None] % 256
        s = best_of(lambda: prefill_rows(rt.model, rt.new_cache(n), ids, rt.prefill_chunk), args.repeats)
        table.add_row(str(n), f"{s:.1f}", f"{n / s:.1f}")
    Console().print(table)


def main(argv=None):
    from cpu_kernels.threads import physical_cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("experts")
    e.add_argument("--experts", type=int, default=64)
    e.add_argument("--tokens", default="512")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--threads", type=int, default=physical_cores())
    m = sub.add_parser("model")
    m.add_argument("--work", default="/tmp/hybrid-k2w-prefill")
    m.add_argument("--prompts", default="512,2048,8192")
    m.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    bench_experts(args) if args.what == "experts" else bench_model(args)


if __name__ == "__main__":
    main()
