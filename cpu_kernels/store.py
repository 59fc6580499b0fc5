"""The expert store: one MoE layer's routed experts, laid out for streaming, saved as memory-mappable files.

Dimension legend: E experts, H hidden, I expert width, G group size, R = TILE_ROWS (128) rows per tile,
nt = ceil(n_out / R) tiles, ng = n_in / G groups. Projections use the checkpoint's names: gate_proj [I, H],
up_proj [I, H], down_proj [H, I] per expert ([n_out, n_in], as in `nn.Linear.weight`).

Byte layout (format version 1; a format users keep, change it only with a new version number)
----------------------------------------------------------------------------------------------
A layer store is a directory:

    manifest.json             written last; its presence marks a complete store
    gate_proj.values.npy      up_proj.values.npy      down_proj.values.npy
    gate_proj.scales.npy      up_proj.scales.npy      down_proj.scales.npy     (int8 / int4 only)

Each .npy file is numpy's format 1.0 (a small header, then the array's raw bytes in C order, little-endian), so
`np.load(path, mmap_mode="r")` maps it without reading it. For every projection, all E experts are one array
whose first axis is the expert, so one expert is one contiguous byte range and, inside it, each row tile is one
contiguous byte range: a kernel thread streams sequentially through the tiles it owns.

A matrix [n_out, n_in] is cut into nt row tiles of R rows; rows past n_out in the last tile are zero. Inside a
tile the rows are the fastest-varying axis (element (row r, column c) of tile t sits next to (r + 1, c)), so the
kernels' inner loop runs over 128 consecutive rows with one input element as a broadcast scalar (see decode.py).

    bf16   values uint16 [E, nt, n_in, R]:        values[e, t, c, r] = bf16 bits of W_e[t*R + r, c]
    int8   values int8   [E, nt, ng, G, R]:       W_e[t*R + r, g*G + j] = values[e, t, g, j, r] * scales[e, t, g, r]
           scales float32 [E, nt, ng, R]
    int4   values uint8  [E, nt, ng, G/2, R]:     byte b = values[e, t, g, k, r] holds two 4-bit codes:
           scales float32 [E, nt, ng, R]          low nibble  -> column g*G + 2k,     value (b & 15) - 8
                                                  high nibble -> column g*G + 2k + 1, value (b >> 4) - 8
                                                  W_e[row, col] = value * scales[e, t, g, r]

bf16 stores no scales files (in memory its scales are empty [E, nt, 0, 0] placeholders). manifest.json holds
{"format_version", "format", "group_size", "tile_rows", "n_experts", "hidden", "width",
"files": {name: {"file", "dtype", "shape"}}}. Every file is written under a
temporary name and moved into place with os.replace, the manifest last, so a crash never leaves a store that
looks complete.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .formats import TILE_ROWS, Format, scale_shape, value_dtype_name, value_shape
from .quantize import quantize_matrix

FORMAT_VERSION = 1
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MANIFEST = "manifest.json"
_TMP = ".tmp"


def projection_shape(name: str, hidden: int, width: int) -> tuple[int, int]:
    """[n_out, n_in] of one expert's projection `name` (gate_proj, up_proj or down_proj)."""
    return (hidden, width) if name == "down_proj" else (width, hidden)


@dataclass(frozen=True)
class ExpertStore:
    """One layer's experts in format `fmt`: values[name] and scales[name] for name in PROJECTIONS.

    Arrays have the shapes documented above, with E = n_experts leading.
    bf16 scales are empty [E, nt, 0, 0] placeholders. Arrays may be read-only memory maps.
    """

    fmt: Format
    n_experts: int
    hidden: int
    width: int
    values: dict
    scales: dict

    def __post_init__(self):
        for name in PROJECTIONS:
            n_out, n_in = projection_shape(name, self.hidden, self.width)
            want_v = (self.n_experts,) + value_shape(self.fmt, n_out, n_in)
            v = self.values.get(name)
            if v is None or v.shape != want_v or v.dtype != np.dtype(value_dtype_name(self.fmt)):
                got = None if v is None else (v.shape, str(v.dtype))
                raise ValueError(f"{name} values: want {want_v} {value_dtype_name(self.fmt)}, got {got}")
            want_s = (self.n_experts,) + scale_shape(self.fmt, n_out, n_in)
            s = self.scales.get(name)
            if s is None or s.shape != want_s or s.dtype != np.float32:
                got = None if s is None else (s.shape, str(s.dtype))
                raise ValueError(f"{name} scales: want {want_s} float32, got {got}")
            if not (v.flags.c_contiguous and s.flags.c_contiguous):
                raise ValueError(f"{name} values and scales must be C-contiguous")

    @property
    def nbytes(self) -> int:
        return sum(self.values[n].nbytes + self.scales[n].nbytes for n in PROJECTIONS)


