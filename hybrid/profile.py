"""`hybrid profile`: where each millisecond of a token goes, the bandwidth view, and a calibrated planner.

The measuring is hybrid.generation.profiling's; this module checks what was asked (the grid, the output files,
the plan against the model) before anything loads, picks the model and plan, runs the grid of prompt lengths
and batch sizes, and renders: a rich table, JSON, CSV, a PNG (per-token time by component as stacked bars,
decode tokens/s against context length, both with the spread over repeats), the routing statistics file and
the measured hardware YAML. Nothing here prints: progress goes to the callback the front end passes.
"""

import csv
import json
import os
import platform
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path

import yaml
from rich.table import Table

from hybrid.errors import ConfigError
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.open import open_checkpoint
from hybrid.generation.profiling import COMPONENTS, RoutingCounter, calibrated_hardware, full_size_projection, profile_run

CACHE = Path.home() / ".cache" / "hybrid"
MIN_CONTEXT = 8192  # the default plan reserves at least this much cache, whatever the grid needs
MIN_PROBE_GIB = 1 / 16  # a smaller read is served by the CPU's caches and measures them, not RAM
SHAPE_TOP_K = 8  # K2 routes each token to 8 experts, so a --shape model needs at least that many
OUTPUT_FLAGS = {"json_out": "--json", "csv_out": "--csv", "plot_out": "--plot", "routing_out": "--routing-stats",
                "hardware_out": "--hardware-out"}


@dataclass(frozen=True)
class Grid:
    """What one profile measures: each prompt length at each batch size, `gen` decoded tokens, `repeat` times
    after a warm-up; and how many GiB the bandwidth probe reads. Raises ConfigError naming the flag."""

    prompt_lens: tuple[int, ...] = (128,)
    batches: tuple[int, ...] = (1,)
    gen: int = 16
    repeat: int = 3
    probe_gib: float = 2.0

    def __post_init__(self):
        for flag, values in (("--prompt-lens", self.prompt_lens), ("--batch", self.batches)):
            if not values or min(values) < 1:
                raise ConfigError(f"{flag} {','.join(map(str, values))}: every value must be at least 1")
        for flag, value in (("--gen", self.gen), ("--repeat", self.repeat)):
            if value < 1:
                raise ConfigError(f"{flag} {value}: must be at least 1")
        if not self.probe_gib >= MIN_PROBE_GIB:  # `not >=` refuses NaN too
            raise ConfigError(f"--probe-gib {self.probe_gib:g}: must be at least {MIN_PROBE_GIB:g} (a smaller read "
                              "is served by the CPU's caches, not RAM)")

    @classmethod
    def parse(cls, prompt_lens: str, batches: str, **numbers) -> "Grid":
        """From the command line's comma-separated lists."""
        return cls(_counts(prompt_lens, "--prompt-lens"), _counts(batches, "--batch"), **numbers)

    @property
    def points(self) -> list[tuple[int, int]]:
        """(prompt length, batch) in the order they run: every length at the first batch size, then the next."""
        return [(n, b) for b in self.batches for n in self.prompt_lens]

    @property
    def steps(self) -> int:
        """Progress steps: a warm-up and the repeats at each point, then the bandwidth probe."""
        return len(self.points) * (self.repeat + 1) + 1

    @property
    def positions(self) -> int:
        """Cache positions the longest run needs."""
        return max(self.prompt_lens) + self.gen


