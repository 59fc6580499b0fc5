"""`python -m cpu_kernels.bench`: routed-expert speed at Kimi-K2 shapes against the machine's limits.

Dimension legend: T tokens, H hidden (7168), I expert width (2048), E experts (64), K top-k (8).

In one run: a memory read-bandwidth probe (just before and after each decode row), for each format decode (T = 1,
fresh random experts per token, so the E-expert working set is far beyond L3) in tokens/s and achieved weight
GB/s, prefill tokens/s and GFLOP/s at 32, 128 and 512 tokens, and the torch baseline the way transformers runs
experts (a per-expert F.linear loop) in bf16 and fp32. Formats are ours (bf16, int8, int4) and the GGUF block
types (`--formats Q4_K,IQ2_XXS`, or `--gguf` for all), whose GB/s count the type's own bytes; with
`--llama-python` each GGUF type also gets llama.cpp's row (bench_ggml.py), measured right after ours. Prints a
table (rich), writes JSON with --json. Random weights: speed does not depend on the values, and the bf16 bits
are kept to normal numbers (no subnormals); GGUF layers are random valid blocks (formats/gguf/samples.py).
Memory: one format's layer at a time (bf16: E * 88 MB) beside the 2 GiB probe array, fp32 torch on E/4 experts;
peak ~8 GB at E = 64 (a llama.cpp row holds its own copy of the layer, in its own process, after ours is freed).
Longer than 400 lines because measuring and rendering stay together: the renderers import rich inside their
functions, which only this module of cpu_kernels may (tests/test_layout.py).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
from numba import njit

from .formats import GGUF_NAMES, Format, expert_bytes, parse_format, value_dtype_name
from .formats import scale_shape as one_scale_shape
from .formats import value_shape as one_value_shape
from .formats.gguf.samples import random_blocks
from .moe import MoEExperts
from .store import PROJECTIONS, ExpertStore, projection_shape
from .threads import KernelThreads, physical_cores, split_range

H, I, K = 7168, 2048, 8
PREFILL_TOKENS = (32, 128, 512)
PROBE_BYTES = 2 << 30  # >= 2 GiB: far beyond any L3, so the probe measures DRAM
MIN_SECONDS = 1.5  # each decode measurement runs at least this long


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _sum(a):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += a[i]
    return s


class BandwidthProbe:
    """Read bandwidth of this machine now: numba threads summing disjoint slices of one 2 GiB float32 array.

    Measured right before and after every decode row, because on a shared VM the bandwidth left to us moves
    by tens of percent within minutes; each row is compared with the better of its two neighbouring probes.
    """

    def __init__(self, nbytes: int = PROBE_BYTES):
        self.array = np.ones(nbytes // 4, np.float32)
        _sum(self.array[:16])

    def gbps(self, n_threads: int, repeats: int = 3) -> float:
        a, pool, best = self.array, KernelThreads(n_threads), float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            pool.run(lambda p: _sum(a[slice(*split_range(a.shape[0], p, n_threads))]))
            best = min(best, time.perf_counter() - t0)
        pool.close()
        return a.nbytes / best / 1e9

    def around(self, n_threads: int, measure):
        """(measure(), the better probe of just before and just after it)."""
        before = self.gbps(n_threads)
        value = measure()
        return value, max(before, self.gbps(n_threads))


# Decode targets, as a share of the probe at the full thread count, for the GGUF types: Q8_0 and the K-quants
# read a few bytes of scales per block and then plain integers; IQ and TQ types decode through grids and ternary
# digits, a lookup or a division per few weights, so they may be compute-bound below the memory limit.
GGUF_PROBE_TARGET = {"Q8_0": 0.80, "Q2_K": 0.80, "Q3_K": 0.80, "Q4_K": 0.80, "Q5_K": 0.80, "Q6_K": 0.80}
IQ_TQ_PROBE_TARGET = 0.60


def random_store(fmt: Format, n_experts: int, seed: int = 0) -> ExpertStore:
    """A K2-shaped layer of random codes and scales in `fmt`, made without quantizing (fast). A GGUF type gets
    random valid blocks ([E, n_out, B] per projection, as a file lays them out): random bytes would put inf or
    NaN into their f16 scales."""
    rng = np.random.default_rng(seed)
    if fmt.spec.ggml_type is not None:
        blocks = {}
        for name in PROJECTIONS:
            n_out, n_in = projection_shape(name, H, I)
            blocks[name] = random_blocks(fmt.name, n_experts * n_out, n_in, rng).reshape(n_experts, n_out, -1)
        return ExpertStore.from_blocks(dict.fromkeys(PROJECTIONS, fmt), n_experts, H, I, blocks)
    values, scales = {}, {}
    for name in PROJECTIONS:
        n_out, n_in = projection_shape(name, H, I)
        shape = (n_experts,) + one_value_shape(fmt, n_out, n_in)
        raw_dtype = np.uint16 if fmt.name == "bf16" else np.uint8
        raw = rng.integers(0, np.iinfo(raw_dtype).max + 1, size=shape, dtype=raw_dtype)
        if fmt.name == "bf16":
            raw &= np.uint16(0x807F)  # keep sign and mantissa, then force a normal exponent (|w| in [2^-7, 2^-6))
            raw |= np.uint16(0x3C00)
        values[name] = raw.view(value_dtype_name(fmt))
        scales[name] = (rng.random((n_experts,) + one_scale_shape(fmt, n_out, n_in), dtype=np.float32) + 0.5) * 1e-3
    return ExpertStore(fmt, n_experts, H, I, values, scales)


def random_batch(rng, n_tokens: int, n_experts: int):
    ids = np.stack([rng.choice(n_experts, K, replace=False) for _ in range(n_tokens)]).astype(np.int64)
    weights = rng.random((n_tokens, K), dtype=np.float32)
    return rng.standard_normal((n_tokens, H), dtype=np.float32), ids, weights


def time_decode(run, rng, n_experts: int, segments: int = 3) -> float:
    """Seconds per token of run(hidden, ids, weights) at T = 1, fresh random experts per call.

    Best of `segments` runs of at least MIN_SECONDS / segments each: the machine may be shared, and a
    segment that overlapped someone else's work says nothing about the kernel.
    """
    for _ in range(2):
        run(*random_batch(rng, 1, n_experts))
    batches = [random_batch(rng, 1, n_experts) for _ in range(200)]
    best, n = float("inf"), 0
    for _ in range(segments):
        count, t0 = 0, time.perf_counter()
        while count < 4 or time.perf_counter() - t0 < MIN_SECONDS / segments:
            run(*batches[n % len(batches)])
            n, count = n + 1, count + 1
        best = min(best, (time.perf_counter() - t0) / count)
    return best


def time_prefill(run, rng, n_tokens: int, n_experts: int, repeats: int) -> float:
    batch = random_batch(rng, n_tokens, n_experts)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(*batch)
        best = min(best, time.perf_counter() - t0)
    return best


def flops(n_tokens: int) -> int:
    return 2 * 3 * H * I * K * n_tokens


def bench_format(fmt: Format, n_experts: int, thread_counts, prefill_tokens, probe: BandwidthProbe, seed: int = 0) -> list:
    """Rows for our kernels in `fmt`: decode at each thread count, prefill at the largest."""
    store = random_store(fmt, n_experts, seed)
    rng = np.random.default_rng(seed + 1)
    rows = []
    for n_threads in thread_counts:
        experts = MoEExperts(store, n_threads=n_threads)
        experts.forward(*random_batch(rng, 8, n_experts))  # compile / load the four-token kernels too
        s_tok, probe_gbps = probe.around(n_threads, lambda: time_decode(experts.forward, rng, n_experts))
        row = {"impl": "cpu_kernels", "format": str(fmt), "threads": n_threads, "decode_tok_s": 1 / s_tok,
               "decode_gbps": K * expert_bytes(fmt, H, I) / s_tok / 1e9, "probe_gbps": probe_gbps}
        if n_threads == max(thread_counts):
            for t in prefill_tokens:
                secs = time_prefill(experts.forward, rng, t, n_experts, 1 if t >= 512 else 2)
                row[f"prefill{t}_tok_s"], row[f"prefill{t}_gflops"] = t / secs, flops(t) / secs / 1e9
        experts.close()
        rows.append(row)
    return rows


def torch_rows(dtype_name: str, n_experts: int, n_threads: int, prefill_tokens, ref_experts: int,
               probe: BandwidthProbe, seed: int = 0) -> dict:
    """The transformers-style per-expert F.linear loop in torch, bf16 or fp32, on random weights.

    Prefill token counts are scaled by n_experts / ref_experts so each expert gets as many tokens as in our runs.
    """
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(n_threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    g = torch.Generator().manual_seed(seed)
    gate, up = (torch.randn(n_experts, I, H, generator=g).mul_(0.02).to(dtype) for _ in range(2))
    down = torch.randn(n_experts, H, I, generator=g).mul_(0.02).to(dtype)

    def run(hidden, ids, weights):
        x, ids_t, w = torch.from_numpy(hidden).to(dtype), torch.from_numpy(ids), torch.from_numpy(weights)
        out = torch.zeros(x.shape, dtype=torch.float32)
        with torch.inference_mode():
            for e in torch.unique(ids_t).tolist():
                tok, slot = torch.nonzero(ids_t == e, as_tuple=True)
                h = F.silu(F.linear(x[tok], gate[e])) * F.linear(x[tok], up[e])
                out.index_add_(0, tok, F.linear(h, down[e]).float() * w[tok, slot, None])
        return out

    rng = np.random.default_rng(seed + 2)
    s_tok, probe_gbps = probe.around(n_threads, lambda: time_decode(run, rng, n_experts))
    elem = 2 if dtype_name == "bf16" else 4
    row = {"impl": "torch", "format": dtype_name, "threads": n_threads, "decode_tok_s": 1 / s_tok,
           "decode_gbps": K * 3 * H * I * elem / s_tok / 1e9, "experts": n_experts, "probe_gbps": probe_gbps}
    for t in prefill_tokens:
        t_here = max(1, t * n_experts // ref_experts)
        secs = time_prefill(run, rng, t_here, n_experts, 1 if t >= 512 else 2)
        row[f"prefill{t}_tok_s"], row[f"prefill{t}_gflops"] = t_here / secs, flops(t_here) / secs / 1e9
    return row


def warm_start_seconds() -> float:
    """Seconds for a fresh process to import cpu_kernels and finish a first forward, numba cache warm."""
    code = ("import time; t0 = time.perf_counter(); import numpy as np; from cpu_kernels import MoEExperts, Format\n"
            "rng = np.random.default_rng(0); g = rng.standard_normal((4, 128, 256), dtype=np.float32)\n"
            "d = rng.standard_normal((4, 256, 128), dtype=np.float32)\n"
            "for f in (Format('bf16'), Format('int8', 128), Format('int4', 128)):\n"
            "    MoEExperts.from_weights(g, g, d, f, n_threads=1).forward(np.ones((5, 256), np.float32),"
            " np.zeros((5, 2), np.int64), np.ones((5, 2), np.float32))\n"
            "print(time.perf_counter() - t0)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    run = lambda: float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout)
    run()  # fills the cache if it was cold
    return run()


def kt_row(kt_python: str, method: str, n_experts: int, n_threads: int, ref_experts: int) -> dict:
    """kt-kernel's MoE op on the same shapes, run by bench_kt.py in kt's own interpreter (never a dependency)."""
    script = os.path.join(os.path.dirname(__file__), "bench_kt.py")
    done = subprocess.run([kt_python, script, method, str(n_experts), str(n_threads), str(ref_experts)], capture_output=True, text=True,
                          cwd="/tmp")
    if done.returncode != 0:
        return {"impl": "kt-kernel", "format": method, "threads": n_threads, "error": done.stderr.strip()[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_row(llama_python: str, type_name: str, n_experts: int, n_threads: int, prefill_tokens) -> dict:
    """llama.cpp's MoE graph (ggml_mul_mat_id) on the same GGUF type and shapes, run by bench_ggml.py in an
    interpreter with llama-cpp-python built from source (never a dependency)."""
    script = os.path.join(os.path.dirname(__file__), "bench_ggml.py")
    tokens = ",".join(map(str, prefill_tokens)) or "-"
    done = subprocess.run([llama_python, script, type_name, str(n_experts), str(n_threads), tokens],
                          capture_output=True, text=True, cwd="/tmp")
    if done.returncode != 0:
        return {"impl": "llama.cpp", "format": type_name, "threads": n_threads, "error": done.stderr.strip()[-300:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def gguf_targets(ours: dict, llama: dict, n: int) -> list:
    """The GGUF rows' targets at the full thread count n: decode GB/s / probe, and tok/s / llama.cpp's."""
    out = []
    for (fmt, threads), r in sorted(ours.items()):
        if fmt not in GGUF_NAMES or threads != n:
            continue
        want, ratio = GGUF_PROBE_TARGET.get(fmt, IQ_TQ_PROBE_TARGET), r["decode_gbps"] / r["probe_gbps"]
        out.append((f"{fmt} decode GB/s / probe, {threads} thr", ratio, want, ratio >= want))
        if (fmt, threads) in llama:
            ratio = r["decode_tok_s"] / llama[fmt, threads]["decode_tok_s"]
            out.append((f"{fmt} decode tok/s / llama.cpp, {threads} thr", ratio, 1.0, ratio >= 1.0))
    return out


def targets(result: dict) -> list:
    """(name, measured ratio, target, met) for the issue's targets, from one run's rows and probe."""
    rows = result["rows"]
    n = result["threads"]
    ours = {(r["format"], r["threads"]): r for r in rows if r["impl"] == "cpu_kernels"}
    llama = {(r["format"], r["threads"]): r for r in rows if r["impl"] == "llama.cpp" and "error" not in r}
    torch_bf16 = next((r for r in rows if r["impl"] == "torch" and r["format"] == "bf16"), None)
    torch_fp32 = next((r for r in rows if r["impl"] == "torch" and r["format"] == "fp32"), None)
    out = []
    for (fmt, threads), r in sorted(ours.items()):
        if fmt in GGUF_NAMES:
            continue
        if fmt.startswith(("int4", "int8")):
            want = 0.85 if threads == n else 0.75
            ratio = r["decode_gbps"] / r["probe_gbps"]
            out.append((f"{fmt} decode GB/s / probe, {threads} thr", ratio, want, ratio >= want))
        if threads != n:
            continue
        if torch_bf16:
            ratio = r["decode_tok_s"] / torch_bf16["decode_tok_s"]
            out.append((f"{fmt} decode tok/s / torch bf16 loop", ratio, 4.0, ratio >= 4.0))
        if torch_fp32 and "prefill512_gflops" in r:
            ratio = r["prefill512_gflops"] / torch_fp32["prefill512_gflops"]
            out.append((f"{fmt} prefill-512 GFLOP/s / torch fp32", ratio, 0.6, ratio >= 0.6))
        if "prefill512_tok_s" in r:
            ratio = r["prefill512_tok_s"] / r["decode_tok_s"]
            out.append((f"{fmt} prefill-512 tok/s / decode tok/s", ratio, 20.0, ratio >= 20.0))
    return out + gguf_targets(ours, llama, n)


def layout_note(r: dict) -> str:
    """How a llama.cpp row held its weights: llama.cpp's CPU_REPACK layout for the projections it repacked."""
    if "repacked" not in r:
        return ""
    done = r["repacked"]
    return " (CPU_REPACK)" if len(done) == 3 else f" (CPU_REPACK: {', '.join(done)})" if done else " (plain)"


