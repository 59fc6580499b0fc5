"""`hybrid profile`: where each millisecond of a token goes, the bandwidth view, and a calibrated planner.

The measuring is hybrid.generation.profiling's; this module picks the model and plan, runs the grid of prompt lengths
and batch sizes, and renders: a rich table, JSON, CSV, a PNG (per-token time by component as stacked bars,
decode tokens/s against context length), the routing statistics file and the measured hardware YAML.
"""

import csv
import json
from dataclasses import replace
from pathlib import Path

import yaml
from rich.table import Table

from hybrid.read.checkpoint import Checkpoint
from hybrid.generation.profiling import COMPONENTS, RoutingCounter, calibrated_hardware, full_size_projection, profile_run

CACHE = Path.home() / ".cache" / "hybrid"


def shape_model(shape: str, layers: int, experts: int) -> Path:
    """A K2-width checkpoint with few layers and experts, written once into the cache folder."""
    from hybrid.read.tiny import K2_WIDTHS, TinySpec, make_tiny

    folder = CACHE / f"profile-{shape}-L{layers}-E{experts}"
    if not (folder / "config.json").is_file():
        make_tiny(folder, TinySpec(layers=layers, dense_layers=1, experts=experts, top_k=8, **K2_WIDTHS),
                  overwrite=True)
    return folder


def plan_for(ckpt: Checkpoint, plan_file, hw):
    from placement.plan_file import load_checked_plan
    from placement.planner import PlanRequest, make_plan

    if plan_file:
        return load_checked_plan(plan_file, ckpt.config)
    return make_plan(ckpt.config, str(ckpt.folder), hw, PlanRequest(context_length=min(
        ckpt.config.max_position_embeddings, 8192))).plan


def run_profile(folder, plan_file=None, store=None, prompt_lens=(128,), gen=16, batches=(1,), repeat=3,
                probe_gib=2.0, full_model=None, project_to=None) -> dict:
    """Measure the grid; returns the report dict (see README / docs/performance.md for its keys)."""
    from cpu_kernels.bench import BandwidthProbe
    from cpu_kernels.formats import parse_format
    from hybrid.generation.runtime import open_runtime
    from placement import memory, presets
    from placement.planner import evaluate
    from placement.resolve import resolve_hardware

    ckpt = Checkpoint.open(folder)
    cfg = ckpt.config
    hw = resolve_hardware()
    plan = plan_for(ckpt, plan_file, hw)
    rt = open_runtime(ckpt, plan, store)
    model = rt.model
    fmt = plan.settings.expert_format
    expert_bytes = memory.expert_bytes(cfg, str(parse_format(fmt)))
    counter = RoutingCounter().attach(model)
    runs = [profile_run(model, n, gen, b, repeat, counter, expert_bytes, rt.prefill_chunk)
            for b in batches for n in prompt_lens]
    counter.detach()
    threads = plan.settings.cpu_threads
    probe = BandwidthProbe(int(probe_gib * 2**30)).gbps(threads)
    base = runs[0]
    busy = base["cpu_experts_busy_s"]
    kernel_gbps = base["expert_bytes_per_token"] * base["batch"] / busy / 1e9 if busy else None
    short = replace(plan, settings=replace(plan.settings, context_length=base["prompt_len"] + gen))
    torch_bytes = evaluate(short, cfg, hw).traffic.cpu_weight_bytes
    measured_hw = calibrated_hardware(hw, probe, base, cfg.num_hidden_layers, kernel_gbps, torch_bytes)
    projected = evaluate(short, cfg, measured_hw).projection
    report = {"model": str(folder), "plan": plan_file or "planned for this machine", "runs": runs,
              "routing": counter.to_json(str(folder)),
              "bandwidth": {"expert_bytes_per_token": base["expert_bytes_per_token"], "probe_gbps": probe,
                            "kernel_gbps": kernel_gbps,
                            "kernel_share_of_probe": kernel_gbps / probe if kernel_gbps else None},
              "hardware": measured_hw,
              "projection_vs_measurement": {"decode_projected_tps": projected.decode_tps,
                                            "decode_measured_tps": base["decode_tps"],
                                            "ratio": base["decode_tps"] / projected.decode_tps}}
    if full_model is not None:
        report["full_size"] = full_size_projection(cfg, presets.load(full_model), base) | {"model": full_model}
    if project_to is not None and full_model is not None:
        from placement.planner import PlanRequest, make_plan

        # The target's own bandwidths, with the kernel efficiency measured here.
        target = replace(project_to, cpu_kernel_efficiency=measured_hw.cpu_kernel_efficiency)
        p = make_plan(presets.load(full_model), full_model, target, PlanRequest(context_length=8192)).projection
        report["full_size"]["on_target"] = {"hardware": project_to.source, "decode_tps": p.decode_tps,
                                            "prefill_tps": p.prefill_tps}
    return report


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


def write_outputs(report: dict, json_out=None, csv_out=None, plot_out=None, routing_out=None, hardware_out=None):
    from placement.hardware import hardware_to_dict

    serial = dict(report, hardware=hardware_to_dict(report["hardware"]))
    if json_out:
        Path(json_out).write_text(json.dumps(serial, indent=2))
    if routing_out:
        Path(routing_out).write_text(json.dumps(report["routing"]))
    if hardware_out:
        Path(hardware_out).write_text("# measured by hybrid profile\n" + yaml.safe_dump(serial["hardware"]))
    if csv_out:
        with open(csv_out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["prompt_len", "batch", "ttft_s", "prompt_tps", "decode_tps"] + [f"{c}_ms" for c in COMPONENTS])
            for r in report["runs"]:
                w.writerow([r["prompt_len"], r["batch"], r["ttft_s"], r["prompt_tps"], r["decode_tps"]]
                           + [1e3 * r["components_s"][c] for c in COMPONENTS])
    if plot_out:
        plot(report, plot_out)


def plot(report: dict, path):
    try:
        import matplotlib
    except ImportError:
        from hybrid.errors import HybridError

        raise HybridError("--plot needs matplotlib: pip install 'hybrid[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, (bars, line) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"T={r['prompt_len']} B={r['batch']}" for r in runs]
    bottom = [0.0] * len(runs)
    colors = plt.get_cmap("tab20").colors
    for i, c in enumerate(COMPONENTS):
        ms = [1e3 * r["components_s"][c] for r in runs]
        bars.bar(labels, ms, bottom=bottom, label=c, color=colors[i % len(colors)])
        bottom = [b + m for b, m in zip(bottom, ms)]
    bars.set_ylabel("ms per decode step (B tokens)")
    bars.set_title("where a decode step's time goes")
    bars.legend(fontsize=7)
    for b in sorted({r["batch"] for r in runs}):
        pts = sorted((r["prompt_len"], r["decode_tps"]) for r in runs if r["batch"] == b)
        line.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"batch {b}")
    line.set_xlabel("context length (prompt tokens)")
    line.set_ylabel("decode tokens/s")
    line.set_title("decode speed against context")
    line.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
