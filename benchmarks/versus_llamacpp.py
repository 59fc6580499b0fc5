"""hybrid against llama.cpp on the same K2-width models, CPU-only: whole-token decode time of a 1 dense + 2 MoE
layer model and of a 1 dense + 4 MoE layer model, and one MoE layer's time as half their difference.

    .venv/bin/python benchmarks/versus_llamacpp.py --llama-python /work/scratch/llama-venv/bin/python \
        [--experts 32] [--rounds 3] [--threads 2] [--realtime] [--work /tmp/hybrid-vs-llamacpp] [--json out.json]

llama.cpp is a peer, never a dependency and never in CI: `--llama-python` is an interpreter with llama-cpp-python
built from source, gguf and numpy (benchmarks/ggml_ref.py's docstring says how to build one). This file runs in
both interpreters: as the driver in the project venv, and as a child in either (`--child build|hybrid|llama|libdir`).

The models (built once, cached in --work): `make_tiny` at K2_WIDTHS (hidden 7168, 64 heads, experts 2048 wide,
dense MLP 18432) with E routed experts, top-8, one shared expert, and make_tiny's byte-level vocabulary (512 ids,
so the output head is 7168 x 512: ~0.3 % of K2's 163,840-row head, which alone would add ~1.2 G weights to every
token). For each model, from the same FP8 checkpoint:
- llama.cpp's file: tests/gguf_files.py's `export_gguf` with ggml's own quantizers (ggml_ref.quantize, the code
  llama-quantize runs, loaded in this process from the llama build's libggml): Q4_K routed experts, Q8_0 every
  other matrix (what an int8 CPU linear compares to), norms / router / correction bias F32;
- hybrid's: the int4 expert store `hybrid convert` writes (convert()); the rest of the model is read from the
  checkpoint as the plan says.
Building both 32-expert models takes ~35 min on 2 busy cores (ggml's Q4_K quantizer: ~5 M weights/s per thread),
in a child process (~5-9 GB resident); then 21 GB of files stay in --work. During the rounds the driver holds
the probe's 2 GiB and one engine's child runs at a time (the 5-layer model: ~4-5 GB).

The run: N rounds; each round probes the read bandwidth (cpu_kernels.bench's BandwidthProbe, --threads threads)
and then decodes with each engine on each model, the engine order alternating from round to round, each run in a
fresh child process that exits (its model freed) before the next starts. A run feeds a 16-token prompt, decodes
4 tokens untimed, then times 32 single-token decodes (the same token ids for both engines) and keeps the median.
With --realtime (root) the timed decodes and the probe run under SCHED_FIFO, ahead of other jobs: on a shared
machine this times llama.cpp's multi-threaded decode rather than the scheduler (`realtime` says why).
- llama.cpp: llama_cpp.Llama on the file (mmap), CPU, --threads for decode and batch, its defaults otherwise
  (F16 KV cache, flash attention off as llama-cpp-python sets it, extra buffer types on: the repacked CPU_REPACK
  layouts where this CPU has kernels for them; the report shows each buffer's size) except on CPUs with AMX or
  with --no-extra-bufts (../shared/gguf-notes.md); the file's YaRN betas as context parameters (see
  llamacpp_agreement.file_yarn_betas).
- hybrid: the plan `hybrid generate` makes for this machine without --plan (plan_for_this_machine, in the store's
  format), opened as the CLI opens it with --threads (quiet OpenMP, open_runtime's thread budget), decode_step.
Per engine the report gives ms/token of both models (median over rounds), one MoE layer = (5-layer - 3-layer) / 2,
and the targets of issue 16: hybrid / llama.cpp <= 0.9 for the MoE layer and for the 3-layer token.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

# numpy and the standard library only, as this file: importable in both interpreters (the script's folder is on
# sys.path when it runs)
from llamacpp_agreement import REST_MATRICES, add_merges, file_yarn_betas, has_amx

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"3-layer": 3, "5-layer": 5}  # layers: 1 dense + 2 MoE, 1 dense + 4 MoE
EXPERT_TYPE, REST_TYPE, STORE_FORMAT = "Q4_K", "Q8_0", "int4"
TARGET = 0.9  # issue 16: hybrid's time <= 0.9 x llama.cpp's
N_PROMPT, N_WARM, N_DECODE = 16, 4, 32
N_BYTE_IDS = 256  # make_tiny's byte ranks: ordinary tokens for both engines
RT_PRIORITY = 1  # --realtime: the lowest SCHED_FIFO priority, above every ordinary (CFS) task
CHILD_TIMEOUT_S = 1800


def token_ids(n: int, seed: int = 0) -> list:
    """The prompt and decode ids both engines get (byte tokens, never a special one)."""
    return np.random.default_rng(seed).integers(0, N_BYTE_IDS, n).tolist()


@contextmanager
def realtime(on: bool):
    """With `on`, every thread of this process runs SCHED_FIFO inside the block (threads started inside inherit
    it), SCHED_OTHER again after. On a machine other jobs load, an engine whose threads meet at a barrier per
    graph op (llama.cpp: several hundred per token) waits a scheduler slice whenever one of them is descheduled:
    measured here with three other processes busy, llama.cpp's 2-thread decode of the 3-layer 8-expert model
    took 357 ms/token against 57 ms under SCHED_FIFO (1 thread: 152 / 106). Both engines' threads block rather
    than spin when idle (llama.cpp's OpenMP after a short spin; hybrid's kernel worker and torch's pool under
    OMP_WAIT_POLICY=PASSIVE), and the kernel leaves ordinary tasks 5 % of each second (sched_rt_runtime_us), so
    nothing starves for good."""
    if not on:
        yield
        return

    def set_all(policy, priority):
        for tid in os.listdir("/proc/self/task"):
            try:
                os.sched_setscheduler(int(tid), policy, os.sched_param(priority))
            except ProcessLookupError:  # a thread that ended meanwhile
                pass

    set_all(os.SCHED_FIFO, RT_PRIORITY)
    try:
        yield
    finally:
        set_all(os.SCHED_OTHER, 0)


def timed_decode(step, ids: list, rt: bool) -> list:
    """ms of each step(token) after the N_WARM untimed ones (the prompt is already in the cache)."""
    ms = []
    with realtime(rt):
        for i, t in enumerate(ids):
            t0 = time.perf_counter()
            step(t)
            if i >= N_WARM:
                ms.append(1e3 * (time.perf_counter() - t0))
    return ms


# ---- children: each measures one engine on one model and writes {"ms": [...], ...} as JSON ------------------

def child_llama(gguf_file: Path, threads: int, extra_bufts: bool, rt: bool, out: Path):
    """llama.cpp's decode, in the llama interpreter (gguf, numpy, llama_cpp only)."""
    import llama_cpp
    import llama_cpp.llama_cpp as api

    if not extra_bufts:  # Llama() takes its model params from here; it has no argument for this one
        defaults = api.llama_model_default_params

        def model_params():
            p = defaults()
            p.use_extra_bufts = False
            return p

        api.llama_model_default_params = model_params
    ids = token_ids(N_PROMPT + N_WARM + N_DECODE)
    beta_fast, beta_slow = file_yarn_betas(gguf_file)
    llm = llama_cpp.Llama(model_path=str(gguf_file), n_gpu_layers=0, n_ctx=len(ids), n_threads=threads,
                          n_threads_batch=threads, yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow, verbose=True)
    llm.eval(ids[:N_PROMPT])
    ms = timed_decode(lambda t: llm.eval([t]), ids[N_PROMPT:], rt)
    out.write_text(json.dumps({"ms": ms}))


