"""Convert: stream a checkpoint's routed experts, layer by layer, into the CPU kernels' expert store.

    convert(checkpoint_folder, out_folder, "int4")   # FP8 or bf16 checkpoint -> int4/int8/bf16 expert store
    quantize_layer(ckpt, layer, writer)              # one layer, expert by expert, into a store writer

A pack-quantized INT4 checkpoint (Kimi-K2-Thinking) written into int4 with its own group size is repacked, not
quantized: each projection's packed words and bf16 scales move into the store's tiles as they are (hybrid/read/int4.py,
integers and an exact widening), so the store holds exactly the checkpoint's weights. Any other format (bf16,
int8, int4 with another group) is quantized from the exact float32 dequantization.

Dimension legend: E routed experts, H hidden (7168 in K2), I expert width (2048), L layers.

The store folder (layout, hybrid_store.json, how the runtime opens and verifies it) is hybrid/read/expert_store.py's.
`quantize_layer` is the one checkpoint-to-store quantize path: `convert` gives it a cpu_kernels LayerStoreWriter
(a layer store on disk), the loader a MemoryLayerWriter when a plan runs experts on the CPU without a store.

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

import shutil
from pathlib import Path

import numpy as np
import torch

from cpu_kernels.floats import FP8_BLOCK, dequantize_fp8, f32_to_bf16
from cpu_kernels.formats import Format, check_matrix, parse_format
from cpu_kernels.store import LayerStoreWriter
from hybrid.read import int4, names
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.open import is_gguf
from hybrid.errors import ConfigError
from hybrid.read.expert_store import (
    STORE_MANIFEST,
    TMP_MANIFEST,
    checksums,
    file_size,
    identity_differences,
    layer_dir_name,
    parse_manifest,
    store_identity,
    write_json,
)

# Dtypes a bf16 array holds exactly; others (F16, F32) go through float32 so no precision is lost.
_EXACT_IN_BF16 = ("BF16", "F8_E4M3")


def convert(checkpoint_folder, out_folder, fmt: str | Format | None = None, progress=None) -> Path:
    """Convert the routed experts of the checkpoint at `checkpoint_folder` into a store at `out_folder`.

    `fmt`: "bf16", "int8", "int4" (group 128) or "int8-g64"-style names (cpu_kernels.formats.parse_format); None:
    the checkpoint's default (default_expert_format: int4-g32 for K2-Thinking's INT4 experts, else int4).
    `progress(done_bytes, total_bytes)`, if given, is called once before the first layer (with the bytes of
    layers already complete from an earlier run) and after each expert; bytes count the checkpoint's expert
    tensors (values and FP8 scales), so done/elapsed is the read rate. Returns the store folder.
    Raises ConfigError (format, or a folder holding something else) and CheckpointError (bad checkpoint).
    """
    if is_gguf(checkpoint_folder):
        raise ConfigError(f"{checkpoint_folder}: a GGUF's experts run on the CPU kernels as stored; there is "
                          "nothing to convert (give it to generate, chat, serve or plan as it is)")
    ckpt = Checkpoint.open(checkpoint_folder)
    cfg = ckpt.config
    fmt = _parse_format(fmt or default_expert_format(cfg), cfg)
    out = Path(out_folder)
    manifest = _open_or_start(out, store_identity(ckpt, fmt))
    todo = [layer for layer in cfg.moe_layers if not _layer_intact(out, manifest, layer)]
    if any(manifest["layers"].pop(str(layer), None) for layer in todo):
        write_json(out / STORE_MANIFEST, manifest)  # a damaged layer stops being recorded before it is rewritten
    total = sum(_layer_source_bytes(ckpt, layer) for layer in cfg.moe_layers)
    done = total - sum(_layer_source_bytes(ckpt, layer) for layer in todo)
    if progress is not None:
        progress(done, total)
    for layer in todo:
        directory = out / layer_dir_name(layer)
        if directory.exists():
            shutil.rmtree(directory)  # half-written or damaged: never trusted, always redone
        done = _convert_layer(ckpt, layer, fmt, directory, done, total, progress)
        manifest["layers"][str(layer)] = {"dir": directory.name, "files": checksums(directory)}
        write_json(out / STORE_MANIFEST, manifest)
    return out


def default_expert_format(cfg) -> str:
    """The store format a checkpoint's routed experts go to unless asked otherwise: a pack-quantized INT4
    checkpoint's own int4 groups (a lossless repack), else int4 (group 128)."""
    return cfg.stored_expert_format or "int4"


def repacks(cfg, fmt: Format) -> bool:
    """Whether `fmt` holds the checkpoint's INT4 experts as they are (int4 with the checkpoint's group size)."""
    return cfg.int4_group is not None and fmt.name == "int4" and fmt.group_size == cfg.int4_group


def _parse_format(fmt, cfg) -> Format:
    try:
        fmt = fmt if isinstance(fmt, Format) else parse_format(fmt)
        if fmt.spec.quantize is None:
            raise ValueError("GGUF types are read as released, convert writes bf16, int8 or int4")
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

    def expert_done(source_bytes):
        nonlocal done
        done += source_bytes
        if progress is not None:
            progress(done, total)

    quantize_layer(ckpt, layer, writer, expert_done)
    return done


