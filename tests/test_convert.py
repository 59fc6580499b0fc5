"""hybrid convert: the expert store against the checkpoint, resuming after a kill, bounded memory, and errors.

Real checkpoints (make_tiny, K2's layout, block-FP8), real files and real child processes (tests/convert_child.py):
a SIGKILL really interrupts a conversion, and peak RSS is the child's own VmHWM.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import routed_experts_reference

from cpu_kernels import MoEExperts, dequantize_matrix, expert_bytes, load_store, parse_format
from cpu_kernels.formats import MATVEC_ERROR_BOUND
from cpu_kernels.store import PROJECTIONS
from hybrid.read import names
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.convert import convert
from hybrid.errors import CheckpointError, ConfigError
from hybrid.read.expert_store import STORE_MANIFEST, layer_dir_name, open_store_layers, verify_store
from hybrid.read.tiny import TinySpec, make_tiny

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).resolve().parent / "convert_child.py"
SMALL = TinySpec(layers=3, experts=8, top_k=2, seed=21)
# Wide enough that one layer's bf16 store is 25 MB (4 MoE layers, 100 MB in all) and converting a layer takes
# ~0.3 s here: the RSS test can tell one layer from all of them, and an outside kill lands mid-way.
WIDE = TinySpec(layers=5, experts=32, top_k=2, hidden=512, moe_width=256, seed=22)
# Peak RSS allowance beyond two layers' stores: one expert's temporaries (3 x 512 x 256 float32 = 1.5 MB,
# a few copies), hashing buffers, allocator slack. The measured excess over one layer is printed by the test.
RSS_CONSTANT_BYTES = 32 << 20
BF16_FORWARD_BOUND = 1e-5  # bf16 holds FP8-dequantized weights exactly: only float32 accumulation order differs
DEADLINE_S = 60.0
POLL_S = 0.005


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "small", SMALL)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "wide", WIDE)


@pytest.fixture(scope="module")
def small_int4(small, tmp_path_factory):
    """An uninterrupted int4 conversion of `small`: the result every resumed run must equal byte for byte."""
    return convert(small, tmp_path_factory.mktemp("store") / "int4", "int4")


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_same_tree(got: Path, want: Path):
    a, b = tree_bytes(got), tree_bytes(want)
    assert sorted(a) == sorted(b), f"{got} and {want} hold different files"
    for name in a:
        assert a[name] == b[name], f"{got / name} differs from {want / name}"


def run_child(*args, timeout=DEADLINE_S) -> int:
    """Run tests/convert_child.py to completion; returns its peak RSS in bytes."""
    r = subprocess.run([sys.executable, str(CHILD), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.split()[-1]) * 1024


def expert_weights(ckpt: Checkpoint, layer: int):
    """gate, up [E, I, H] and down [E, H, I] float32, dequantized by the checkpoint reader."""
    return tuple(torch.stack([ckpt.weight(names.expert_key(layer, e, p), torch.float32)
                              for e in range(ckpt.config.n_routed_experts)]) for p in names.EXPERT_PROJS)


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_store_computes_the_checkpoint_experts(small, tmp_path, fmt):
    out = convert(small, tmp_path / fmt, fmt)
    ckpt = Checkpoint.open(small)
    cfg = ckpt.config
    layers = open_store_layers(out)
    assert sorted(layers) == list(cfg.moe_layers)
    assert verify_store(out) > 0

    gen = torch.Generator().manual_seed(0)
    T, K, E, H = 6, cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.hidden_size
    hidden = torch.randn(T, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights = torch.rand(T, K, generator=gen)
    bound = BF16_FORWARD_BOUND if fmt == "bf16" else MATVEC_ERROR_BOUND[fmt]
    for layer, directory in layers.items():
        experts = MoEExperts.from_store(directory, n_threads=1)
        assert experts.fmt == parse_format(fmt) and (experts.n_experts, experts.hidden) == (E, H)
        got = experts.forward(hidden.numpy(), ids.numpy(), weights.numpy())
        experts.close()
        want = routed_experts_reference(hidden, ids, weights, *expert_weights(ckpt, layer))
        err = float(np.linalg.norm(got - want.numpy()) / np.linalg.norm(want.numpy()))
        assert got.shape == (T, H) and got.dtype == np.float32
        assert err < bound, f"{fmt} layer {layer}: relative error {err:.2e} over bound {bound}"

    manifest = json.loads((out / STORE_MANIFEST).read_text())
    shards = sorted({info.path for info in ckpt.tensors.values()})
    assert manifest["source"]["files"].keys() == {p.name for p in shards}
    assert all(manifest["source"]["files"][p.name]["bytes"] == p.stat().st_size for p in shards)
    assert manifest["format"] == str(parse_format(fmt)) and manifest["group_size"] == parse_format(fmt).group_size
    assert manifest["model"]["hidden_size"] == H and manifest["model"]["moe_layers"] == list(cfg.moe_layers)
    # Non-expert tensors stay in the checkpoint: the store holds layer folders and its manifest only.
    assert sorted(p.name for p in out.iterdir()) == sorted([STORE_MANIFEST] + [layer_dir_name(i) for i in layers])


def test_bf16_store_holds_the_checkpoint_weights_bit_for_bit(small, tmp_path):
    """convert dequantizes FP8 without torch; it must equal Checkpoint.weight's dequantization exactly."""
    out = convert(small, tmp_path / "bf16", "bf16")
    ckpt = Checkpoint.open(small)
    H, I = ckpt.config.hidden_size, ckpt.config.moe_intermediate_size
    for layer, directory in open_store_layers(out).items():
        store = load_store(directory)
        for proj, want in zip(PROJECTIONS, expert_weights(ckpt, layer)):
            n_out, n_in = (H, I) if proj == "down_proj" else (I, H)
            for e in range(ckpt.config.n_routed_experts):
                got = dequantize_matrix(store.values[proj][e], store.scales[proj][e], store.fmt, n_out, n_in)
                assert np.array_equal(got, want[e].numpy()), f"layer {layer} expert {e} {proj}"


