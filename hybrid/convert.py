"""Convert: stream a checkpoint's routed experts, layer by layer, into the CPU kernels' expert store.

    convert(checkpoint_folder, out_folder, "int4")   # FP8 or bf16 checkpoint -> int4/int8/bf16 expert store
    layers = open_store_layers(out_folder)           # {layer: layer_dir}, what the runtime maps
    verify_store(out_folder)                         # recompute every checksum

Dimension legend: E routed experts, H hidden (7168 in K2), I expert width (2048), L layers.

Store folder layout (store format version 1; a format users keep: change it only with a new version number)
-----------------------------------------------------------------------------------------------------------
    OUT/
      hybrid_store.json      the store manifest, below; rewritten (temp name, then os.replace) after each layer
      layer_003/             one layer store per converted MoE layer, numbered by the checkpoint's layer index;
        manifest.json        its byte layout is cpu_kernels/store.py's (format version 1): per projection one
        gate_proj.values.npy   .npy file holding all E experts, tiled for streaming; manifest.json written last
        gate_proj.scales.npy   (int8 / int4 only)
        up_proj.values.npy  up_proj.scales.npy  down_proj.values.npy  down_proj.scales.npy
      layer_004/ ...

hybrid_store.json:

    {"store_format_version": 1, "format": "int4-g128", "format_name": "int4", "group_size": 128,
     "source": {"checkpoint": "/abs/path/Kimi-K2-Instruct",           # where it was converted from
                "files": {"model-00002-of-000062.safetensors": {"bytes": N, "tail_sha256": "..."}, ...}},
     "model": {"model_type", "num_hidden_layers", "hidden_size", "moe_intermediate_size", "n_routed_experts",
               "moe_layers": [first, ..., last]},
     "layers": {"3": {"dir": "layer_003", "files": {"gate_proj.values.npy": {"bytes": N, "sha256": "..."}, ...}}}}

Readers refuse a manifest whose layer entry names another "dir" than layer_NNN for its key, a file name that is
not a plain name, or a path that resolves (through symlinks) outside the store folder.

A layer is complete only when it is listed under "layers"; the entry is added after its layer store is closed
(manifest.json written) and checksummed. `tail_sha256` hashes the last `FINGERPRINT_BYTES` of a shard: a cheap
content fingerprint that tells apart two releases with equal shard sizes (K2-Instruct and K2-Instruct-0905)
without reading a terabyte. The checkpoint may move: its path is recorded, not compared. Non-expert tensors
(attention, norms, router, shared expert, embeddings) are not copied; the runtime reads them from the checkpoint.

Resuming: a rerun skips the layers recorded complete whose files exist with the recorded sizes; any other
layer directory (half-written: temporary `.tmp` files, no manifest.json, or not yet recorded) is deleted and
converted again. A folder holding a store of another checkpoint, format or model is refused with a ConfigError
naming what differs; a non-empty folder without hybrid_store.json is refused rather than overwritten.

Memory bound: experts are read one at a time, each through a reader closed after it, and written through
LayerStoreWriter's memory maps, so peak RSS = imports + one layer's store (the maps' file-backed pages, released
when the layer closes) + one expert's temporaries. Measured with VmHWM of a child process over one that only
imports and opens the checkpoint: on the test's model (H 512, I 256, 32 experts, bf16: a 24.0 MiB layer) the
excess was 30.8 MiB, one layer + 7 MiB; at K2's width (H 7168, I 2048, 4 experts) one expert's temporaries
were ~0.3 GiB (int4 380 MiB excess for an 89 MiB layer, bf16 608 for 336). For K2 in int4-g128 one layer's
store is 384 experts x 23,396,352 bytes (3 x 2048 x 7168 4-bit values + a float32 scale per 128 values and
row) = 8.98 GB = 8.37 GiB, so converting K2 peaks at ~8.7 GiB above the imports (~0.3 GiB): below two layers
(16.7 GiB). The maps' pages are file-backed: with less free RAM the kernel writes them back early instead.

Throughput (checkpoint expert bytes per second, one process on this 2-core machine, numpy single-threaded):
FP8 -> int4 0.08-0.09 GB/s at K2's width, 0.10 GB/s at H 512, 0.05 GB/s on the 1.6 MB test model (per-call
overhead); int8 and bf16 within 15% of int4. At K2's width ~55% is the quantizer, ~37% FP8 dequantization and
bf16 rounding, ~3% checksums: K2's 1.0 TB of FP8 experts would take ~3.5 h on one such core.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from cpu_kernels.formats import Format, check_matrix, parse_format
from cpu_kernels.quantize import FP8_BLOCK, dequantize_fp8, f32_to_bf16
from cpu_kernels.store import MANIFEST as LAYER_MANIFEST
from cpu_kernels.store import LayerStoreWriter
from hybrid import names
from hybrid.checkpoint import Checkpoint
from hybrid.errors import CheckpointError, ConfigError

STORE_MANIFEST = "hybrid_store.json"
STORE_FORMAT_VERSION = 1
_TMP_MANIFEST = STORE_MANIFEST + ".tmp"  # a kill during the first manifest write leaves only this behind
FINGERPRINT_BYTES = 1 << 20  # 1 MiB per shard: 62 MiB for K2, read in well under a second
HASH_CHUNK_BYTES = 1 << 20  # read size while checksumming: page-cache reads, no RSS growth
# Dtypes a bf16 array holds exactly; others (F16, F32) go through float32 so no precision is lost.
_EXACT_IN_BF16 = ("BF16", "F8_E4M3")


def layer_dir_name(layer: int) -> str:
    return f"layer_{layer:03d}"


def convert(checkpoint_folder, out_folder, fmt: str | Format = "int4", progress=None) -> Path:
    """Convert the routed experts of the checkpoint at `checkpoint_folder` into a store at `out_folder`.

    `fmt`: "bf16", "int8", "int4" (group 128) or "int8-g64"-style names (cpu_kernels.formats.parse_format).
    `progress(done_bytes, total_bytes)`, if given, is called once before the first layer (with the bytes of
    layers already complete from an earlier run) and after each expert; bytes count the checkpoint's expert
    tensors (values and FP8 scales), so done/elapsed is the read rate. Returns the store folder.
    Raises ConfigError (format, or a folder holding something else) and CheckpointError (bad checkpoint).
    """
    ckpt = Checkpoint.open(checkpoint_folder)
    cfg = ckpt.config
    fmt = _parse_format(fmt, cfg)
    out = Path(out_folder)
    manifest = _open_or_start(out, _identity(ckpt, fmt))
    todo = [layer for layer in cfg.moe_layers if not _layer_intact(out, manifest, layer)]
    if any(manifest["layers"].pop(str(layer), None) for layer in todo):
        _write_json(out / STORE_MANIFEST, manifest)  # a damaged layer stops being recorded before it is rewritten
    total = sum(_layer_source_bytes(ckpt, layer) for layer in cfg.moe_layers)
    done = total - sum(_layer_source_bytes(ckpt, layer) for layer in todo)
    if progress is not None:
        progress(done, total)
    for layer in todo:
        directory = out / layer_dir_name(layer)
        if directory.exists():
            shutil.rmtree(directory)  # half-written or damaged: never trusted, always redone
        done = _convert_layer(ckpt, layer, fmt, directory, done, total, progress)
        manifest["layers"][str(layer)] = {"dir": directory.name, "files": _checksums(directory)}
        _write_json(out / STORE_MANIFEST, manifest)
    return out


def _parse_format(fmt, cfg) -> Format:
    try:
        fmt = fmt if isinstance(fmt, Format) else parse_format(fmt)
        check_matrix(fmt, cfg.moe_intermediate_size, cfg.hidden_size)
        check_matrix(fmt, cfg.hidden_size, cfg.moe_intermediate_size)
    except ValueError as e:
        raise ConfigError(f"expert format {str(fmt)!r} for {cfg.source}: {e}") from None
    return fmt


def _convert_layer(ckpt: Checkpoint, layer: int, fmt: Format, directory: Path, done: int, total: int,
                   progress) -> int:
    """Write one layer store expert by expert; returns the updated done_bytes."""
    cfg = ckpt.config
    writer = LayerStoreWriter(directory, fmt, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    for e in range(cfg.n_routed_experts):
        writer.write_expert(e, *_read_expert(ckpt, layer, e))
        done += _expert_source_bytes(ckpt, layer, e)
        if progress is not None:
            progress(done, total)
    writer.close()
    return done


def _read_expert(ckpt: Checkpoint, layer: int, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gate, up [I, H] and down [H, I] of expert `e`, through a reader opened for this expert alone.

    safetensors maps a whole shard, and the pages a read touched count in RSS until the map closes: through one
    long-lived reader a K2 layer's 17 GB shard would join the RSS. A fresh reader (sharing the validated tensor
    table; it parses one shard header, ~ms) closes its maps when it goes, keeping the source's share to one expert.
    """
    reader = Checkpoint(ckpt.folder, ckpt.config, ckpt.tensors)
    return tuple(_expert_matrix(reader, names.expert_key(layer, e, p)) for p in names.EXPERT_PROJS)


