"""The hybrid runtime at Kimi-K2's true widths, CPU-only: measured decode and prefill tokens/s next to the
planner's projection for the same model and machine, one MoE layer's CPU/shared-expert overlap, and expert
deferral's effect on decode time.

    python benchmarks/runtime.py [--work /tmp/hybrid-k2w] [--experts 32] [--json out.json]

The model: `hybrid make-tiny --shape kimi-k2` (hidden 7168, 64 heads, experts 2048 wide, top-8) with one dense
and two MoE layers, converted to an int4 expert store. The projection uses the RAM read bandwidth measured in
the same run (cpu_kernels.bench's probe), so both columns describe this machine now.
"""

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cpu_kernels.bench import BandwidthProbe
from cpu_kernels.threads import physical_cores
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.convert import convert
from hybrid.generation.generate import decode_step, prefill, prefill_rows
from hybrid.generation.runtime import open_runtime
from hybrid.read.tiny import K2_WIDTHS, TinySpec, make_tiny
from placement.hardware import detect
from placement.planner import PlanRequest, make_plan


def best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def decode_tps(rt, n_prompt=16, n_decode=16):
    ids = list(range(1, n_prompt + 1))

    def run():
        cache = rt.new_cache(n_prompt + n_decode)
        prefill(rt.model, cache, ids, rt.prefill_chunk)
        t0 = time.perf_counter()
        for t in range(n_decode):
            decode_step(rt.model, cache, [t + 1])
        run.s = time.perf_counter() - t0

    best = float("inf")
    for _ in range(2):
        run()
        best = min(best, run.s)
    return n_decode / best


def prefill_tps(rt, n, chunk):
    ids = torch.arange(n)[None] % 256

    def run():
        prefill_rows(rt.model, rt.new_cache(n), ids, chunk)

    return n / best_of(run, 2)


def overlap(model, layer=1):
    """One MoE layer at T=1: routed experts alone, shared expert alone, and the whole block (routed on the
    CPU kernel threads while torch runs the shared expert). The block hides the shorter of the two only when
    they run on different resources (a GPU; or, CPU-only, disjoint cores: see `disjoint` in main)."""
    moe = model.model.layers[layer].mlp
    x = torch.randn(1, 1, model.config.hidden_size, dtype=torch.bfloat16)
    flat = x.view(1, -1)
    w, ids = moe.gate(flat)
    routed = best_of(lambda: moe.experts.forward(flat, ids, w), 5)
    shared = best_of(lambda: moe.shared_experts(flat), 5)
    whole = best_of(lambda: moe(x), 5)
    return {"routed_ms": 1e3 * routed, "shared_ms": 1e3 * shared, "block_ms": 1e3 * whole,
            "sum_ms": 1e3 * (routed + shared), "overlap_saved_ms": 1e3 * (routed + shared - whole)}


def measure_part(part, ckpt_dir, store_dir, plan, threads) -> dict:
    """One configuration, in this process: 'main' (all cores to both pools), 'deferral' (one expert per token
    deferred), 'disjoint' (half the cores to the kernels, half to torch, as a GPU would free the CPU)."""
    half = max(threads // 2, 1)
    settings = {"main": {}, "deferral": {"defer_experts": 1}, "disjoint": {"cpu_threads": half}}[part]
    torch.set_num_threads(threads - half if part == "disjoint" else threads)
    p = replace(plan, settings=replace(plan.settings, **settings),
                rules=tuple(replace(r, options={}) for r in plan.rules))
    rt = open_runtime(ckpt_dir, p, store_dir)
    out = {"decode_tps": decode_tps(rt)}
    if part != "deferral":
        out["overlap"] = overlap(rt.model)
    if part == "main":
        out["prefill_tps_128"] = prefill_tps(rt, 128, 128)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/hybrid-k2w")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--json")
    ap.add_argument("--part", choices=["main", "deferral", "disjoint"], help=argparse.SUPPRESS)
    ap.add_argument("--part-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work)
    ckpt_dir, store_dir = work / "ckpt", work / "store-int4"
    if not (ckpt_dir / "config.json").exists():
        make_tiny(ckpt_dir, TinySpec(layers=3, dense_layers=1, experts=args.experts, top_k=8, seed=0,
                                     **K2_WIDTHS), overwrite=True)
    convert(ckpt_dir, store_dir, "int4")
    threads = physical_cores()
    bw = BandwidthProbe().gbps(threads) if not args.part else 1.0  # parts measure, the parent projects
    cfg = Checkpoint.open(ckpt_dir).config
    hw = replace(detect(), ram_bandwidth_gbps=bw, notes=())
    result = make_plan(cfg, str(ckpt_dir), hw, PlanRequest(context_length=1024, expert_format="int4"))
    plan = result.plan
    if args.part:
        Path(args.part_out).write_text(json.dumps(measure_part(args.part, ckpt_dir, store_dir, plan, threads)))
        return None
    rows = {}
    for part in ("disjoint", "main", "deferral"):  # each in a fresh process: torch's OpenMP pool, once
        out_file = work / f"part-{part}.json"      # resized, keeps spinning and skews the next measurement
        subprocess.run([sys.executable, __file__, "--work", str(work), "--experts", str(args.experts),
                        "--part", part, "--part-out", str(out_file)], check=True)
        rows[part] = json.loads(out_file.read_text())
    rows[0] = rows["main"] | {"overlap_disjoint": rows["disjoint"]["overlap"]}
    rows[1] = rows["deferral"]
    proj = result.projection
    out = {"read_bandwidth_gbps": bw, "threads": threads, "experts": args.experts,
           "measured": rows[0], "deferral_decode_tps": rows[1]["decode_tps"],
           "disjoint_decode_tps": rows["disjoint"]["decode_tps"],
           "projected": {"decode_tps": proj.decode_tps, "prefill_tps": proj.prefill_tps,
                         "decode_ms": proj.decode_ms, "prefill_chunk": plan.settings.prefill_chunk}}
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def report(out):
    t = Table(title=f"K2-width runtime, CPU-only, {out['threads']} threads, read bandwidth "
                    f"{out['read_bandwidth_gbps']:.1f} GB/s")
    for col in ("metric", "measured", "projected", "measured / projected"):
        t.add_column(col)
    m, p = out["measured"], out["projected"]
    t.add_row("decode tok/s", f"{m['decode_tps']:.2f}", f"{p['decode_tps']:.2f}", f"{m['decode_tps'] / p['decode_tps']:.2f}")
    t.add_row("prefill tok/s (128)", f"{m['prefill_tps_128']:.2f}", f"{p['prefill_tps']:.2f}",
              f"{m['prefill_tps_128'] / p['prefill_tps']:.2f}")
    t.add_row("decode tok/s, 1 expert deferred", f"{out['deferral_decode_tps']:.2f}", "", "")
    for key, label in (("overlap", "all cores shared"), ("overlap_disjoint", "disjoint cores")):
        o = m[key]
        t.add_row(f"MoE block ms, {label} (routed | shared | both)",
                  f"{o['routed_ms']:.1f} | {o['shared_ms']:.1f} | {o['block_ms']:.1f}", "", "")
    Console().print(t)


if __name__ == "__main__":
    main()