def test_progress_reports_checkpoint_bytes_after_each_expert(small, tmp_path):
    calls = []
    convert(small, tmp_path / "s", "int8", progress=lambda done, total: calls.append((done, total)))
    cfg = Checkpoint.open(small).config
    assert len(calls) == 1 + len(cfg.moe_layers) * cfg.n_routed_experts
    assert calls[0][0] == 0 and calls[-1][0] == calls[-1][1] and len({t for _, t in calls}) == 1
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    resumed = []
    convert(small, tmp_path / "s", "int8", progress=lambda done, total: resumed.append((done, total)))
    assert resumed == [calls[-1]], "a finished store reports itself done and converts nothing"


def test_killed_mid_layer_resumes_to_identical_files(small, small_int4, tmp_path):
    out = tmp_path / "resumed"
    cfg = Checkpoint.open(small).config
    one_layer = cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size  # FP8 bytes, scales aside
    kill_at = one_layer + one_layer // 2  # halfway through the second MoE layer
    r = subprocess.run([sys.executable, str(CHILD), small, out, "int4", "--kill-at-bytes", str(kill_at)],
                       cwd=ROOT, capture_output=True, text=True, timeout=DEADLINE_S)
    assert r.returncode == -signal.SIGKILL, r.stderr
    second = out / layer_dir_name(cfg.moe_layers[1])
    assert any(p.name.endswith(".tmp") for p in second.iterdir()), "the kill should leave a half-written layer"
    assert not (second / "manifest.json").exists()
    with pytest.raises(CheckpointError, match=r"incomplete store: MoE layers \[2\]"):
        open_store_layers(out)
    convert(small, out, "int4")
    assert_same_tree(out, small_int4)


def test_killed_from_outside_resumes_to_identical_files(wide, tmp_path):
    want = convert(wide, tmp_path / "uninterrupted", "bf16")
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, str(CHILD), wide, out, "bf16"], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / layer_dir_name(1) / "manifest.json"
    deadline = time.monotonic() + DEADLINE_S
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(POLL_S)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=DEADLINE_S) == -signal.SIGKILL, child.stderr.read()
    child.stderr.close()
    with pytest.raises(CheckpointError, match="incomplete store"):
        open_store_layers(out)
    convert(wide, out, "bf16")
    assert_same_tree(out, want)


def _drop_record(out: Path, layer: int):
    manifest = json.loads((out / STORE_MANIFEST).read_text())
    del manifest["layers"][str(layer)]
    (out / STORE_MANIFEST).write_text(json.dumps(manifest))


def _plant_tmp_files(out: Path, layer: int):
    d = out / layer_dir_name(layer)
    for p in d.iterdir():
        p.unlink()
    (d / "gate_proj.values.npy.tmp").write_bytes(b"\0" * 1000)
    (d / "up_proj.values.npy").write_bytes(b"half")
    _drop_record(out, layer)


def _truncate_recorded_file(out: Path, layer: int):
    with open(out / layer_dir_name(layer) / "down_proj.values.npy", "r+b") as f:
        f.truncate(100)


def _unrecorded_complete_layer(out: Path, layer: int):
    # Killed after the layer store closed but before hybrid_store.json recorded it: still redone.
    with open(out / layer_dir_name(layer) / "up_proj.scales.npy", "r+b") as f:
        f.seek(200)
        f.write(b"\x7f")
    _drop_record(out, layer)


@pytest.mark.parametrize("damage", [_plant_tmp_files, _truncate_recorded_file, _unrecorded_complete_layer])
def test_untrusted_layer_is_redone(small, small_int4, tmp_path, damage):
    out = tmp_path / "damaged"
    convert(small, out, "int4")
    damage(out, 2)
    convert(small, out, "int4")
    assert_same_tree(out, small_int4)