def _expert_matrix(ckpt: Checkpoint, name: str) -> np.ndarray:
    """One projection as numpy: bf16 bits (uint16) for BF16 and block-FP8 tensors, float32 for F16 and F32.

    Block-FP8 is dequantized by numpy (fp8 value x block scale in float32, rounded to nearest-even bf16): the
    same arithmetic as Checkpoint.weight, bit for bit (the test checks it), but no torch operator. Torch's
    intra-op thread pool made each small operator ~10x slower here whenever another process held a core.
    """
    dtype = ckpt.tensors[name].dtype
    if dtype == "F8_E4M3" and ckpt.config.fp8_block == (FP8_BLOCK, FP8_BLOCK):
        scale = ckpt.weight(names.scale_name(name), torch.float32).numpy()
        return f32_to_bf16(dequantize_fp8(ckpt.raw(name).view(torch.uint8).numpy(), scale))
    if dtype in _EXACT_IN_BF16:
        return ckpt.weight(name, torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    return ckpt.weight(name, torch.float32).contiguous().numpy()


def _expert_source_bytes(ckpt: Checkpoint, layer: int, e: int) -> int:
    n = 0
    for p in names.EXPERT_PROJS:
        key = names.expert_key(layer, e, p)
        n += ckpt.tensors[key].nbytes
        scale = ckpt.tensors.get(names.scale_name(key))
        n += scale.nbytes if scale is not None else 0
    return n


def _layer_source_bytes(ckpt: Checkpoint, layer: int) -> int:
    return sum(_expert_source_bytes(ckpt, layer, e) for e in range(ckpt.config.n_routed_experts))


# ---- the store manifest ------------------------------------------------------------------------------------


def _identity(ckpt: Checkpoint, fmt: Format) -> dict:
    """Everything that must agree for a rerun to continue a store: format, model dims and source shards."""
    cfg = ckpt.config
    shards = sorted({info.path for info in ckpt.tensors.values()})
    return {
        "store_format_version": STORE_FORMAT_VERSION,
        "format": str(fmt),
        "format_name": fmt.name,
        "group_size": fmt.group_size,
        "source": {"checkpoint": str(ckpt.folder.resolve()),
                   "files": {p.name: {"bytes": p.stat().st_size, "tail_sha256": _tail_sha256(p)} for p in shards}},
        "model": {"model_type": cfg.model_type, "num_hidden_layers": cfg.num_hidden_layers,
                  "hidden_size": cfg.hidden_size, "moe_intermediate_size": cfg.moe_intermediate_size,
                  "n_routed_experts": cfg.n_routed_experts, "moe_layers": list(cfg.moe_layers)},
    }


def _tail_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - FINGERPRINT_BYTES))
        return hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()


