"""The expert store folder: the multi-layer store `hybrid convert` writes and the runtime maps, and its checks.

    layers = open_store_layers(store_folder)         # {layer: layer_dir}, what the runtime maps
    verify_store(store_folder)                       # recompute every checksum

Dimension legend: E routed experts, L layers.

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

hybrid/read/convert.py writes stores (and resumes them); the runtime opens them with `open_store_layers`.
"""

import hashlib
import json
import os
from pathlib import Path

from cpu_kernels.formats import Format
from cpu_kernels.store import MANIFEST as LAYER_MANIFEST
from hybrid.read.checkpoint import Checkpoint
from hybrid.errors import CheckpointError

STORE_MANIFEST = "hybrid_store.json"
STORE_FORMAT_VERSION = 1
TMP_MANIFEST = STORE_MANIFEST + ".tmp"  # write_json's temporary name: a kill during the first write leaves only this
FINGERPRINT_BYTES = 1 << 20  # 1 MiB per shard: 62 MiB for K2, read in well under a second
HASH_CHUNK_BYTES = 1 << 20  # read size while checksumming: page-cache reads, no RSS growth


def layer_dir_name(layer: int) -> str:
    return f"layer_{layer:03d}"


def store_identity(ckpt: Checkpoint, fmt: Format) -> dict:
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


def identity_differences(manifest: dict, identity: dict) -> list[str]:
    """What differs between a store's manifest and the store_identity of a conversion, one phrase each."""
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


def file_size(path: Path):
    try:
        return path.stat().st_size
    except OSError:
        return None


def checksums(directory: Path) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(directory.iterdir())}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, data: dict) -> None:
    """Write to a temporary name, flush it to disk, then rename: a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")  # TMP_MANIFEST for the store manifest
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def parse_manifest(path: Path) -> dict:
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


def read_store_manifest(out_folder) -> dict:
    """The parsed hybrid_store.json of a store folder; CheckpointError naming the file if absent or unreadable."""
    path = Path(out_folder) / STORE_MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {out_folder} is not an expert store (make one with hybrid convert)")
    manifest = parse_manifest(path)
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
        differing = identity_differences(manifest, store_identity(checkpoint, fmt))
        if differing:
            raise CheckpointError(f"{path}: this store was not converted from {checkpoint.folder} "
                                  f"({'; '.join(differing)})")
    missing = [layer for layer in manifest["model"]["moe_layers"] if str(layer) not in manifest["layers"]]
    if missing:
        raise CheckpointError(f"{path}: incomplete store: MoE layers {missing} are not converted yet "
                              f"(rerun hybrid convert with the same arguments to finish it)")
    layers = {}
    for key, entry in sorted(manifest["layers"].items(), key=lambda kv: int(kv[0])):
        directory = out / entry["dir"]
        for name, f in entry["files"].items():
            size = file_size(directory / name)
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