def gguf_comparison(result: dict) -> tuple[list, list]:
    """Header and rows of the per-type table: ours against llama.cpp at the full thread count, GGUF types only."""
    n, t = result["threads"], max(result["prefill_tokens"])
    rows = {(r["impl"], r["format"]): r for r in result["rows"] if r["threads"] == n and "error" not in r}
    pct = lambda r: f"{100 * r['decode_gbps'] / r['probe_gbps']:.0f}" if r else ""  # noqa: E731
    num = lambda r, key, fmt: format(r[key], fmt) if r and key in r else ""  # noqa: E731
    header = ["type", "bits/weight", "ours tok/s", "ours GB/s", "ours % probe", "llama.cpp tok/s", "llama.cpp GB/s",
              "llama.cpp % probe", "ours / llama.cpp", f"ours pf{t} GFLOP/s", f"llama.cpp pf{t} GFLOP/s", "llama.cpp layout"]
    out = []
    for name in GGUF_NAMES:
        ours, theirs = rows.get(("cpu_kernels", name)), rows.get(("llama.cpp", name))
        if ours is None:
            continue
        ratio = f"{ours['decode_tok_s'] / theirs['decode_tok_s']:.2f}" if theirs else ""
        out.append([name, f"{Format(name).spec.bits_per_weight(None):.3g}", num(ours, "decode_tok_s", ".1f"),
                    num(ours, "decode_gbps", ".1f"), pct(ours), num(theirs, "decode_tok_s", ".1f"),
                    num(theirs, "decode_gbps", ".1f"), pct(theirs), ratio, num(ours, f"prefill{t}_gflops", ".0f"),
                    num(theirs, f"prefill{t}_gflops", ".0f"), layout_note(theirs).strip(" ()") if theirs else ""])
    return header, out