def child_hybrid(ckpt_dir: Path, store: Path, threads: int, rt: bool, out: Path):
    """hybrid's decode under the plan its CLI makes for this machine, on a budget of `threads`."""
    from hybrid.generation.threads import quiet_openmp

    quiet_openmp()  # as hybrid's CLI does, before torch loads
    from hybrid.generation.generate import decode_step, prefill
    from hybrid.generation.runtime import open_runtime, plan_for_this_machine, plan_summary
    from hybrid.read.open import open_checkpoint

    ckpt = open_checkpoint(ckpt_dir)
    plan = plan_for_this_machine(ckpt, store).plan
    runtime = open_runtime(ckpt, plan, store, threads=threads)
    ids = token_ids(N_PROMPT + N_WARM + N_DECODE)
    cache = runtime.new_cache(len(ids))
    prefill(runtime.model, cache, ids[:N_PROMPT], runtime.prefill_chunk)
    ms = timed_decode(lambda t: decode_step(runtime.model, cache, [t]), ids[N_PROMPT:], rt)
    rules = sorted({f"{r.kernel} {r.format} on {r.device}" for r in runtime.plan.rules})
    out.write_text(json.dumps({"ms": ms, "plan": plan_summary(runtime.plan), "rules": rules,
                               "cpu_threads": runtime.plan.settings.cpu_threads}))


