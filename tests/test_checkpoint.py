"""The checkpoint reader: lazy listing, and one clear error per kind of damaged checkpoint."""

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import K2_FILES
from hybrid.read import names
from hybrid.read.checkpoint import Checkpoint, read_header
from hybrid.read.config import load_config
from hybrid.errors import CheckpointError
from hybrid.read.fp8 import scale_shape
from hybrid.run.loader import load_model

SHARD2 = "model-00002-of-000004.safetensors"  # layer 0 (dense) of the tiny K2
SHARD3 = "model-00003-of-000004.safetensors"  # layer 1 (MoE)


def rewrite_shard(folder, shard, change):
    """Apply change(tensors) to one shard and keep the index in step with what the shard holds."""
    tensors = load_file(str(folder / shard))
    change(tensors)
    save_file(tensors, str(folder / shard), metadata={"format": "pt"})
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update({k: shard for k in tensors})
    index_path.write_text(json.dumps(index))


def error_of(folder) -> str:
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_tiny_checkpoint_opens_with_k2_layout(k2_tiny):
    ckpt = Checkpoint.open(k2_tiny)
    assert len({i.path for i in ckpt.tensors.values()}) == 4  # embeddings, then one shard per layer
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    assert ckpt.tensors[name].dtype == "F8_E4M3" and ckpt.tensors[name].shape == (192, 256)
    assert ckpt.tensors[names.scale_name(name)].shape == (2, 2)  # 192 rows: one full block, one ragged
    assert ckpt.tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"
    assert ckpt.tensors["model.layers.1.mlp.gate.weight"].dtype == "BF16"
    assert "model.layers.2.mlp.experts.15.down_proj.weight" in ckpt.tensors


def k2_sized_sparse_checkpoint(folder):
    """K2-0905's real config with every tensor it implies, in 62 shards whose data are holes in sparse files:
    ~1 TB apparent size, a few MB on disk. Only a reader that reads headers alone can open it quickly."""
    cfg = load_config(K2_FILES / "config_0905.reconstructed.json")
    (folder / "config.json").write_text((K2_FILES / "config_0905.reconstructed.json").read_text())
    shards = [{} for _ in range(62)]
    for name, shape in names.expected_tensors(cfg).items():
        layer = names.layer_of(name)
        shard = shards[0 if layer is None else layer + 1]
        if names.quantizable(name):
            shard[name] = ("F8_E4M3", shape)
            shard[names.scale_name(name)] = ("F32", scale_shape(shape, cfg.fp8_block))
        else:
            shard[name] = ("F32" if name.endswith("bias") else "BF16", shape)
    weight_map, apparent = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-000062.safetensors"
        header, offset = {}, 0
        for name, (dtype, shape) in tensors.items():
            n = {"F8_E4M3": 1, "BF16": 2, "F32": 4}[dtype] * torch.Size(shape).numel()
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        blob = json.dumps(header).encode()
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(blob)) + blob)
            f.truncate(8 + len(blob) + offset)
        apparent += 8 + len(blob) + offset
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return apparent


def test_listing_a_1tb_k2_checkpoint_reads_headers_only(tmp_path):
    apparent = k2_sized_sparse_checkpoint(tmp_path)
    assert apparent > 0.95e12
    ckpt = Checkpoint.open(tmp_path)  # validates all ~140k tensors against config.json
    assert ckpt.total_bytes() > 0.95e12
    routed = sum(i.nbytes for n, i in ckpt.tensors.items() if ".experts." in n)
    assert 0.97 < routed / ckpt.total_bytes() < 0.995  # routed experts are ~98.6 % of K2's bytes
    on_disk = sum(f.stat().st_blocks * 512 for f in tmp_path.iterdir())
    assert on_disk < 200e6  # the data were never written, and opening needed none of them


def test_fp8_weights_dequantize_like_their_reference(k2_tiny):
    from oracle import reference_fp8_to_bf16

    ckpt = Checkpoint.open(k2_tiny)
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"
    want = reference_fp8_to_bf16(ckpt.raw(name), ckpt.raw(names.scale_name(name))).float()
    assert torch.equal(ckpt.weight(name), want)


def test_missing_shard(k2_copy):
    (k2_copy / SHARD2).unlink()
    msg = error_of(k2_copy)
    assert SHARD2 in msg and "missing" in msg


def test_tensor_named_by_index_but_absent_from_shard(k2_copy):
    index_path = k2_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.layers.0.mlp.up_proj.weight"
    index["weight_map"][name] = SHARD3
    index_path.write_text(json.dumps(index))
    msg = error_of(k2_copy)
    assert name in msg and SHARD3 in msg and "not in this shard" in msg