def print_report(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    probe = result["probe_gbps"]
    m = result["machine"]
    console.print(f"{m['cpu']}, {m['physical_cores']} cores, {m['ram_gib']} GiB; load average before/after "
                  f"{m['loadavg_1min']:.2f}/{result['loadavg_1min_after']:.2f} (> 0.5 means others shared the cores)")
    console.print("read bandwidth probe (best over the run; each row is compared with its own neighbouring probes): "
                  + ", ".join(f"{t} thr {g:.1f} GB/s" for t, g in probe.items()) + f"; warm start {result['warm_start_s']:.2f} s")
    table = Table(title=f"routed experts, H={H} I={I} K={K}, {result['experts']} experts")
    for col in ("impl", "format", "thr", "decode tok/s", "GB/s", "% probe", *(f"pf{t} tok/s" for t in result["prefill_tokens"]),
                "pf GFLOP/s (max T)"):
        table.add_column(col, justify="left" if col in ("impl", "format") else "right")
    big = f"prefill{max(result['prefill_tokens'])}_gflops" if result["prefill_tokens"] else None
    for r in result["rows"]:
        if "error" in r:
            table.add_row(r["impl"], r["format"], str(r["threads"]), f"[red]{r['error'][:60]}")
            continue
        pct = 100 * r["decode_gbps"] / r["probe_gbps"] if "probe_gbps" in r else float("nan")
        cells = [f"{r.get(f'prefill{t}_tok_s', float('nan')):.1f}" for t in result["prefill_tokens"]]
        table.add_row(r["impl"] + (f" (E={r['experts']})" if "experts" in r else "") + layout_note(r), r["format"], str(r["threads"]),
                      f"{r['decode_tok_s']:.1f}", f"{r['decode_gbps']:.1f}", f"{pct:.0f}", *cells,
                      f"{r.get(big, float('nan')):.1f}" if big else "")
    console.print(table)
    header, rows = gguf_comparison(result)
    if rows:
        compare = Table(title=f"GGUF types, {result['threads']} threads: ours against llama.cpp")
        for col in header:
            compare.add_column(col, justify="left" if col == "type" else "right")
        for cells in rows:
            compare.add_row(*cells)
        console.print(compare)
    goals = Table(title="targets (issues 4 and 16)")
    for col in ("target", "measured", "wanted", "met"):
        goals.add_column(col)
    for name, ratio, want, met in targets(result):
        goals.add_row(name, f"{ratio:.3f}", f">= {want:g}", "[green]yes" if met else "[red]no")
    console.print(goals)


def machine() -> dict:
    """What the numbers were measured on: CPU model, physical cores, RAM, and the load average (shared machines)."""
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    ram_kb = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    flags = open("/proc/cpuinfo").read()
    return {"cpu": model, "physical_cores": physical_cores(), "ram_gib": round(ram_kb / 2**20, 1),
            "avx512": "avx512f" in flags, "loadavg_1min": os.getloadavg()[0]}


def markdown(result: dict) -> str:
    """The results and targets tables as Markdown, for docs/performance.md."""
    probe, m = result["probe_gbps"], result["machine"]
    ts = result["prefill_tokens"]
    lines = ["Probe (best over the run; % of probe uses each row's own neighbouring probes): "
             + ", ".join(f"{t} thread(s) {g:.1f} GB/s" for t, g in probe.items())
             + f". Load average before/after: {m['loadavg_1min']:.2f}/{result['loadavg_1min_after']:.2f}.", "",
             "| impl | format | threads | decode tok/s | decode GB/s | probe GB/s | % of probe | "
             + " | ".join(f"prefill {t} tok/s" for t in ts) + f" | prefill {max(ts)} GFLOP/s |",
             "|" + " --- |" * (8 + len(ts))]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['impl']} | {r['format']} | {r['threads']} | error: {r['error'][:80]} |")
            continue
        pct = 100 * r["decode_gbps"] / r["probe_gbps"] if "probe_gbps" in r else float("nan")
        cells = " | ".join(f"{r[f'prefill{t}_tok_s']:.0f}" if f"prefill{t}_tok_s" in r else "" for t in ts)
        gf = r.get(f"prefill{max(ts)}_gflops")
        impl = r["impl"] + (f" ({r['experts']} experts)" if "experts" in r else "") + layout_note(r)
        lines.append(f"| {impl} | {r['format']} | {r['threads']} | {r['decode_tok_s']:.1f} | {r['decode_gbps']:.1f} "
                     f"| {r.get('probe_gbps', float('nan')):.1f} | {pct:.0f} | {cells} | {'' if gf is None else f'{gf:.0f}'} |")
    header, rows = gguf_comparison(result)
    if rows:
        lines += ["", "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
        lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    lines += ["", "| target | measured | wanted | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {v:.3f} | >= {w:g} | {'yes' if ok else 'no'} |" for n, v, w, ok in targets(result)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m cpu_kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=physical_cores(), help="kernel threads (default: physical cores)")
    p.add_argument("--formats", default="bf16,int8,int4",
                   help="comma list, e.g. int4,int4-g32,int8-g64,bf16 or GGUF types Q4_K,Q2_K,IQ2_XXS")
    p.add_argument("--gguf", action="store_true", help="add every GGUF type (" + ",".join(GGUF_NAMES) + ")")
    p.add_argument("--experts", type=int, default=64, help="experts in the layer (working set = experts x size)")
    p.add_argument("--quick", action="store_true", help="16 experts, prefill 32/128 only, no torch bf16")
    p.add_argument("--no-torch", action="store_true", help="skip the torch baselines")
    p.add_argument("--kt-python", help="interpreter with kt-kernel installed: adds its AMXINT8/AMXINT4 rows")
    p.add_argument("--llama-python", help="interpreter with llama-cpp-python built from source: adds llama.cpp's "
                   "row for each GGUF type")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--markdown", help="write the tables as Markdown here (for docs/performance.md)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    return run(parse_args(argv))


def format_list(text: str, gguf: bool = False) -> list:
    """The Formats of a --formats comma list, plus every GGUF type not already in it when `gguf` (--gguf)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    return [parse_format(t) for t in names + [n for n in GGUF_NAMES if gguf and n not in names]]


def run(args) -> dict:
    """The benchmark for parsed options (parse_args' names: threads, formats, gguf, experts, quick, no_torch,
    kt_python, llama_python, json, markdown); `hybrid bench` fills them from its click options."""
    n_experts = 16 if args.quick else args.experts
    prefill_tokens = PREFILL_TOKENS[:2] if args.quick else PREFILL_TOKENS
    thread_counts = sorted({1, args.threads})
    probe = BandwidthProbe()
    result = {"machine": machine(), "experts": n_experts, "threads": args.threads, "prefill_tokens": list(prefill_tokens),
              "rows": []}
    for fmt in format_list(args.formats, args.gguf):
        result["rows"] += bench_format(fmt, n_experts, thread_counts, prefill_tokens, probe)
        if args.llama_python and fmt.spec.ggml_type is not None:  # right after ours, on the same E and shapes
            row, probe_gbps = probe.around(args.threads, lambda: llama_row(args.llama_python, fmt.name, n_experts,
                                                                           args.threads, prefill_tokens))
            result["rows"].append(dict(row, probe_gbps=probe_gbps))
    if not args.no_torch:
        if not args.quick:
            result["rows"].append(torch_rows("bf16", n_experts, args.threads, prefill_tokens, n_experts, probe))
        # fp32 weights are 4 bytes: a quarter of the experts keeps memory down and is still far beyond L3.
        result["rows"].append(torch_rows("fp32", max(K, n_experts // 4), args.threads, prefill_tokens, n_experts, probe))
    if args.kt_python:
        for method in ("AMXINT8", "AMXINT4"):
            row, probe_gbps = probe.around(args.threads, lambda: kt_row(args.kt_python, method, max(K, n_experts // 2),
                                                                         args.threads, n_experts))
            result["rows"].append(dict(row, probe_gbps=probe_gbps))
    result["probe_gbps"] = {str(t): max([r["probe_gbps"] for r in result["rows"] if r["threads"] == t and "probe_gbps" in r]
                                        + [0.0]) for t in thread_counts}
    result["warm_start_s"] = warm_start_seconds()
    result["loadavg_1min_after"] = os.getloadavg()[0]
    result["targets"] = [dict(zip(("target", "measured", "wanted", "met"), t)) for t in targets(result)]
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(result))
    return result


if __name__ == "__main__":
    main()
