"""hybrid profile on a tiny model: components, their sum, the bandwidth view, calibration files, the PNG, its
progress, and every bad flag refused in one line before anything loads."""

import csv
import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from hybrid.cli import cli
from hybrid.profile import Grid, cpu_name, figure, progress_display, run_profile
from hybrid.read.tiny import TinySpec, make_tiny
from hybrid.generation.profiling import COMPONENTS, full_size_projection
from placement.hardware import load_hardware
from placement.planner import load_routing_counts

HYBRID = str(Path(sys.executable).parent / "hybrid")


@pytest.fixture(scope="module")
def steps():
    return []


@pytest.fixture(scope="module")
def report(k2_tiny, steps):
    return run_profile(k2_tiny, Grid((16, 48), (1, 2), gen=6, repeat=2, probe_gib=0.125),
                       progress=lambda what, done, total: steps.append((what, done, total)))


def test_every_component_and_their_sum(report):
    assert len(report["runs"]) == 4
    for run in report["runs"]:
        assert set(run["components_s"]) == set(COMPONENTS)
        parts = sum(run["components_s"].values())
        assert abs(parts - run["token_s"]) / run["token_s"] < 0.05  # the parts account for the whole
        assert run["coverage"] > 0.95
        assert run["components_s"]["attention"] > 0 and run["components_s"]["shared_expert"] > 0
        assert run["decode_tps"] > 0 and run["prompt_tps"] > 0 and run["ttft_s"] > 0
        assert set(run["per_layer_s"]) == {"0", "1", "2"}
        assert "dense_mlp" in run["per_layer_s"]["0"] and "routed_wait" in run["per_layer_s"]["1"]


def test_bandwidth_view(report):
    bw = report["bandwidth"]
    assert bw["probe_gbps"] > 1 and bw["kernel_gbps"] > 0
    assert bw["expert_bytes_per_token"] > 0
    assert report["runs"][0]["cpu_experts_busy_s"] > 0


def test_projection_vs_measurement(report):
    pvm = report["projection_vs_measurement"]
    assert pvm["decode_projected_tps"] > 0 and pvm["ratio"] == pvm["decode_measured_tps"] / pvm["decode_projected_tps"]


def test_full_size_projection_scales_with_layers(k2_tiny, report):
    from hybrid.read.config import load_config

    small = load_config(k2_tiny)
    base = full_size_projection(small, small, report["runs"][0])
    deeper = full_size_projection(small, dataclasses.replace(small, num_hidden_layers=21), report["runs"][0])
    assert 3 < base["decode_tps"] / deeper["decode_tps"] < 12  # 7x the layers