def test_truncated_shard(k2_copy):
    path = k2_copy / SHARD3
    path.write_bytes(path.read_bytes()[:-1000])
    msg = error_of(k2_copy)
    assert SHARD3 in msg and "truncated" in msg and "model.layers.1." in msg


def test_corrupt_header(k2_copy):
    path = k2_copy / SHARD3
    data = bytearray(path.read_bytes())
    data[8:20] = b"%%%%garbage%"
    path.write_bytes(bytes(data))
    msg = error_of(k2_copy)
    assert SHARD3 in msg and "corrupt" in msg


def test_header_length_beyond_file(k2_copy):
    path = k2_copy / SHARD3
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**9) + data[8:])
    assert SHARD3 in error_of(k2_copy)


def test_shape_disagreeing_with_config(k2_copy):
    name = "model.layers.0.input_layernorm.weight"
    rewrite_shard(k2_copy, SHARD2, lambda t: t.__setitem__(name, torch.ones(255, dtype=torch.bfloat16)))
    msg = error_of(k2_copy)
    assert SHARD2 in msg and name in msg and "[255]" in msg and "[256]" in msg


def test_dtype_disagreeing_with_config(k2_copy):
    name = "model.layers.0.input_layernorm.weight"
    rewrite_shard(k2_copy, SHARD2, lambda t: t.__setitem__(name, torch.ones(256, dtype=torch.int32)))
    msg = error_of(k2_copy)
    assert name in msg and "I32" in msg


def test_missing_fp8_scale(k2_copy):
    name = "model.layers.1.self_attn.o_proj.weight_scale_inv"
    rewrite_shard(k2_copy, SHARD3, lambda t: t.pop(name))
    msg = error_of(k2_copy)
    assert name in msg and "missing" in msg


def test_wrong_fp8_scale_shape(k2_copy):
    name = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    rewrite_shard(k2_copy, SHARD3, lambda t: t.__setitem__(name, torch.ones(1, 2)))
    msg = error_of(k2_copy)
    assert name in msg and "[2, 2]" in msg


def test_config_promising_more_experts_than_the_shards_hold(k2_copy):
    raw = json.loads((k2_copy / "config.json").read_text())
    raw["n_routed_experts"] = 32
    (k2_copy / "config.json").write_text(json.dumps(raw))
    msg = error_of(k2_copy)
    assert "model.layers.1.mlp.gate.weight" in msg and "[16, 256]" in msg and "[32, 256]" in msg


def test_missing_expert_tensor(k2_copy):
    name = "model.layers.1.mlp.experts.7.up_proj.weight"
    rewrite_shard(k2_copy, SHARD3, lambda t: (t.pop(name), t.pop(names.scale_name(name))))
    msg = error_of(k2_copy)
    assert name in msg and "missing" in msg


def test_tensor_the_config_does_not_know(k2_copy):
    name = "model.layers.1.mlp.experts.16.up_proj.weight"
    rewrite_shard(k2_copy, SHARD3, lambda t: t.__setitem__(name, torch.zeros(128, 256, dtype=torch.bfloat16)))
    msg = error_of(k2_copy)
    assert name in msg and SHARD3 in msg and "not part of the model" in msg


def test_mtp_layers_past_the_last_are_ignored(k2_copy):
    name = "model.layers.3.eh_proj.weight"  # DeepSeek-V3 ships its multi-token-prediction layer as layer 61
    rewrite_shard(k2_copy, SHARD3, lambda t: t.__setitem__(name, torch.zeros(4, 4, dtype=torch.bfloat16)))
    assert name in Checkpoint.open(k2_copy).tensors


def test_fp8_tensors_without_quantization_config(k2_copy):
    raw = json.loads((k2_copy / "config.json").read_text())
    del raw["quantization_config"]
    (k2_copy / "config.json").write_text(json.dumps(raw))
    assert "quantization_config" in error_of(k2_copy)


def test_no_weights_at_all(tmp_path, k2_tiny):
    (tmp_path / "config.json").write_text((k2_tiny / "config.json").read_text())
    assert "model.safetensors" in error_of(tmp_path)


def test_nan_weights_are_caught_at_load(k2_copy):
    name = "model.layers.0.post_attention_layernorm.weight"
    rewrite_shard(k2_copy, SHARD2, lambda t: t[name].__setitem__(3, float("nan")))
    with pytest.raises(CheckpointError, match=f"{SHARD2}: tensor {name} holds NaN"):
        load_model(k2_copy)


def test_read_header_sees_every_tensor(k2_tiny):
    infos = read_header(k2_tiny / SHARD2)
    assert "model.layers.0.mlp.gate_proj.weight" in infos


