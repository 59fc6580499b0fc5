"""Checkpoint: a Hugging Face safetensors folder (sharded through model.safetensors.index.json, or one file).

Opening reads config.json and the safetensors headers only (a few MB for K2's 62 shards, ~1 TB), checks
every shard against its header and every tensor against config.json, and raises one CheckpointError that
names the file and tensor on the first disagreement, so a bad download fails before any generation starts.
Tensor data is read later, one tensor at a time, through safetensors' mmap.

safetensors layout (what `read_header` checks): 8-byte little-endian header length N, N bytes of JSON
{name: {dtype, shape, data_offsets: [begin, end]}}, then the data; offsets count from byte 8 + N.
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from hybrid.read import fp8, int4, names
from hybrid.read.config import ModelConfig, load_config
from hybrid.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1}
FLOAT_DTYPES = ("BF16", "F16", "F32")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a larger length field means a corrupt file


@dataclass(frozen=True)
class TensorInfo:
    name: str
    path: Path
    dtype: str  # safetensors dtype string: BF16, F32, F8_E4M3, ...
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header and check that every tensor's bytes lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        info = _tensor_info(path, name, meta)
        begin, end = meta["data_offsets"]
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets {meta['data_offsets']} do not hold "
                                  f"{info.dtype}{list(info.shape)} ({info.nbytes} bytes)")
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {8 + n + end}, file has {size}")
        out[name] = info
    return out


def _tensor_info(path: Path, name: str, meta) -> TensorInfo:
    try:
        dtype, shape, offsets = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        ok = dtype in DTYPE_BYTES and all(isinstance(d, int) and d >= 0 for d in shape) and len(offsets) == 2
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path}: tensor {name}: corrupt header entry {meta!r}")
    return TensorInfo(name, path, dtype, shape)


class Checkpoint:
    """An opened, validated checkpoint folder: its ModelConfig and a lazy view of its tensors."""

    def __init__(self, folder: Path, config: ModelConfig, tensors: dict[str, TensorInfo]):
        self.folder, self.config, self.tensors = folder, config, tensors
        self._handles = {}

    @classmethod
    def open(cls, folder) -> "Checkpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder}: not a checkpoint folder")
        config = load_config(folder / "config.json")
        ckpt = cls(folder, config, _list_tensors(folder))
        ckpt.validate()
        return ckpt

    def validate(self):
        """Every tensor config.json implies is present with its shape and a float or block-FP8 dtype (routed
        experts of a pack-quantized INT4 checkpoint: its three tensors, checked by _check_int4)."""
        cfg, expected = self.config, names.expected_tensors(self.config)
        for name, shape in expected.items():
            if names.int4_stored(name, cfg):
                self._check_int4(name, shape)
                continue
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self.folder}: tensor {name} is missing (config.json {cfg.source} implies it)")
            if info.shape != shape:
                raise CheckpointError(f"{info.path}: tensor {name} has shape {list(info.shape)}, "
                                      f"config.json implies {list(shape)}")
            if info.dtype == "F8_E4M3":
                self._check_fp8(info)
            elif info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{info.path}: tensor {name} has dtype {info.dtype}; expected one of "
                                      f"{', '.join(FLOAT_DTYPES)} or F8_E4M3 with {names.SCALE_SUFFIX}")
        for name, info in self.tensors.items():
            owner = names.owner_of(name, cfg)
            if owner not in expected and not names.ignored(name, cfg):
                raise CheckpointError(f"{info.path}: tensor {name} is not part of the model config.json describes "
                                      f"({cfg.source})")

    def _check_fp8(self, info: TensorInfo):
        block = self.config.fp8_block
        if block is None:
            raise CheckpointError(f"{info.path}: tensor {info.name} is float8 but config.json has no quantization_config")
        if not names.quantizable(info.name):
            raise CheckpointError(f"{info.path}: tensor {info.name} is float8, but this tensor is never block-FP8")
        sname = names.scale_name(info.name)
        scale = self.tensors.get(sname)
        want = fp8.scale_shape(info.shape, block)
        if scale is None:
            raise CheckpointError(f"{self.folder}: tensor {sname} is missing (scale of float8 tensor {info.name})")
        if scale.shape != want or scale.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{scale.path}: tensor {sname} is {scale.dtype}{list(scale.shape)}; expected "
                                  f"F32{list(want)} for {info.name}{list(info.shape)} in {block[0]}x{block[1]} blocks")

    def _check_int4(self, name: str, shape: tuple[int, int]):
        """weight_packed int32, weight_scale bf16/f16/f32 and weight_shape int32/int64 holding `shape`, their shapes
        those of `shape` in the config's groups (hybrid/read/int4.py)."""
        group = self.config.int4_group
        dtypes = (("I32",), FLOAT_DTYPES, ("I32", "I64"))
        wants = zip(int4.tensor_names(name), int4.stored_shapes(shape, group), dtypes)
        for part, want_shape, allowed in wants:
            info = self.tensors.get(part)
            if info is None:
                raise CheckpointError(f"{self.folder}: tensor {part} is missing (config.json {self.config.source} "
                                      f"stores routed experts as pack-quantized INT4)")
            if info.shape != want_shape or info.dtype not in allowed:
                raise CheckpointError(f"{info.path}: tensor {part} is {info.dtype}{list(info.shape)}; expected "
                                      f"{' or '.join(allowed)}{list(want_shape)} for {name}{list(shape)} in groups of "
                                      f"{group}")
        part = int4.tensor_names(name)[2]
        stored = self.raw(part).tolist()
        if stored != list(shape):
            raise CheckpointError(f"{self.tensors[part].path}: tensor {part} holds {stored}; config.json implies "
                                  f"{list(shape)}")

    def is_fp8(self, name: str) -> bool:
        info = self.tensors.get(name)
        return info is not None and info.dtype == "F8_E4M3"

    def is_int4(self, name: str) -> bool:
        """Whether `name` (a routed expert's `...proj.weight`) is stored pack-quantized INT4."""
        return names.int4_stored(name, self.config)

    def int4_parts(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """A pack-quantized expert projection as stored: weight_packed (int32 [n_out, n_in / 8]) and weight_scale
        (bf16 bits as uint16, or float32, [n_out, n_in / G]) as numpy, for hybrid.read.int4.to_store."""
        packed_name, scale_name, _ = int4.tensor_names(name)
        packed = self.raw(packed_name).numpy()
        scale = self.raw(scale_name)
        if scale.dtype == torch.bfloat16:
            return packed, scale.view(torch.int16).numpy().view(np.uint16)
        return packed, scale.float().numpy()

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (float8 stays float8), read through the shard's mmap."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name}")
        handle = self._handles.get(info.path)
        if handle is None:
            handle = self._handles[info.path] = safe_open(str(info.path), framework="pt", device="cpu")
        return handle.get_tensor(name)

    def weight(self, name: str, dtype=torch.float32) -> torch.Tensor:
        """The tensor in `dtype`; block-FP8 is first dequantized to bf16, as DeepSeek's reference conversion does,
        so an FP8 checkpoint yields exactly the weights of its converted bf16 twin. A pack-quantized INT4 expert is
        q * scale in float32 (exact), then cast: in bf16 exactly what compressed-tensors' decompression gives."""
        if self.is_int4(name):
            packed_name, scale_name, _ = int4.tensor_names(name)
            return int4.dequantize(self.raw(packed_name), self.raw(scale_name), self.config.int4_group, dtype)
        t = self.raw(name)
        if t.dtype == torch.float8_e4m3fn:
            t = fp8.dequantize(t, self.raw(names.scale_name(name)), self.config.fp8_block, torch.bfloat16)
        return t.to(dtype)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())