def test_peak_rss_below_two_layers(wide, tmp_path):
    cfg = Checkpoint.open(wide).config
    layer_bytes = cfg.n_routed_experts * expert_bytes(parse_format("bf16"), cfg.hidden_size, cfg.moe_intermediate_size)
    baseline = run_child(wide, tmp_path / "unused", "bf16", "--baseline")
    peak = run_child(wide, tmp_path / "store", "bf16")
    store_bytes = sum(p.stat().st_size for p in (tmp_path / "store").rglob("*.npy"))
    excess = peak - baseline
    print(f"\nconvert peak RSS {peak / 2**20:.1f} MiB, import+open baseline {baseline / 2**20:.1f} MiB, "
          f"excess {excess / 2**20:.1f} MiB; one layer's store {layer_bytes / 2**20:.1f} MiB, "
          f"whole store {store_bytes / 2**20:.1f} MiB")
    assert store_bytes >= len(cfg.moe_layers) * layer_bytes
    assert excess < 2 * layer_bytes + RSS_CONSTANT_BYTES


def test_folder_of_another_conversion_is_refused(small, small_int4, tmp_path):
    with pytest.raises(ConfigError, match=r"hybrid_store.json: .*format: store has 'int4-g128', this conversion 'int8"):
        convert(small, small_int4, "int8")
    other = make_tiny(tmp_path / "other", TinySpec(layers=3, experts=8, top_k=2, seed=SMALL.seed + 1))
    with pytest.raises(ConfigError, match=r"source file model-00004-of-000004.safetensors: content"):
        convert(other, small_int4, "int4")
    bigger = make_tiny(tmp_path / "bigger", TinySpec(layers=3, experts=16, top_k=2, seed=SMALL.seed))
    with pytest.raises(ConfigError, match="model n_routed_experts: store has 8, checkpoint has 16"):
        convert(bigger, small_int4, "int4")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no hybrid_store.json"):
        convert(small, foreign, "int4")
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="expert format 'int5'"):
        convert(small, tmp_path / "x", "int5")
    with pytest.raises(CheckpointError, match="hybrid_store.json: not found"):
        open_store_layers(foreign)
    with pytest.raises(CheckpointError, match=r"not converted from .*other \(source file .*: content"):
        open_store_layers(small_int4, Checkpoint.open(other))
    assert sorted(open_store_layers(small_int4, Checkpoint.open(small))) == [1, 2]
    killed_at_first_write = tmp_path / "killed_early"
    killed_at_first_write.mkdir()
    (killed_at_first_write / (STORE_MANIFEST + ".tmp")).write_text('{"trunc')
    convert(small, killed_at_first_write, "int4")
    assert_same_tree(killed_at_first_write, small_int4)


def test_verify_store_names_a_flipped_byte(small, tmp_path):
    out = convert(small, tmp_path / "s", "int8")
    verify_store(out)
    victim = out / layer_dir_name(2) / "gate_proj.values.npy"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    open_store_layers(out)  # sizes still match: the cheap check cannot see it
    with pytest.raises(CheckpointError, match=f"{victim}: sha256 differs"):
        verify_store(out)
    os.truncate(victim, 10)
    with pytest.raises(CheckpointError, match=f"{victim}: 10 bytes, .*records"):
        open_store_layers(out)


# ---- a manifest may only name the store's own files ------------------------------------------------------------
# Each damage leaves a store today's unchecked reader accepted: the files named outside are real copies.


def _edit_layer(out: Path, layer: int, change):
    manifest = json.loads((out / STORE_MANIFEST).read_text())
    change(manifest["layers"][str(layer)])
    (out / STORE_MANIFEST).write_text(json.dumps(manifest))


def _dir_elsewhere(out: Path, layer: int) -> str:
    shutil.copytree(out / layer_dir_name(layer), out.parent / "elsewhere")
    _edit_layer(out, layer, lambda entry: entry.__setitem__("dir", "../elsewhere"))
    return f"layer {layer} names dir '../elsewhere'; expected '{layer_dir_name(layer)}'"


def _file_outside(out: Path, layer: int) -> str:
    shutil.copy(out / layer_dir_name(layer) / "gate_proj.values.npy", out.parent / "x")
    _edit_layer(out, layer, lambda entry: entry["files"].__setitem__("../../x", entry["files"]["gate_proj.values.npy"]))
    return f"layer {layer} names file '../../x'; expected a plain file name"


def _file_symlinked_outside(out: Path, layer: int) -> str:
    name = f"{layer_dir_name(layer)}/gate_proj.values.npy"
    target = out.parent / "outside.npy"
    (out / name).rename(target)
    (out / name).symlink_to(target)
    return f"layer {layer} names '{name}', which resolves to {target}, outside the store folder"


@pytest.mark.parametrize("damage", [_dir_elsewhere, _file_outside, _file_symlinked_outside])
def test_manifest_naming_files_outside_the_store_is_refused(small, tmp_path, damage):
    out = convert(small, tmp_path / "s", "int8")
    want = f"{out / STORE_MANIFEST}: {damage(out, 2)}"
    before = tree_bytes(tmp_path)
    for read in (open_store_layers, verify_store, lambda folder: convert(small, folder, "int8")):
        with pytest.raises(CheckpointError) as e:
            read(out)
        assert str(e.value) == want
    assert tree_bytes(tmp_path) == before, "a refused store is left as it was, and so is what it named"