def quantize_layer(ckpt: Checkpoint, layer: int, writer, expert_done=None):
    """Quantize MoE layer `layer`'s routed experts from `ckpt` into `writer`, one expert at a time; returns
    writer.close() (a LayerStoreWriter's directory, a MemoryLayerWriter's ExpertStore).

    `writer` has the cpu_kernels.store writers' interface (write_expert(e, gate, up, down), close()) and the
    checkpoint's format and sizes. `expert_done(source_bytes)`, if given, is called after each expert with the
    checkpoint bytes it read. Memory: one expert's temporaries besides what the writer holds. A pack-quantized
    INT4 checkpoint into int4 with its group size is repacked (writer.write_quantized), never through float.
    """
    repack = repacks(ckpt.config, writer.fmt)
    for e in range(ckpt.config.n_routed_experts):
        if repack:
            writer.write_quantized(e, _repacked_expert(ckpt, layer, e))
        else:
            writer.write_expert(e, *_read_expert(ckpt, layer, e))
        if expert_done is not None:
            expert_done(_expert_source_bytes(ckpt, layer, e))
    return writer.close()


def _read_expert(ckpt: Checkpoint, layer: int, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gate, up [I, H] and down [H, I] of expert `e`, through a reader opened for this expert alone.

    safetensors maps a whole shard, and the pages a read touched count in RSS until the map closes: through one
    long-lived reader a K2 layer's 17 GB shard would join the RSS. A fresh reader (sharing the validated tensor
    table; it parses one shard header, ~ms) closes its maps when it goes, keeping the source's share to one expert.
    """
    # A GGUF checkpoint (hybrid.read.gguf) dequantizes one expert's slab per weight() call: nothing to reopen.
    reader = Checkpoint(ckpt.folder, ckpt.config, ckpt.tensors) if isinstance(ckpt, Checkpoint) else ckpt
    return tuple(_expert_matrix(reader, names.expert_key(layer, e, p)) for p in names.EXPERT_PROJS)


def _repacked_expert(ckpt: Checkpoint, layer: int, e: int) -> dict:
    """{projection: (values, scales)} of expert `e` in the store's int4 layout, moved from the checkpoint's packed
    words and scales (hybrid/read/int4.py); through a reader opened for this expert alone, as _read_expert."""
    reader = Checkpoint(ckpt.folder, ckpt.config, ckpt.tensors)
    group = ckpt.config.int4_group
    return {p: int4.to_store(*reader.int4_parts(names.expert_key(layer, e, p)), group) for p in names.EXPERT_PROJS}


def _expert_matrix(ckpt: Checkpoint, name: str) -> np.ndarray:
    """One projection as numpy: bf16 bits (uint16) for BF16 and block-FP8 tensors, float32 for F16 and F32.

    Block-FP8 is dequantized by numpy (fp8 value x block scale in float32, rounded to nearest-even bf16): the
    same arithmetic as Checkpoint.weight, bit for bit (the test checks it), but no torch operator. Torch's
    intra-op thread pool made each small operator ~10x slower here whenever another process held a core.
    """
    if isinstance(ckpt, Checkpoint) and ckpt.is_int4(name):  # q * scale in float32: exact
        return ckpt.weight(name, torch.float32).numpy()
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
        parts = int4.tensor_names(key) if ckpt.is_int4(key) else (key, names.scale_name(key))
        n += sum(ckpt.tensors[part].nbytes for part in parts if part in ckpt.tensors)
    return n


def _layer_source_bytes(ckpt: Checkpoint, layer: int) -> int:
    return sum(_expert_source_bytes(ckpt, layer, e) for e in range(ckpt.config.n_routed_experts))


# ---- continuing a store ------------------------------------------------------------------------------------


def _open_or_start(out: Path, identity: dict) -> dict:
    """The manifest to continue from: the existing one if it describes the same conversion, else a new one."""
    path = out / STORE_MANIFEST
    if path.is_file():
        manifest = parse_manifest(path)
        differences = identity_differences(manifest, identity)
        if differences:
            raise ConfigError(f"{path}: this folder holds a different expert store ({'; '.join(differences)}); "
                              f"convert into another folder, or delete this one to replace it")
        manifest["source"]["checkpoint"] = identity["source"]["checkpoint"]
        return manifest
    if out.exists() and (not out.is_dir() or any(p.name != TMP_MANIFEST for p in out.iterdir())):
        raise ConfigError(f"{out}: exists and is not an empty folder, and holds no {STORE_MANIFEST}; "
                          f"refusing to convert into it")
    out.mkdir(parents=True, exist_ok=True)
    manifest = dict(identity, layers={})
    write_json(path, manifest)
    return manifest


def _layer_intact(out: Path, manifest: dict, layer: int) -> bool:
    """Recorded complete, and every recorded file still exists with its recorded size."""
    entry = manifest["layers"].get(str(layer))
    if entry is None:
        return False
    directory = out / entry["dir"]
    return all(file_size(directory / name) == f["bytes"] for name, f in entry["files"].items())