def test_cli_writes_every_file(k2_tiny, tmp_path):
    out = {name: tmp_path / name for name in ("p.json", "p.csv", "p.png", "routing.json", "hw.yaml")}
    r = subprocess.run([HYBRID, "profile", str(k2_tiny), "--prompt-lens", "16", "--gen", "4", "--repeat", "1",
                        "--probe-gib", "0.125", "--json", out["p.json"], "--csv", out["p.csv"], "--plot", out["p.png"],
                        "--routing-stats", out["routing.json"], "--hardware-out", out["hw.yaml"]],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "measured" in r.stderr and "attention" in r.stdout
    # Progress on stderr, a line per step where stderr is no terminal (here, a pipe).
    for step in ("loading weights", "T=16 B=1: warm-up", "T=16 B=1: repeat 1/1", "bandwidth probe (0.125 GiB)"):
        assert f"profile: {step}\n" in r.stderr
    data = json.loads(out["p.json"].read_text())
    assert data["runs"][0]["prompt_len"] == 16
    rows = list(csv.reader(out["p.csv"].open()))
    assert rows[0][:3] == ["prompt_len", "batch", "ttft_s"] and len(rows) == 2
    png = out["p.png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert 600 <= width <= 3000 and 300 <= height <= 2000
    counts = load_routing_counts(out["routing.json"])
    assert sorted(counts) == [1, 2] and all(len(c) == 16 for c in counts.values())
    assert sum(counts[1]) % 4 == 0 and sum(counts[1]) > 0  # top-4: four choices per routed token
    hw = load_hardware(out["hw.yaml"])
    assert hw.ram_bandwidth_gbps > 1 and 0 < hw.cpu_kernel_efficiency <= 1 and hw.layer_overhead_us > 0


def test_progress_follows_each_repeat(steps):
    grid = [(what, done, total) for what, done, total in steps if what != "loading weights"]
    assert grid[0] == ("T=16 B=1: warm-up", 0, 13) and grid[-1] == ("bandwidth probe (0.125 GiB)", 12, 13)
    assert ("T=48 B=2: repeat 2/2", 11, 13) in grid
    assert [done for _, done, _ in grid] == list(range(13))  # 4 points x (warm-up + 2 repeats), then the probe
    loads = [(done, total) for what, done, total in steps if what == "loading weights"]
    assert loads and loads[-1][0] == loads[-1][1]


def test_progress_display_in_a_terminal():
    import io

    from rich.console import Console

    out = io.StringIO()
    with progress_display(Console(file=out, force_terminal=True, width=100)) as progress:
        progress("T=128 B=4: repeat 2/3", 5, 13)
    assert "T=128 B=4: repeat 2/3" in out.getvalue()


def test_plot_names_model_plan_machine_and_starts_at_zero(report):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.container import ErrorbarContainer

    fig = figure(report)
    FigureCanvasAgg(fig).draw()
    text = fig.get_suptitle()
    gpu = report["machine"]["gpu"] or "no GPU"
    assert "k2-tiny" in text and "planned for this machine" in text and "int4" in text
    assert cpu_name() in text and gpu in text
    bars, line = fig.axes
    assert bars.get_ylim()[0] == 0 and line.get_ylim()[0] == 0 and line.get_xlim()[0] == 0
    for ax in (bars, line):  # the spread over repeats, and each legend below its axes, off the bars
        assert any(isinstance(c, ErrorbarContainer) for c in ax.containers)
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0
    top = max(1e3 * r["token_s_max"] for r in report["runs"])
    assert bars.get_ylim()[1] >= top


@pytest.fixture(scope="module")
def width_96(tmp_path_factory):
    """Expert width 96: no multiple of int4's group of 128, which the default plan asks for."""
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "w96", TinySpec(layers=2, experts=8, top_k=2, moe_width=96))


BAD_INPUT = [  # (arguments after `hybrid profile`, the one line printed)
    ("{model} --prompt-lens a,b", "--prompt-lens 'a,b': not a comma-separated list of whole numbers, e.g. 128,512"),
    ("{model} --gen 0", "--gen 0: must be at least 1"),
    ("{model} --batch 0", "--batch 0: every value must be at least 1"),
    ("{model} --batch 1,0", "--batch 1,0: every value must be at least 1"),
    ("{model} --repeat 0", "--repeat 0: must be at least 1"),
    ("{model} --probe-gib 0", "--probe-gib 0: must be at least 0.0625 (a smaller read is served by the CPU's "
                              "caches, not RAM)"),
    ("{model} --plot /nope/x.png", "--plot /nope/x.png: folder /nope does not exist"),
    ("{model} --json {tmp}", "--json {tmp}: is a folder, not a file"),
    ("{model} --csv {tmp}/missing/p.csv", "--csv {tmp}/missing/p.csv: folder {tmp}/missing does not exist"),
    ("{model} --routing-stats {model}/config.json/r.json",
     "--routing-stats {model}/config.json/r.json: {model}/config.json is not a folder"),
    ("{model} --hardware-out /nope/hw.yaml", "--hardware-out /nope/hw.yaml: folder /nope does not exist"),
    ("{model} --prompt-lens 16,600", "--prompt-lens 600 with --gen 16 needs 616 positions; {model} holds 512 "
                                     "(max_position_embeddings)"),
    ("{model} --project-hardware {model}/config.json",
     "--project-hardware projects the full model, so it needs --shape kimi-k2"),
    ("--shape kimi-k2 --layers 1", "--layers 1: a --shape model needs at least 2 (the first is dense)"),
    ("--shape kimi-k2 --experts 4", "--experts 4: a --shape model needs at least 8 (K2's top-k)"),
    ("{w96}", "{w96}: expert width (moe_intermediate_size) 96 is not a multiple of 128, which the default plan's "
              "int4-g128 experts need; plan one that fits: hybrid plan {w96} --experts int4-g32 -o plan.yaml, "
              "then --plan plan.yaml"),
]


@pytest.mark.parametrize("args, line", BAD_INPUT, ids=[a for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_before_loading(args, line, k2_tiny, width_96, tmp_path, monkeypatch):
    import hybrid.generation.runtime
    import hybrid.read.tiny

    def refuse(*a, **k):
        raise AssertionError("loaded or wrote a model before refusing")

    monkeypatch.setattr(hybrid.generation.runtime, "open_runtime", refuse)
    monkeypatch.setattr(hybrid.read.tiny, "make_tiny", refuse)
    names = {"model": k2_tiny, "w96": width_96, "tmp": tmp_path}
    r = CliRunner().invoke(cli, ["profile", *args.format(**names).split()])
    assert r.exit_code == 2, r.output
    assert r.stderr == f"error: {line.format(**names)}\n"


def test_default_plan_takes_the_store_format_and_the_grid(k2_tiny, tmp_path):
    """Without --plan, a given store's format is planned (its experts are quantized already), with cache and
    batch for the grid."""
    from hybrid.profile import plan_for
    from hybrid.read.checkpoint import Checkpoint
    from hybrid.read.convert import convert
    from placement.resolve import resolve_hardware

    convert(k2_tiny, tmp_path / "store", "int8")
    grid = Grid((16, 300), (1, 3), gen=8)
    plan = plan_for(Checkpoint.open(k2_tiny), None, resolve_hardware(), grid, tmp_path / "store")
    assert plan.settings.expert_format == "int8-g128" and plan.settings.batch == 3
    assert plan.settings.context_length >= 308
