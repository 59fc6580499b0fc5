"""hybrid profile on a tiny model: components, their sum, the bandwidth view, calibration files, the PNG."""

import csv
import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hybrid.profile import run_profile
from hybrid.generation.profiling import COMPONENTS, full_size_projection
from placement.hardware import load_hardware
from placement.planner import load_routing_counts

HYBRID = str(Path(sys.executable).parent / "hybrid")


@pytest.fixture(scope="module")
def report(k2_tiny):
    return run_profile(k2_tiny, prompt_lens=(16, 48), gen=6, batches=(1, 2), repeat=2, probe_gib=0.125)


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