def _empty_scales(fmt: Format, n_experts: int, n_out: int, n_in: int) -> np.ndarray:
    return np.zeros((n_experts,) + scale_shape(fmt, n_out, n_in), np.float32)


def build_store(gate: np.ndarray, up: np.ndarray, down: np.ndarray, fmt: Format) -> ExpertStore:
    """Quantize in-memory experts: gate, up [E, I, H] and down [E, H, I], float32 or bf16 as uint16."""
    if gate.ndim != 3 or up.shape != gate.shape or down.shape != (gate.shape[0], gate.shape[2], gate.shape[1]):
        raise ValueError(f"want gate, up [E, I, H] and down [E, H, I]; got {gate.shape}, {up.shape}, {down.shape}")
    n_experts, width, hidden = gate.shape
    values, scales = {}, {}
    for name, w in zip(PROJECTIONS, (gate, up, down)):
        n_out, n_in = projection_shape(name, hidden, width)
        values[name] = np.empty((n_experts,) + value_shape(fmt, n_out, n_in), value_dtype_name(fmt))
        scales[name] = _empty_scales(fmt, n_experts, n_out, n_in)
        for e in range(n_experts):
            v, s = quantize_matrix(w[e], fmt)
            values[name][e] = v
            if fmt.quantized:
                scales[name][e] = s
    return ExpertStore(fmt, n_experts, hidden, width, values, scales)


def _manifest(fmt: Format, n_experts: int, hidden: int, width: int, arrays: dict) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt.name,
        "group_size": fmt.group_size,
        "tile_rows": TILE_ROWS,
        "n_experts": n_experts,
        "hidden": hidden,
        "width": width,
        "files": {k: {"file": f"{k}.npy", "dtype": str(a.dtype), "shape": list(a.shape)} for k, a in arrays.items()},
    }


def _write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / (MANIFEST + _TMP)
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)


def _store_arrays(store: ExpertStore) -> dict:
    arrays = {}
    for name in PROJECTIONS:
        arrays[f"{name}.values"] = store.values[name]
        if store.fmt.quantized:
            arrays[f"{name}.scales"] = store.scales[name]
    return arrays


def save_store(store: ExpertStore, directory) -> Path:
    """Write `store` to `directory` (created if missing) in the layout above; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = _store_arrays(store)
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
    if manifest.get("tile_rows") != TILE_ROWS:
        raise ValueError(f"{path}: tile_rows {manifest.get('tile_rows')!r}, this code uses {TILE_ROWS}")
    return manifest


def load_store(directory, mmap: bool = True) -> ExpertStore:
    """Open a store directory; with mmap=True the arrays are read-only memory maps (nothing is read yet)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    fmt = Format(manifest["format"], manifest["group_size"])
    values, scales = {}, {}
    for name in PROJECTIONS:
        values[name] = np.load(directory / f"{name}.values.npy", mmap_mode="r" if mmap else None)
        if fmt.quantized:
            scales[name] = np.load(directory / f"{name}.scales.npy", mmap_mode="r" if mmap else None)
        else:
            n_out, n_in = projection_shape(name, manifest["hidden"], manifest["width"])
            scales[name] = _empty_scales(fmt, manifest["n_experts"], n_out, n_in)
    return ExpertStore(fmt, manifest["n_experts"], manifest["hidden"], manifest["width"], values, scales)


class LayerStoreWriter:
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
        self.fmt, self.n_experts, self.hidden, self.width = fmt, n_experts, hidden, width
        self._written = np.zeros(n_experts, bool)
        self._arrays = {}
        for name in PROJECTIONS:
            n_out, n_in = projection_shape(name, hidden, width)
            self._open(f"{name}.values", (n_experts,) + value_shape(fmt, n_out, n_in), value_dtype_name(fmt))
            if fmt.quantized:
                self._open(f"{name}.scales", (n_experts,) + scale_shape(fmt, n_out, n_in), "float32")

    def _open(self, key: str, shape: tuple, dtype: str) -> None:
        path = self.directory / f"{key}.npy{_TMP}"
        self._arrays[key] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape, version=(1, 0))

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
            if self.fmt.quantized:
                self._arrays[f"{name}.scales"][e] = s
        self._written[e] = True

    def close(self) -> Path:
        missing = np.flatnonzero(~self._written)
        if missing.size:
            raise ValueError(f"experts {missing[:8].tolist()} of {self.n_experts} were never written")
        for key, array in self._arrays.items():
            array.flush()
            os.replace(self.directory / f"{key}.npy{_TMP}", self.directory / f"{key}.npy")
        _write_manifest(self.directory, _manifest(self.fmt, self.n_experts, self.hidden, self.width, self._arrays))
        self._arrays = {}
        return self.directory

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