def test_cli_reports_a_bad_checkpoint_in_one_line(k2_copy):
    (k2_copy / SHARD2).unlink()
    r = subprocess.run([sys.executable, "-m", "hybrid.cli", "generate", str(k2_copy), "--prompt-ids", "1,2"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and SHARD2 in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- an index may only name files inside the checkpoint folder -------------------------------------------------

INDEX = "model.safetensors.index.json"
LAYERNORM = "model.layers.0.input_layernorm.weight"  # a tensor of SHARD2


def point_index(folder, shard, value) -> str:
    """Make every weight_map entry naming `shard` name `value` instead; returns the first tensor changed."""
    index = json.loads((folder / INDEX).read_text())
    index["weight_map"] = {k: value if v == shard else v for k, v in index["weight_map"].items()}
    (folder / INDEX).write_text(json.dumps(index))
    return next(k for k, v in index["weight_map"].items() if v == value)


def move_out(path, to):
    """Move a file to `to` (making its folder), leaving nothing at `path`; returns `to`."""
    to.parent.mkdir(parents=True, exist_ok=True)
    path.rename(to)
    return to


@pytest.mark.parametrize("shard", ["../../etc/passwd", "../" * 40 + "etc/passwd", "/etc/passwd",
                                   "../outside/x.safetensors"])
def test_index_naming_a_file_outside_the_folder_is_refused(k2_copy, shard):
    # ../outside/x.safetensors is a valid shard, the one the index named before: an unchecked reader loads it
    move_out(k2_copy / SHARD2, k2_copy.parent / "outside" / "x.safetensors")
    tensor = point_index(k2_copy, SHARD2, shard)
    assert error_of(k2_copy) == f"{k2_copy / INDEX}: tensor {tensor} names shard '{shard}', which is outside the " \
                               f"checkpoint folder"


@pytest.mark.parametrize("value", [7, None, ["a.safetensors"], ""])
def test_index_naming_something_other_than_a_file_name_is_refused(k2_copy, value):
    tensor = point_index(k2_copy, SHARD2, value)
    want = f"{k2_copy / INDEX}: tensor {tensor} names shard {value!r}; expected a file name"
    assert error_of(k2_copy).startswith(want)


def test_shard_symlinked_outside_the_folder_is_refused(k2_copy):
    target = move_out(k2_copy / SHARD2, k2_copy.parent / "elsewhere" / SHARD2)
    (k2_copy / SHARD2).symlink_to(target)
    msg = error_of(k2_copy)
    assert f"names shard '{SHARD2}', which is outside the checkpoint folder (it resolves to {target})" in msg


def test_shard_symlinked_inside_the_folder_opens(k2_copy, k2_tiny):
    move_out(k2_copy / SHARD2, k2_copy / "weights" / SHARD2)
    (k2_copy / SHARD2).symlink_to(f"weights/{SHARD2}")
    assert torch.equal(Checkpoint.open(k2_copy).weight(LAYERNORM), Checkpoint.open(k2_tiny).weight(LAYERNORM))


def hub_snapshot(checkpoint, cache):
    """`checkpoint` laid out as huggingface_hub's cache does: every file once under models--o--n/blobs/HASH, and
    models--o--n/snapshots/rev/NAME a relative symlink to ../../blobs/HASH. Returns the snapshot folder."""
    repo = cache / "models--o--n"
    snapshot = repo / "snapshots" / "rev"
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / path.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("rev")
    return snapshot


def test_hugging_face_hub_cache_layout_opens_and_loads(k2_tiny, tmp_path):
    snapshot = hub_snapshot(k2_tiny, tmp_path / "hub")
    assert os.readlink(snapshot / SHARD2).startswith("../../blobs/")
    ckpt = Checkpoint.open(snapshot)
    assert ckpt.tensors[LAYERNORM].path == snapshot / SHARD2  # named as the index names it, not by its hash
    model = load_model(ckpt)
    want = Checkpoint.open(k2_tiny).weight(LAYERNORM)
    assert torch.equal(model.state_dict()[LAYERNORM].float(), want)


def test_hub_snapshot_may_reach_its_own_blobs_only(k2_tiny, tmp_path):
    snapshot = hub_snapshot(k2_tiny, tmp_path / "hub")
    stranger = move_out((snapshot / SHARD2).resolve(), tmp_path / "hub" / "models--o--other" / "blobs" / "abc")
    (snapshot / SHARD2).unlink()
    (snapshot / SHARD2).symlink_to(os.path.relpath(stranger, snapshot))
    msg = error_of(snapshot)
    assert f"names shard '{SHARD2}', which is outside the checkpoint folder (it resolves to {stranger})" in msg