def _open_or_start(out: Path, identity: dict) -> dict:
    """The manifest to continue from: the existing one if it describes the same conversion, else a new one."""
    path = out / STORE_MANIFEST
    if path.is_file():
        manifest = _read_manifest(path)
        differences = _differences(manifest, identity)
        if differences:
            raise ConfigError(f"{path}: this folder holds a different expert store ({'; '.join(differences)}); "
                              f"convert into another folder, or delete this one to replace it")
        manifest["source"]["checkpoint"] = identity["source"]["checkpoint"]
        return manifest
    if out.exists() and (not out.is_dir() or any(p.name != _TMP_MANIFEST for p in out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder, and holds no {STORE_MANIFEST}; "
                          f"refusing to convert into it")
    out.mkdir(parents=True, exist_ok=True)
    manifest = dict(identity, layers={})
    _write_json(path, manifest)
    return manifest


def _differences(manifest: dict, identity: dict) -> list[str]:
    out = []
    for key in ("store_format_version", "format"):
        if manifest.get(key) != identity[key]:
            out.append(f"{key}: store has {manifest.get(key)!r}, this conversion {identity[key]!r}")
    for key, want in identity["model"].items():
        have = manifest.get("model", {}).get(key)
        if have != want:
            out.append(f"model {key}: store has {have!r}, checkpoint has {want!r}")
    have_files = manifest.get("source", {}).get("files", {})
    want_files = identity["source"]["files"]
    for name in sorted(set(have_files) | set(want_files)):
        have, want = have_files.get(name), want_files.get(name)
        if have is None or want is None:
            out.append(f"source file {name}: {'only in the checkpoint' if have is None else 'not in the checkpoint'}")
        elif have != want:
            what = "size" if have.get("bytes") != want["bytes"] else "content (tail_sha256)"
            out.append(f"source file {name}: {what} differs from the checkpoint's")
    return out


def _layer_intact(out: Path, manifest: dict, layer: int) -> bool:
    """Recorded complete, and every recorded file still exists with its recorded size."""
    entry = manifest["layers"].get(str(layer))
    if entry is None:
        return False
    directory = out / entry["dir"]
    return all(_size(directory / name) == f["bytes"] for name, f in entry["files"].items())


def _size(path: Path):
    try:
        return path.stat().st_size
    except OSError:
        return None


def _checksums(directory: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(directory.iterdir())}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    """Write to a temporary name, flush it to disk, then rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")  # _TMP_MANIFEST for the store manifest
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(path: Path) -> dict:
    """hybrid_store.json parsed, its layer entries checked (_check_layers): every reader comes through here."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("layers"), dict):
            raise ValueError("expected an object with a 'layers' object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not an expert store manifest ({e})") from None
    _check_layers(path, data["layers"])
    return data


def _check_layers(path: Path, layers: dict) -> None:
    """Each entry names exactly what convert writes: dir layer_NNN, plain file names, and nothing that resolves
    outside the store folder. The manifest is a file on disk like any other: unchecked, a 'dir' of '../elsewhere'
    or a file '../../x' would be hashed and handed to the runtime, and resuming would delete outside the store."""
    root = path.parent.resolve()
    for key, entry in layers.items():
        if not (key.isascii() and key.isdigit() and str(int(key)) == key):
            raise CheckpointError(f"{path}: layer key {key!r} is not a layer number")
        if not isinstance(entry, dict) or not isinstance(entry.get("files"), dict):
            raise CheckpointError(f"{path}: layer {key}: expected an object {{'dir': ..., 'files': {{...}}}}")
        want = layer_dir_name(int(key))
        if entry.get("dir") != want:
            raise CheckpointError(f"{path}: layer {key} names dir {entry.get('dir')!r}; expected {want!r}")
        for name, f in entry["files"].items():
            if name in ("", ".", "..") or "/" in name or os.sep in name:
                raise CheckpointError(f"{path}: layer {key} names file {name!r}; expected a plain file name")
            if not isinstance(f, dict) or type(f.get("bytes")) is not int:
                raise CheckpointError(f"{path}: layer {key} file {name!r}: expected {{'bytes': N, 'sha256': ...}}")
        for inside in (want, *(f"{want}/{name}" for name in entry["files"])):
            try:
                target = (path.parent / inside).resolve()
            except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte in the name
                raise CheckpointError(f"{path}: layer {key} names {inside!r}, which cannot be resolved ({e})") from None
            if not target.is_relative_to(root):
                raise CheckpointError(f"{path}: layer {key} names {inside!r}, which resolves to {target}, "
                                      f"outside the store folder")


# ---- reading a store ---------------------------------------------------------------------------------------


def read_store_manifest(out_folder) -> dict:
    """The parsed hybrid_store.json of a store folder; CheckpointError naming the file if absent or unreadable."""
    path = Path(out_folder) / STORE_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {out_folder} is not an expert store (make one with hybrid convert)")
    manifest = _read_manifest(path)
    if manifest.get("store_format_version") != STORE_FORMAT_VERSION:
        raise CheckpointError(f"{path}: store_format_version {manifest.get('store_format_version')!r}, "
                              f"this code reads {STORE_FORMAT_VERSION}")
    return manifest


def open_store_layers(out_folder, checkpoint: Checkpoint | None = None) -> dict[int, Path]:
    """{MoE layer index: its layer store directory} for a complete store, after a cheap check of file sizes.

    Raises CheckpointError naming the file when the store is incomplete (an interrupted convert: rerun it), or a
    recorded file is missing or has another size than recorded. Reads no store contents (see verify_store).
    With `checkpoint`, also checks that the store was converted from it (model dims, shard names, sizes and
    tail fingerprints: reads 1 MiB per shard).
    """
    out = Path(out_folder)
    manifest = read_store_manifest(out)
    path = out / STORE_MANIFEST
    if checkpoint is not None:
        fmt = Format(manifest["format_name"], manifest["group_size"])
        differences = _differences(manifest, _identity(checkpoint, fmt))
        if differences:
            raise CheckpointError(f"{path}: this store was not converted from {checkpoint.folder} "
                                  f"({'; '.join(differences)})")
    missing = [layer for layer in manifest["model"]["moe_layers"] if str(layer) not in manifest["layers"]]
    if missing:
        raise CheckpointError(f"{path}: incomplete store: MoE layers {missing} are not converted yet "
                              f"(rerun hybrid convert with the same arguments to finish it)")
    layers = {}
    for key, entry in sorted(manifest["layers"].items(), key=lambda kv: int(kv[0])):
        directory = out / entry["dir"]
        for name, f in entry["files"].items():
            size = _size(directory / name)
            if size is None:
                raise CheckpointError(f"{directory / name}: missing (listed in {path})")
            if size != f["bytes"]:
                raise CheckpointError(f"{directory / name}: {size} bytes, {path} records {f['bytes']}")
        if not (directory / LAYER_MANIFEST).is_file():
            raise CheckpointError(f"{directory / LAYER_MANIFEST}: missing; layer {key} is not a complete layer store")
        layers[int(key)] = directory
    return layers


def verify_store(out_folder) -> int:
    """Recompute every file's sha256 against hybrid_store.json; returns the bytes checked.

    Raises CheckpointError naming the first file whose size or checksum differs (or what open_store_layers
    raises for an incomplete store).
    """
    out = Path(out_folder)
    manifest = read_store_manifest(out)
    open_store_layers(out)
    n_bytes = 0
    for entry in manifest["layers"].values():
        for name, f in sorted(entry["files"].items()):
            path = out / entry["dir"] / name
            if _sha256(path) != f["sha256"]:
                raise CheckpointError(f"{path}: sha256 differs from the one recorded in {out / STORE_MANIFEST}; "
                                      f"the file is damaged (delete its layer folder and rerun hybrid convert)")
            n_bytes += f["bytes"]
    return n_bytes