def _counts(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a comma-separated list of whole numbers, e.g. 128,512") from None


@dataclass(frozen=True)
class Outputs:
    """The files a profile writes (None: not wanted)."""

    json_out: str | None = None
    csv_out: str | None = None
    plot_out: str | None = None
    routing_out: str | None = None
    hardware_out: str | None = None

    def check(self) -> None:
        """Raise ConfigError unless every file can be written: before the profile runs, not after it."""
        for key, flag in OUTPUT_FLAGS.items():
            if getattr(self, key) is None:
                continue
            path = Path(getattr(self, key))
            folder = path.parent
            if path.is_dir():
                raise ConfigError(f"{flag} {path}: is a folder, not a file")
            if not folder.is_dir():
                why = f"{folder} is not a folder" if folder.exists() else f"folder {folder} does not exist"
                raise ConfigError(f"{flag} {path}: {why}")
            if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise ConfigError(f"{flag} {path}: not writable")
        if self.plot_out is not None and find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib: pip install 'hybrid[plot]'")


def shape_model(shape: str, layers: int, experts: int, progress=None) -> Path:
    """A K2-width checkpoint with few layers and experts, written once into the cache folder."""
    from hybrid.read.tiny import K2_WIDTHS, TinySpec, make_tiny

    if layers < 2:
        raise ConfigError(f"--layers {layers}: a --shape model needs at least 2 (the first is dense)")
    if experts < SHAPE_TOP_K:
        raise ConfigError(f"--experts {experts}: a --shape model needs at least {SHAPE_TOP_K} (K2's top-k)")
    folder = CACHE / f"profile-{shape}-L{layers}-E{experts}"
    if not (folder / "config.json").is_file():
        (progress or _silent)(f"writing a {shape}-width model to {folder}", 0, None)
        make_tiny(folder, TinySpec(layers=layers, dense_layers=1, experts=experts, top_k=SHAPE_TOP_K, **K2_WIDTHS),
                  overwrite=True)
    return folder


def plan_for(ckpt: Checkpoint, plan_file, hw, grid: Grid, store=None):
    """The plan to profile: the file's, or the planner's for this machine with cache for the grid's longest
    run (in the store's format when a store is given: its experts are quantized already). Checked against the
    model and the grid here, before any weight is read."""
    from placement.memory import GGUF, check_expert_format
    from placement.plan_file import load_checked_plan, load_plan
    from hybrid.generation.runtime import plan_for_this_machine
    from placement.planner import PlanRequest

    cfg, need = ckpt.config, grid.positions
    asked = f"--prompt-lens {max(grid.prompt_lens)} with --gen {grid.gen} needs {need} positions"
    if need > cfg.max_position_embeddings:
        raise ConfigError(f"{asked}; {ckpt.folder} holds {cfg.max_position_embeddings} (max_position_embeddings)")
    if plan_file:
        check_expert_format(cfg, load_plan(plan_file).settings.expert_format, f"plan {plan_file}", ckpt.folder)
        plan = load_checked_plan(plan_file, cfg)
        if need > plan.settings.context_length:
            raise ConfigError(f"{asked}; plan {plan_file} reserves {plan.settings.context_length} (context_length)")
        return plan
    request = PlanRequest(context_length=min(cfg.max_position_embeddings, max(MIN_CONTEXT, need)),
                          batch=max(grid.batches))
    if store is None:  # the default plan's format, refused with the one that fits named (as `hybrid plan` does)
        check_expert_format(cfg, GGUF if cfg.gguf else "int4", "the default plan", ckpt.folder)
    return plan_for_this_machine(ckpt, store, request, hw).plan


def run_profile(folder, grid: Grid = Grid(), plan_file=None, store=None, full_model=None, project_to=None,
                progress=None, threads: int | None = None) -> dict:
    """Measure the grid; returns the report dict (see README / docs/performance.md for its keys). Every check
    runs before a weight is read. progress(what, done, total) follows the load and each warm-up and repeat;
    total is None while unknown. `threads`: the run's CPU thread budget (open_runtime; None: the plan's)."""
    from hybrid.generation.runtime import open_runtime
    from placement.resolve import resolve_hardware

    progress = progress or _silent
    ckpt = open_checkpoint(folder)
    hw = resolve_hardware()
    plan = plan_for(ckpt, plan_file, hw, grid, store)
    rt = open_runtime(ckpt, plan, store, progress=lambda done, total: progress("loading weights", done, total),
                      threads=threads)
    plan = rt.plan  # with the budget's threads
    runs, counter = measure(rt, plan, grid, progress)
    report = calibrate(ckpt.config, plan, hw, runs, grid, progress)
    report |= {"model": str(folder), "plan": plan_file or "planned for this machine",
               "routing": counter.to_json(str(folder)),
               "plan_summary": f"{plan.settings.expert_format} experts, {plan.settings.cpu_threads} CPU threads",
               "machine": {"cpu": cpu_name(), "cores": hw.cores, "gpu": hw.gpu.name if hw.gpu else None}}
    if full_model is not None:
        report["full_size"] = project_full_size(ckpt.config, full_model, report, project_to)
    return report


def measure(rt, plan, grid: Grid, progress) -> tuple[list, RoutingCounter]:
    """profile_run at each grid point, and the routing they counted."""
    from cpu_kernels.formats import parse_format
    from placement import memory

    fmt = plan.settings.expert_format
    expert_bytes = memory.expert_bytes(rt.model.config, fmt if fmt == memory.GGUF else str(parse_format(fmt)))
    counter = RoutingCounter().attach(rt.model)
    runs = []
    for i, (n, b) in enumerate(grid.points):
        def step(k, what, first=i * (grid.repeat + 1), n=n, b=b):
            progress(f"T={n} B={b}: {what}", first + k, grid.steps)
        runs.append(profile_run(rt.model, n, grid.gen, b, grid.repeat, counter, expert_bytes, rt.prefill_chunk, step))
    counter.detach()
    return runs, counter


def calibrate(cfg, plan, hw, runs, grid, progress) -> dict:
    """The bandwidth view and the measured hardware, from a probe of this run and the first grid point."""
    from cpu_kernels.bench import BandwidthProbe
    from placement.planner import evaluate

    progress(f"bandwidth probe ({grid.probe_gib:g} GiB)", grid.steps - 1, grid.steps)
    probe = BandwidthProbe(int(grid.probe_gib * 2**30)).gbps(plan.settings.cpu_threads)
    base = runs[0]
    busy = base["cpu_experts_busy_s"]
    kernel_gbps = base["expert_bytes_per_token"] * base["batch"] / busy / 1e9 if busy else None
    short = replace(plan, settings=replace(plan.settings, context_length=base["prompt_len"] + grid.gen,
                                           batch=base["batch"]))
    torch_bytes = evaluate(short, cfg, hw).traffic.cpu_weight_bytes
    measured_hw = calibrated_hardware(hw, probe, base, cfg.num_hidden_layers, kernel_gbps, torch_bytes)
    projected = evaluate(short, cfg, measured_hw).projection
    return {"runs": runs,
            "bandwidth": {"expert_bytes_per_token": base["expert_bytes_per_token"], "probe_gbps": probe,
                          "kernel_gbps": kernel_gbps,
                          "kernel_share_of_probe": kernel_gbps / probe if kernel_gbps else None},
            "hardware": measured_hw,
            "projection_vs_measurement": {"decode_projected_tps": projected.decode_tps,
                                          "decode_measured_tps": base["decode_tps"],
                                          "ratio": base["decode_tps"] / projected.decode_tps}}


def project_full_size(cfg, full_model: str, report: dict, project_to=None) -> dict:
    """The full model's speed from this run's per-layer costs, here and (project_to) on another machine."""
    from placement import presets
    from placement.planner import PlanRequest, make_plan

    out = full_size_projection(cfg, presets.load(full_model), report["runs"][0]) | {"model": full_model}
    if project_to is not None:
        # The target's own bandwidths, with the kernel efficiency measured here.
        target = replace(project_to, cpu_kernel_efficiency=report["hardware"].cpu_kernel_efficiency)
        p = make_plan(presets.load(full_model), full_model, target, PlanRequest(context_length=8192)).projection
        out["on_target"] = {"hardware": project_to.source, "decode_tps": p.decode_tps, "prefill_tps": p.prefill_tps}
    return out


def cpu_name() -> str:
    """The CPU's model name, for the plot's title."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _silent(what, done, total):
    pass


@contextmanager
def progress_display(console):
    """A progress(what, done, total) callback for run_profile that renders on `console`: a live bar in a
    terminal; elsewhere (a log, CI) one line per new step, since a bar there would show only its end."""
    if not console.is_terminal:
        shown = []

        def line(what, done, total):
            if not shown or shown[-1] != what:
                shown.append(what)
                console.print(f"profile: {what}", markup=False, highlight=False)
        yield line
        return
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TimeElapsedColumn

    with Progress("{task.description}", BarColumn(), TaskProgressColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("profile", total=None)
        yield lambda what, done, total: bar.update(task, description=what, completed=done, total=total)


def summary(report: dict) -> list[str]:
    pvm, bw = report["projection_vs_measurement"], report["bandwidth"]
    lines = [f"decode: planner projected {pvm['decode_projected_tps']:.2f} tok/s, measured "
             f"{pvm['decode_measured_tps']:.2f} (measured/projected {pvm['ratio']:.2f})",
             f"expert bytes per decoded token {bw['expert_bytes_per_token'] / 1e6:.2f} MB, kernels "
             f"{bw['kernel_gbps'] or 0:.1f} GB/s of {bw['probe_gbps']:.1f} GB/s probed"]
    if "full_size" in report:
        f = report["full_size"]
        lines.append(f"{f['model']} ({f['layers']} layers) projected here: decode {f['decode_tps']:.2f} tok/s, "
                     f"prefill {f['prefill_tps']:.1f} tok/s")
        if "on_target" in f:
            t = f["on_target"]
            lines.append(f"on {t['hardware']}: decode {t['decode_tps']:.2f} tok/s, prefill {t['prefill_tps']:.1f} tok/s")
    return lines


def write_outputs(report: dict, outputs: Outputs):
    from placement.hardware import hardware_to_dict

    serial = dict(report, hardware=hardware_to_dict(report["hardware"]))
    if outputs.json_out:
        Path(outputs.json_out).write_text(json.dumps(serial, indent=2))
    if outputs.routing_out:
        Path(outputs.routing_out).write_text(json.dumps(report["routing"]))
    if outputs.hardware_out:
        Path(outputs.hardware_out).write_text("# measured by hybrid profile\n" + yaml.safe_dump(serial["hardware"]))
    if outputs.csv_out:
        with open(outputs.csv_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt_len", "batch", "ttft_s", "prompt_tps", "decode_tps"] + [f"{c}_ms" for c in COMPONENTS])
            for r in report["runs"]:
                w.writerow([r["prompt_len"], r["batch"], r["ttft_s"], r["prompt_tps"], r["decode_tps"]]
                           + [1e3 * r["components_s"][c] for c in COMPONENTS])
    if outputs.plot_out:
        figure(report).savefig(outputs.plot_out, dpi=100)


def title(report: dict) -> str:
    """Model and plan, then the machine: what a figure needs to be read away from the run that made it."""
    m = report["machine"]
    plan = report["plan"] if report["plan"] == "planned for this machine" else Path(report["plan"]).name
    return (f"hybrid profile: {Path(report['model']).name}, plan: {plan} ({report['plan_summary']})\n"
            f"{m['cpu']} ({m['cores']} cores), {m['gpu'] or 'no GPU'}")


def figure(report: dict):
    """The PNG's matplotlib Figure: a decode step's time by component as stacked bars (the fastest repeat's
    breakdown, a whisker up to the slowest repeat), and decode tokens/s against context with each point's
    range over repeats. Both axes start at zero, so a small difference looks small; legends sit below the axes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure  # the object API: no pyplot state, no backend to choose

    runs = report["runs"]
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    bars, line = fig.subplots(1, 2, width_ratios=(1.4, 1))
    fig.suptitle(title(report), fontsize=11)
    x = range(len(runs))
    bottom = [0.0] * len(runs)
    pairs = colormaps["tab20"].colors
    colors = pairs[0::2] + pairs[1::2]  # the ten strong colours first: neighbouring parts stay apart
    for i, c in enumerate(COMPONENTS):
        ms = [1e3 * r["components_s"][c] for r in runs]
        if any(ms):  # a component that took no time would only crowd the legend
            bars.bar(x, ms, bottom=bottom, label=c, color=colors[i % len(colors)], width=0.6)
            bottom = [b + m for b, m in zip(bottom, ms)]
    low = [max(0.0, b - 1e3 * r["token_s"]) for b, r in zip(bottom, runs)]
    high = [max(0.0, 1e3 * r["token_s_max"] - b) for b, r in zip(bottom, runs)]
    n = runs[0]["repeat"]
    if n > 1:
        bars.errorbar(x, bottom, yerr=[low, high], fmt="none", ecolor="black", capsize=5,
                      label=f"slowest of {n} repeats")
    bars.set_xticks(list(x), [f"T={r['prompt_len']} B={r['batch']}" for r in runs])
    bars.set_xlim(-0.75, len(runs) - 0.25)  # a lone bar stays a bar, not a wall
    bars.set_ylim(0, 1.08 * max(b + h for b, h in zip(bottom, high)))
    bars.set_ylabel("ms per decode step (B tokens)")
    bars.set_title("where a decode step's time goes", fontsize=10)
    bars.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4, fontsize=8, frameon=False)
    spread = f" (median, min-max of {n})" if n > 1 else ""
    for b in sorted({r["batch"] for r in runs}):
        pts = sorted((r["prompt_len"], r["decode_tps"], r["decode_tps_min"], r["decode_tps_max"])
                     for r in runs if r["batch"] == b)
        line.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts],
                      [p[3] - p[1] for p in pts]], marker="o", capsize=5, label=f"batch {b}{spread}")
    line.set_xlim(0, 1.08 * max(r["prompt_len"] for r in runs))
    line.set_ylim(0, 1.15 * max(r["decode_tps_max"] for r in runs))
    line.set_xlabel("context length (prompt tokens)")
    line.set_ylabel("decode tokens/s")
    line.set_title("decode speed against context", fontsize=10)
    line.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    return fig


def table(report: dict) -> Table:
    t = Table(title=f"hybrid profile: {report['model']}")
    t.add_column("component")
    for r in report["runs"]:
        t.add_column(f"T={r['prompt_len']} B={r['batch']}\nms/token", justify="right")
    for c in COMPONENTS:
        t.add_row(c, *[f"{1e3 * r['components_s'][c]:.2f}" for r in report["runs"]])
    rows = (("decode tok/s", "decode_tps", "{:.2f}"), ("prompt tok/s", "prompt_tps", "{:.1f}"),
            ("time to first token s", "ttft_s", "{:.3f}"), ("components / wall clock", "coverage", "{:.1%}"))
    for label, key, f in rows:
        t.add_row(label, *[f.format(r[key]) for r in report["runs"]], style="bold")
    return t