def child_libdir():
    """Where the llama build's libggml*.so are (printed), for ggml's quantizers in the project's interpreter."""
    import ggml_ref

    print(ggml_ref.bench_ggml.lib_dir())


# ---- building the models (project interpreter) ------------------------------------------------------------

def ggml_quantizer(llama_python: str, threads: int):
    """ggml_ref.quantize (ggml's quantizers through ctypes) on `threads` threads (ctypes calls drop the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    lib = subprocess.run([llama_python, __file__, "--child", "libdir"], capture_output=True, text=True, check=True)
    os.environ.setdefault("HYBRID_GGML_LIB_DIR", lib.stdout.strip())
    from ggml_ref import quantize

    def run(rows: np.ndarray, type_name: str) -> np.ndarray:
        with ThreadPoolExecutor(threads) as pool:
            return np.concatenate(list(pool.map(lambda part: quantize(part, type_name),
                                                np.array_split(rows, threads))))
    return run


def model_paths(work: Path, layers: int, experts: int) -> dict:
    folder = work / f"k2w-{layers}layers-{experts}experts"
    return {"ckpt": folder / "ckpt", "store": folder / f"store-{STORE_FORMAT}",
            "gguf": folder / f"gguf-{EXPERT_TYPE}" / "K2w.gguf"}


def child_build(work: Path, layers: int, experts: int, llama_python: str, threads: int):
    """The checkpoint, hybrid's store and llama.cpp's GGUF of one model, each made only when missing (in a child
    process, so that the ~10 GB its 5-layer GGUF passes through go back to the system before the rounds)."""
    import shutil

    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_files import export_gguf

    from hybrid.read.convert import convert
    from hybrid.read.tiny import K2_WIDTHS, TinySpec, make_tiny

    paths = model_paths(work, layers, experts)
    if not (paths["ckpt"] / "config.json").exists():
        make_tiny(paths["ckpt"], TinySpec(layers=layers, dense_layers=1, experts=experts, top_k=8, seed=0,
                                          **K2_WIDTHS), overwrite=True)
    convert(paths["ckpt"], paths["store"], STORE_FORMAT)  # resumable: a no-op once complete
    gguf_dir = paths["gguf"].parent
    if not gguf_dir.exists():
        tmp = gguf_dir.with_name(".gguf-partial")
        shutil.rmtree(tmp, ignore_errors=True)
        types = {r"ffn_(gate|up|down)_exps": EXPERT_TYPE, REST_MATRICES: REST_TYPE}
        export_gguf(paths["ckpt"], tmp, types, name=paths["gguf"].stem, edit_metadata=add_merges,
                    quantize=ggml_quantizer(llama_python, threads))
        tmp.rename(gguf_dir)


def describe(paths: dict) -> dict:
    from hybrid.read.checkpoint import Checkpoint
    from hybrid.read.expert_store import read_store_manifest

    cfg = Checkpoint.open(paths["ckpt"]).config
    store_bytes = sum(f.stat().st_size for f in paths["store"].rglob("*") if f.is_file())
    return {"layers": cfg.num_hidden_layers, "dense_layers": cfg.first_k_dense_replace, "hidden": cfg.hidden_size,
            "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
            "expert_width": cfg.moe_intermediate_size,
            "vocab": cfg.vocab_size, "head_weights": cfg.vocab_size * cfg.hidden_size,
            "gguf_gb": paths["gguf"].stat().st_size / 1e9, "store_gb": store_bytes / 1e9,
            "store_format": read_store_manifest(paths["store"])["format"]}


# ---- the rounds -------------------------------------------------------------------------------------------

BUFFER_LINE = re.compile(r"(\S+) model buffer size\s*=\s*([\d.]+) MiB")


def run_child(python: str, *args) -> dict:
    """The child's result; one that failed after writing it (at exit) keeps it, with the failure in "exit"."""
    out = Path(args[-1])
    out.unlink(missing_ok=True)
    done = subprocess.run([python, __file__, "--child", *map(str, args)], capture_output=True, text=True,
                          timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0 and not out.exists():
        raise SystemExit(f"child {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1:] or [""]
        result["exit"] = f"exit status {done.returncode} after writing its result: {last[0]}"
    if args[0] == "llama":  # which buffers llama.cpp loaded the weights into (CPU_REPACK: re-laid-out blocks)
        result["buffers_mib"] = {name: float(mib) for name, mib in BUFFER_LINE.findall(done.stderr)}
    return result


def measure(engine: str, paths: dict, args) -> dict:
    out = args.work / f"last-{engine}.json"
    if engine == "llama":
        extra = not (args.no_extra_bufts or has_amx())
        return run_child(args.llama_python, "llama", paths["gguf"], args.threads, int(extra), int(args.realtime),
                         out)
    return run_child(sys.executable, "hybrid", paths["ckpt"], paths["store"], args.threads, int(args.realtime), out)


def run_rounds(models: dict, args, console) -> list:
    from cpu_kernels.bench import BandwidthProbe

    probe, rounds = BandwidthProbe(), []
    for r in range(args.rounds):
        with realtime(args.realtime):  # the probe's threads start inside: they inherit the policy
            gbps = probe.gbps(args.threads)
        row = {"round": r + 1, "probe_gbps": gbps, "loadavg_before": os.getloadavg()[0]}
        engines = ("llama", "hybrid") if r % 2 == 0 else ("hybrid", "llama")
        for name, paths in models.items():
            for engine in engines:
                console.log(f"round {r + 1}/{args.rounds}: {engine} on the {name} model")
                result = measure(engine, paths, args)
                row[f"{engine} {name}"] = result | {"median_ms": statistics.median(result["ms"])}
        row["loadavg_after"] = os.getloadavg()[0]
        rounds.append(row)
    return rounds


def summarize(rounds: list) -> dict:
    """Per engine: the median over rounds of each model's median ms/token, the MoE layer from those, and per round
    the MoE layer too (to show its spread); the ratios against the targets."""
    out = {}
    for engine in ("llama", "hybrid"):
        ms = {name: statistics.median(r[f"{engine} {name}"]["median_ms"] for r in rounds) for name in MODELS}
        per_round = [(r[f"{engine} 5-layer"]["median_ms"] - r[f"{engine} 3-layer"]["median_ms"]) / 2 for r in rounds]
        moe = (ms["5-layer"] - ms["3-layer"]) / 2
        out[engine] = {"ms_3_layer": ms["3-layer"], "ms_5_layer": ms["5-layer"], "moe_layer_ms": moe,
                       "rest_ms": ms["3-layer"] - 2 * moe, "moe_layer_ms_per_round": per_round}
    ratios = {"moe_layer": out["hybrid"]["moe_layer_ms"] / out["llama"]["moe_layer_ms"],
              "token_3_layer": out["hybrid"]["ms_3_layer"] / out["llama"]["ms_3_layer"]}
    out["ratios"] = ratios
    out["targets_met"] = {k: v <= TARGET for k, v in ratios.items()}
    return out


# ---- report -----------------------------------------------------------------------------------------------

def report(result: dict, console):
    from rich.table import Table

    m, s, info = result["machine"], result["summary"], result["model"]
    console.print(f"CPU: {m['cpu']}, {m['physical_cores']} cores, {m['ram_gib']} GiB RAM, AVX-512: {m['avx512']}; "
                  f"{result['threads']} threads per engine; timed "
                  f"{'under SCHED_FIFO (--realtime)' if result['realtime'] else 'at ordinary priority'}")
    for name, d in info.items():
        console.print(f"{name} model: {d['layers']} layers ({d['dense_layers']} dense), hidden {d['hidden']}, "
                      f"{d['experts']} routed experts {d['expert_width']} wide, top-{d['top_k']}, vocab {d['vocab']} "
                      f"(head {d['hidden']} x {d['vocab']} = {d['head_weights'] / 1e6:.1f} M weights; K2's is "
                      f"163840 rows, 1174 M); llama.cpp file {d['gguf_gb']:.2f} GB ({EXPERT_TYPE} experts, "
                      f"{REST_TYPE} rest), hybrid store {d['store_gb']:.2f} GB ({d['store_format']})")
    first = result["rounds"][0]
    console.print(f"llama.cpp: weight buffers (MiB) {first['llama 5-layer']['buffers_mib']} on the 5-layer model; "
                  f"extra buffer types {'on' if result['llama_extra_bufts'] else 'off'}")
    console.print(f"hybrid: {first['hybrid 5-layer']['plan']}; rules: {'; '.join(first['hybrid 5-layer']['rules'])}")

    t = Table(title="per round: median ms per decoded token (32 tokens after a 16-token prompt)")
    for col in ("round", "probe GB/s", "load before/after", "llama 3-layer", "hybrid 3-layer", "llama 5-layer",
                "hybrid 5-layer", "MoE layer llama / hybrid"):
        t.add_column(col, justify="right")
    for r in result["rounds"]:
        cell = lambda key: f"{r[key]['median_ms']:.1f}"  # noqa: E731
        moe = [(r[f"{e} 5-layer"]["median_ms"] - r[f"{e} 3-layer"]["median_ms"]) / 2 for e in ("llama", "hybrid")]
        t.add_row(str(r["round"]), f"{r['probe_gbps']:.1f}", f"{r['loadavg_before']:.2f}/{r['loadavg_after']:.2f}",
                  cell("llama 3-layer"), cell("hybrid 3-layer"), cell("llama 5-layer"), cell("hybrid 5-layer"),
                  f"{moe[0]:.1f} / {moe[1]:.1f}")
    console.print(t)
    for r in result["rounds"]:
        for key, v in r.items():
            if isinstance(v, dict) and "exit" in v:
                console.print(f"[yellow]round {r['round']}, {key}: {v['exit']}[/]")

    t = Table(title=f"median over {len(result['rounds'])} round(s), ms per token")
    for col in ("engine", "3-layer model", "5-layer model", "one MoE layer = (5-layer - 3-layer) / 2",
                "the rest (dense layer 0, head) = 3-layer - 2 x MoE layer"):
        t.add_column(col, justify="right")
    for engine, label in (("llama", "llama.cpp"), ("hybrid", "hybrid")):
        e = s[engine]
        t.add_row(label, f"{e['ms_3_layer']:.1f}", f"{e['ms_5_layer']:.1f}", f"{e['moe_layer_ms']:.1f}",
                  f"{e['rest_ms']:.1f}")
    console.print(t)

    t = Table(title="issue 16's targets")
    for col in ("target", "hybrid / llama.cpp", "wanted", "met"):
        t.add_column(col)
    for key, label in (("moe_layer", "one MoE layer's decode time"), ("token_3_layer", "3-layer model's token time")):
        met = s["targets_met"][key]
        t.add_row(label, f"{s['ratios'][key]:.2f}", f"<= {TARGET}", "[green]yes[/]" if met else "[red]no[/]")
    console.print(t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-python", help="interpreter with llama-cpp-python (built from source), gguf, numpy")
    p.add_argument("--work", type=Path, default=Path("/tmp/hybrid-vs-llamacpp"))
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp without its repacked CPU layouts")
    p.add_argument("--realtime", action="store_true",
                   help="time decode (and probe) under SCHED_FIFO, ahead of other jobs on a shared machine (root)")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "libdir":
            return child_libdir()
        if kind == "build":
            return child_build(Path(rest[0]), int(rest[1]), int(rest[2]), rest[3], int(rest[4]))
        if kind == "llama":
            return child_llama(Path(rest[0]), int(rest[1]), rest[2] == "1", rest[3] == "1", Path(rest[4]))
        return child_hybrid(Path(rest[0]), Path(rest[1]), int(rest[2]), rest[3] == "1", Path(rest[4]))
    if not args.llama_python:
        p.error("--llama-python is required")
    from rich.console import Console

    from cpu_kernels.bench import machine

    console, t0 = Console(width=None if Console().is_terminal else 170), time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    models = {name: model_paths(args.work, layers, args.experts) for name, layers in MODELS.items()}
    for name, layers in MODELS.items():
        console.log(f"building the {name} model in {args.work} (each part once: cached there)")
        subprocess.run([sys.executable, __file__, "--child", "build", str(args.work), str(layers), str(args.experts),
                        args.llama_python, str(args.threads)], check=True)
    rounds = run_rounds(models, args, console)
    result = {"machine": machine(), "threads": args.threads, "realtime": args.realtime,
              "llama_extra_bufts": not (args.no_extra_bufts or has_amx()),
              "model": {name: describe(paths) for name, paths in models.items()}, "rounds": rounds,
              "summary": summarize(rounds), "seconds": time.perf_counter() - t0}
    report(result, console)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
