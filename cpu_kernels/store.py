"""The expert store: one MoE layer's routed experts, laid out for streaming, saved as memory-mappable files.

Dimension legend: E experts, H hidden, I expert width, G group size, R rows per tile (128 for every format so
far), nt = ceil(n_out / R) tiles, ng = n_in / G groups. Projections use the checkpoint's names: gate_proj [I, H],
up_proj [I, H], down_proj [H, I] per expert ([n_out, n_in], as in `nn.Linear.weight`).

Byte layout (format version 1; a format users keep, change it only with a new version number)
----------------------------------------------------------------------------------------------
A layer store is a directory:

    manifest.json             written last; its presence marks a complete store
    gate_proj.values.npy      up_proj.values.npy      down_proj.values.npy
    gate_proj.scales.npy      up_proj.scales.npy      down_proj.scales.npy     (formats with scales: int8, int4)

Each .npy file is numpy's format 1.0 (a small header, then the array's raw bytes in C order, little-endian), so
`np.load(path, mmap_mode="r")` maps it without reading it. For every projection, all E experts are one array
whose first axis is the expert and second the tile, so one expert is one contiguous byte range and, inside it,
each tile is one contiguous byte range: a kernel thread streams sequentially through the tiles it owns. What
follows the tile axis is the format's own layout, documented (element by element) in its module:

    bf16   values uint16 [E, nt, n_in, R]                                       cpu_kernels/formats/bf16.py
    int8   values int8   [E, nt, ng, G, R],    scales float32 [E, nt, ng, R]    cpu_kernels/formats/int8.py
    int4   values uint8  [E, nt, ng, G/2, R],  scales float32 [E, nt, ng, R]    cpu_kernels/formats/int4.py

A format without scales (bf16) stores no scales files (in memory its scales are empty [E, nt, 0, 0] placeholders).
manifest.json holds {"format_version", "format", "group_size", "tile_rows", "n_experts", "hidden", "width",
"files": {name: {"file", "dtype", "shape"}}}, "tile_rows" being the format's R. Every file is written under a
temporary name and moved into place with os.replace, the manifest last, so a crash never leaves a store that
looks complete.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import Format, scale_shape, value_shape
from .quantize import quantize_matrix

FORMAT_VERSION = 1
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MANIFEST = "manifest.json"
_TMP = ".tmp"


def projection_shape(name: str, hidden: int, width: int) -> tuple[int, int]:
    """[n_out, n_in] of one expert's projection `name` (gate_proj, up_proj or down_proj)."""
    return (hidden, width) if name == "down_proj" else (width, hidden)


def layer_arrays(fmt: Format, n_experts: int, hidden: int, width: int, formats: dict | None = None) -> dict:
    """{"gate_proj.values": (shape, dtype), ...}: every array of a layer store, scales placeholders included.
    `formats` overrides `fmt` per projection name (see ExpertStore.formats)."""
    arrays = {}
    for name in PROJECTIONS:
        fmt = (formats or {}).get(name, fmt)
        n_out, n_in = projection_shape(name, hidden, width)
        arrays[f"{name}.values"] = ((n_experts,) + value_shape(fmt, n_out, n_in), np.dtype(fmt.spec.value_dtype))
        arrays[f"{name}.scales"] = ((n_experts,) + scale_shape(fmt, n_out, n_in), np.dtype(fmt.spec.scale_dtype))
    return arrays


@dataclass(frozen=True)
class ExpertStore:
    """One layer's experts in format `fmt`: values[name] and scales[name] for name in PROJECTIONS.

    Arrays have the shapes documented above, with E = n_experts leading.
    A format without scales has empty [E, nt, 0, 0] placeholders. Arrays may be read-only memory maps.
    """

    fmt: Format
    n_experts: int
    hidden: int
    width: int
    values: dict
    scales: dict
    # Per projection where they differ from `fmt`: a GGUF layer as Unsloth's dynamic quants write it keeps, say,
    # gate and up in IQ2_XXS and down in IQ3_XXS. Stores hybrid writes have one format.
    formats: dict | None = None

    def __post_init__(self):
        for key, (shape, dtype) in layer_arrays(self.fmt, self.n_experts, self.hidden, self.width,
                                                self.formats).items():
            name, _, part = key.partition(".")
            a = getattr(self, part).get(name)
            if a is None or a.shape != shape or a.dtype != dtype:
                got = None if a is None else (a.shape, str(a.dtype))
                raise ValueError(f"{name} {part}: want {shape} {dtype}, got {got}")
            if not a.flags.c_contiguous:
                raise ValueError(f"{name} values and scales must be C-contiguous")

    @property
    def nbytes(self) -> int:
        return sum(self.values[n].nbytes + self.scales[n].nbytes for n in PROJECTIONS)

    def format_of(self, name: str) -> Format:
        """The format of projection `name` (gate_proj, up_proj or down_proj)."""
        return (self.formats or {}).get(name, self.fmt)

    @classmethod
    def from_blocks(cls, formats: dict, n_experts: int, hidden: int, width: int, blocks: dict) -> "ExpertStore":
        """A layer of GGUF experts as the file stores them: blocks[name] uint8 [E, n_out, B] (zero-copy views of
        the memory-mapped file, B bytes per row) in the GGUF format formats[name], for name in PROJECTIONS. The
        store's arrays are reshapes of those views (formats/gguf/ says why that is the store layout): nothing is
        copied or read here."""
        values, scales = {}, {}
        for name in PROJECTIONS:
            fmt, (n_out, n_in) = formats[name], projection_shape(name, hidden, width)
            if fmt.spec.ggml_type is None:
                raise ValueError(f"{name}: format {fmt} is not a GGUF type")
            shape = (n_experts,) + value_shape(fmt, n_out, n_in)
            if blocks[name].size != math.prod(shape):
                raise ValueError(f"{name}: {blocks[name].shape} bytes do not hold {n_experts} [{n_out}, {n_in}] "
                                 f"matrices in {fmt}")
            values[name] = blocks[name].reshape(shape)
            scales[name] = np.zeros((n_experts,) + scale_shape(fmt, n_out, n_in), np.float32)
        return cls(formats["gate_proj"], n_experts, hidden, width, values, scales, dict(formats))