def contained(folder: Path, name, origin: str) -> Path:
    """`folder / name`, if that file lies inside the checkpoint folder; else a one-line CheckpointError.

    An index is downloaded data: unchecked, a weight_map value of '../../etc/passwd' or '/etc/passwd' would be
    opened, and one naming a valid shard outside the folder would be loaded and run. `name` must be a relative
    path that stays inside `folder`, and so must its target once resolved, so a symlink out is refused too.
    The one exception is the Hugging Face hub cache (where a download without --local-dir lands): it keeps each
    file once as models--ORG--NAME/blobs/HASH and lays a revision out as models--ORG--NAME/snapshots/REV/FILE,
    a symlink to ../../blobs/HASH. So when `folder` is such a snapshots/REV folder, a target in that same
    repository's blobs folder is allowed; nothing else outside. `origin` starts the error ("INDEX: tensor X
    names shard"). Returns the unresolved path, so shard names (and the store's record of them) stay readable.
    """
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{origin} {name!r}; expected a file name relative to the checkpoint folder")
    lexical = os.path.normpath(name)
    if os.path.isabs(name) or lexical == os.pardir or lexical.startswith(os.pardir + os.sep):
        raise CheckpointError(f"{origin} {name!r}, which is outside the checkpoint folder")
    path = folder / name
    try:
        root, target = folder.resolve(), path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte in the name
        raise CheckpointError(f"{origin} {name!r}, which cannot be resolved ({e})") from None
    if target.is_relative_to(root):
        return path
    hub_repo = root.parent.parent
    if root.parent.name == "snapshots" and hub_repo.name.startswith("models--") \
            and target.is_relative_to(hub_repo / "blobs"):
        return path
    raise CheckpointError(f"{origin} {name!r}, which is outside the checkpoint folder (it resolves to {target})")


def _list_tensors(folder: Path) -> dict[str, TensorInfo]:
    index_path = folder / INDEX_FILE
    if not index_path.is_file():
        single = contained(folder, SINGLE_FILE, f"{folder}: shard")
        if not single.is_file():
            raise CheckpointError(f"{folder}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
        return read_header(single)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index_path}: not a safetensors index (needs a 'weight_map' object)") from None
    paths = {}  # shard name as the index writes it -> its path, checked once per shard
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in paths:
            paths[shard] = contained(folder, shard, f"{index_path}: tensor {name} names shard")
    headers = {}
    for shard in sorted(paths):
        path = paths[shard]
        if not path.is_file():
            raise CheckpointError(f"{path}: shard named by {INDEX_FILE} is missing")
        headers[shard] = read_header(path)
    tensors = {}
    for name, shard in weight_map.items():
        info = headers[shard].get(name)
        if info is None:
            raise CheckpointError(f"{folder / shard}: tensor {name} is named by {INDEX_FILE} but not in this shard")
        tensors[name] = info
    return tensors