def _stored(fmt: Format, key: str) -> bool:
    """Whether array `key` has a file: all but the scales of a format without scales."""
    return fmt.spec.has_scales or not key.endswith(".scales")


def _assemble(fmt: Format, n_experts: int, hidden: int, width: int, stored) -> ExpertStore:
    """The ExpertStore whose arrays with a file are stored(key); the others are empty scales placeholders."""
    values, scales = {}, {}
    for key, (shape, dtype) in layer_arrays(fmt, n_experts, hidden, width).items():
        name, _, part = key.partition(".")
        (values if part == "values" else scales)[name] = stored(key) if _stored(fmt, key) else np.zeros(shape, dtype)
    return ExpertStore(fmt, n_experts, hidden, width, values, scales)


class _LayerWriter:
    """Quantize a layer one expert at a time into arrays made by `_allocate`: what the two writers below share.

    `write_expert` quantizes and places expert `e`; `write_quantized` places one already in the store's format (a
    checkpoint stored in it, such as K2-Thinking's INT4 experts); `close()` checks that every expert was written
    and finishes the store.
    """

    def __init__(self, fmt: Format, n_experts: int, hidden: int, width: int):
        self.fmt, self.n_experts, self.hidden, self.width = fmt, n_experts, hidden, width
        self._written = np.zeros(n_experts, bool)
        self._arrays = {key: self._allocate(key, shape, dtype)
                        for key, (shape, dtype) in layer_arrays(fmt, n_experts, hidden, width).items()
                        if _stored(fmt, key)}

    def _allocate(self, key: str, shape: tuple, dtype) -> np.ndarray:
        raise NotImplementedError

    def write_expert(self, e: int, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> None:
        """Quantize and place expert `e`: gate, up [I, H] and down [H, I], float32 or bf16 as uint16."""
        if not 0 <= e < self.n_experts:
            raise ValueError(f"expert index {e} out of range [0, {self.n_experts})")
        for name, w in zip(PROJECTIONS, (gate, up, down)):
            want = projection_shape(name, self.hidden, self.width)
            if w.shape != want:
                raise ValueError(f"{name} of expert {e}: shape {w.shape}, want {want}")
            v, s = quantize_matrix(w, self.fmt)
            self._arrays[f"{name}.values"][e] = v
            if self.fmt.spec.has_scales:
                self._arrays[f"{name}.scales"][e] = s
        self._written[e] = True

    def write_quantized(self, e: int, arrays: dict) -> None:
        """Place expert `e` as given: arrays {projection name: (values, scales)} in the writer's format, one
        expert's shapes and dtypes (cpu_kernels.formats value_shape / scale_shape); ValueError naming a mismatch."""
        if not 0 <= e < self.n_experts:
            raise ValueError(f"expert index {e} out of range [0, {self.n_experts})")
        if set(arrays) != set(PROJECTIONS):
            raise ValueError(f"expert {e}: arrays for {sorted(arrays)}, want {list(PROJECTIONS)}")
        for name in PROJECTIONS:
            for part, array in zip(("values", "scales"), arrays[name]):
                key = f"{name}.{part}"
                if key not in self._arrays:
                    continue
                dest = self._arrays[key][e]
                if array.shape != dest.shape or array.dtype != dest.dtype:
                    raise ValueError(f"{key} of expert {e}: {array.dtype}{list(array.shape)}, the store's {self.fmt} "
                                     f"wants {dest.dtype}{list(dest.shape)}")
                dest[...] = array
        self._written[e] = True

    def _check_complete(self) -> None:
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise ValueError(f"experts {missing[:8].tolist()} of {self.n_experts} were never written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()


class MemoryLayerWriter(_LayerWriter):
    """LayerStoreWriter's interface into memory: `close()` returns the ExpertStore (quantizing at load time).

    Memory: the layer's store, allocated at once, plus one expert's temporaries while it is written.
    """

    def _allocate(self, key: str, shape: tuple, dtype) -> np.ndarray:
        return np.empty(shape, dtype)

    def close(self) -> ExpertStore:
        self._check_complete()
        return _assemble(self.fmt, self.n_experts, self.hidden, self.width, self._arrays.__getitem__)


class LayerStoreWriter(_LayerWriter):
    """Write a layer store one expert at a time, for converters that cannot hold a layer in memory.

        with LayerStoreWriter(path, fmt, n_experts, hidden, width) as w:
            for e in range(n_experts):
                w.write_expert(e, gate_e, up_e, down_e)   # float32 or bf16-as-uint16 matrices

    Files grow under temporary names; `close()` (the `with` exit, only without an exception) checks that every
    expert was written, moves them into place and writes the manifest last.
    """

    def __init__(self, directory, fmt: Format, n_experts: int, hidden: int, width: int):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        super().__init__(fmt, n_experts, hidden, width)

    def _allocate(self, key: str, shape: tuple, dtype) -> np.ndarray:
        path = self.directory / f"{key}.npy{_TMP}"
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape, version=(1, 0))

    def close(self) -> Path:
        self._check_complete()
        for key, array in self._arrays.items():
            array.flush()
            os.replace(self.directory / f"{key}.npy{_TMP}", self.directory / f"{key}.npy")
        _write_manifest(self.directory, _manifest(self.fmt, self.n_experts, self.hidden, self.width, self._arrays))
        self._arrays = {}
        return self.directory


def build_store(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: Format) -> ExpertStore:
    """Quantize in-memory experts: gate, up [E, I, H] and down [E, H, I], float32 or bf16 as uint16."""
    if gate.ndim != 3 or up.shape != gate.shape or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1]):
        raise ValueError(f"want gate, up [E, I, H] and down [E, H, I]; got {gate.shape}, {up.shape}, {down.shape}")
    n_experts, width, hidden = gate.shape
    writer = MemoryLayerWriter(fmt, n_experts, hidden, width)
    for e in range(n_experts):
        writer.write_expert(e, gate[e], up[e], down[e])
    return writer.close()


def _manifest(fmt: Format, n_experts: int, hidden: int, width: int, arrays: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt.name,
        "group_size": fmt.group_size,
        "tile_rows": fmt.spec.tile_rows,
        "n_experts": n_experts,
        "hidden": hidden,
        "width": width,
        "files": {k: {"file": f"{k}.npy", "dtype": str(a.dtype), "shape": list(a.shape)} for k, a in arrays.items()},
    }


def _write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / (MANIFEST + _TMP)
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)


def save_store(store: ExpertStore, directory) -> Path:
    """Write `store` to `directory` (created if missing) in the layout above; returns the directory."""
    if store.formats or store.fmt.spec.quantize is None:
        raise ValueError(f"a store in {store.fmt} is read from its .gguf file; save_store writes hybrid's formats")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for name in PROJECTIONS:
        for key, array in ((f"{name}.values", store.values[name]), (f"{name}.scales", store.scales[name])):
            if _stored(store.fmt, key):
                arrays[key] = array
    for key, array in arrays.items():
        tmp = directory / f"{key}.npy{_TMP}"
        with open(tmp, "wb") as f:
            np.lib.format.write_array(f, np.ascontiguousarray(array), version=(1, 0))
        os.replace(tmp, directory / f"{key}.npy")
    _write_manifest(directory, _manifest(store.fmt, store.n_experts, store.hidden, store.width, arrays))
    return directory


def read_manifest(directory) -> dict:
    """The parsed manifest.json of a store directory; ValueError naming the file if missing or unsupported."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path}: no manifest; not a complete expert store")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    tile_rows = _manifest_format(manifest, path).spec.tile_rows
    if manifest.get("tile_rows") != tile_rows:
        raise ValueError(f"{path}: tile_rows {manifest.get('tile_rows')!r}, this code uses {tile_rows}")
    return manifest


def _manifest_format(manifest: dict, path: Path) -> Format:
    try:
        return Format(manifest.get("format"), manifest.get("group_size"))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def load_store(directory, mmap: bool = True) -> ExpertStore:
    """Open a store directory; with mmap=True the arrays are read-only memory maps (nothing is read yet)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    fmt = _manifest_format(manifest, directory / MANIFEST)
    mode = "r" if mmap else None
    return _assemble(fmt, manifest["n_experts"], manifest["hidden"], manifest["width"],
                     lambda key: np.load(directory / f"{key}.npy", mmap_mode=mode))
