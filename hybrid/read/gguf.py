"""GGUF checkpoints: llama.cpp's `deepseek2` files (Unsloth's Kimi-K2 quants) read as a checkpoint.

A GGUF model is one file or a set of splits `NAME-00001-of-0000N.gguf`: each split is a complete GGUF file
with its own header and offsets, the first holds the model's metadata, and no tensor spans two. Opening
parses every header, checks it against the metadata and maps every file (np.memmap); tensor bytes are read
only when a weight is asked for, and `expert_blocks` hands out zero-copy views of the mapped bytes.

File layout (little-endian; what `read_gguf_file` parses): "GGUF", u32 version (2 or 3), u64 tensor count,
u64 key count; the keys (string name, u32 value type, value; a string is u64 length + UTF-8, an array is u32
item type + u64 count + items); the tensor infos (name, u32 n_dims, u64 dims innermost first, u32 ggml type,
u64 offset); then the data, from the next multiple of `general.alignment` (32), each tensor at data start +
offset. The header is parsed here, not with gguf.GGUFReader: that reader slices numpy once per array item and
took ~10 s over K2's 163,840-token vocabulary. The `gguf` package (gguf-py) supplies the ggml type table and
dequantizes; its reader is the tests' oracle for this parser.

Names: every GGUF tensor maps to its Hugging Face name (the table below; names.py is the contract), so a
GGUF checkpoint offers the loader what a safetensors Checkpoint does. Two differ in form:
- routed experts: `blk.L.ffn_{gate,up,down}_exps.weight` holds a layer's E experts, ggml shape [in, out, E]
  (numpy [E, out, in]): expert e is one contiguous slab, `model.layers.L.mlp.experts.e.*_proj.weight`.
- MLA: llama.cpp's converter (DeepseekV2Model.modify_tensors) views kv_b_proj [Hh*(N+V), R] as [Hh, N+V, R],
  splits it into K [Hh, N, R] and V [Hh, V, R] and stores attn_k_b = K transposed to [Hh, R, N] and attn_v_b =
  V; files converted before April 2025 store the unsplit attn_kv_b. kv_b_proj is rebuilt from either.

Longer than ~400 lines because the container parser, the metadata-to-config table and the checkpoint it
feeds are one format's knowledge, read together.
"""

import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from hybrid.errors import CheckpointError, ConfigError
from hybrid.read import names
from hybrid.read.config import ModelConfig, parse_config

try:
    import gguf
except ImportError:  # only GGUF checkpoints need it; the rest of hybrid runs without
    gguf = None

ARCH = "deepseek2"
K2_PRE_TOKENIZER = "kimi-k2"
SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
DEFAULT_ALIGNMENT = 32
FLOAT_TYPES = ("F32", "F16", "BF16")
# Every type gguf-py dequantizes (in numpy, the oracle the CPU kernels are checked against).
SUPPORTED_TYPES = FLOAT_TYPES + ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                 "TQ1_0", "TQ2_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                                 "IQ3_S", "IQ4_NL", "IQ4_XS", "MXFP4")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # tokenizer.ggml.token_type values
GATING_SOFTMAX, GATING_SIGMOID = 1, 2  # deepseek2.expert_gating_func
SPECIAL_TOKEN_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                     "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
LAYER_NAMES = {  # blk.L.<GGUF> -> model.layers.L.<Hugging Face>
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",  # models without q LoRA
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",  # dense layers
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",  # router
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
}
EXPERT_NAMES = {"ffn_gate_exps.weight": "gate_proj", "ffn_up_exps.weight": "up_proj",
                "ffn_down_exps.weight": "down_proj"}
K_B, V_B, KV_B = "attn_k_b.weight", "attn_v_b.weight", "attn_kv_b.weight"
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as one printable character, so BPE vocab entries (tokenizer.json,
    GGUF token lists) are strings. Printable Latin-1 bytes stand for themselves; the other 68 bytes map to 256,
    257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(table.items()))


# ---- the container ------------------------------------------------------------------------------------------

_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6
_INT_TYPES, _FLOAT_VALUE_TYPES, _BOOL = (0, 1, 2, 3, 4, 5, 10, 11), (6, 12), 7
_VALUE_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
                     7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}


class Field(NamedTuple):
    type: int  # GGUF value type (4 = uint32, 8 = string, 9 = array, ...)
    value: object  # int/float/bool/str; an array: a numpy array of numbers or a list of values
    item_type: int | None = None  # for arrays


class RawTensor(NamedTuple):
    name: str
    type_name: str  # ggml type: F32, Q4_K, IQ1_M, ...
    ggml_shape: tuple[int, ...]  # innermost first, as the file writes it
    offset: int  # from the start of the file
    nbytes: int


class GGUFFile:
    """One parsed, memory-mapped GGUF file: its keys, its tensor table and zero-copy views of tensor data."""

    def __init__(self, path: Path, fields: dict[str, Field], tensors: dict[str, RawTensor], data: np.memmap):
        self.path, self.fields, self.tensors = path, fields, tensors
        self.data = data.view(np.ndarray)  # the whole file, read-only; plain ndarray views for the kernels

    def view(self, name: str) -> np.ndarray:
        """The tensor's bytes as numpy, numpy order (outermost first), no copy: float32/float16 for F32/F16,
        uint16 bf16 bits for BF16, uint8 [..., bytes per row] for block-quantized types."""
        t = self.tensors[name]
        shape = t.ggml_shape[::-1]
        raw = self.data[t.offset:t.offset + t.nbytes]
        if t.type_name in FLOAT_TYPES:
            return raw.view({"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[t.type_name]).reshape(shape)
        return raw.reshape(*shape[:-1], -1)


def read_gguf_file(path: Path) -> GGUFFile:
    """Parse one file's header and check that every tensor's bytes lie inside it."""
    try:
        data = np.memmap(path, mode="r")
    except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
        raise CheckpointError(f"{path}: cannot read ({e})") from None
    if bytes(data[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic at its start)")
    try:
        return _parse(path, data)
    except (struct.error, UnicodeDecodeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated GGUF header ({e})") from None


class _Cursor:
    """Reads GGUF values one after another from a mapped file."""

    def __init__(self, data: np.memmap, pos: int):
        self.data, self.buf, self.pos = data, memoryview(data), pos

    def scalar(self, fmt: str):
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.scalar("Q")
        if self.pos + n > len(self.buf):
            raise ValueError("a string runs past the end of the file")
        self.pos += n
        return str(self.buf[self.pos - n:self.pos], "utf-8")

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        item, n = self.scalar("I"), self.scalar("Q")
        size = np.dtype("<" + _SCALARS[item]).itemsize if item in _SCALARS else 8  # strings, arrays: >= 8 each
        if n * size > len(self.buf) - self.pos:
            raise ValueError("an array runs past the end of the file")
        if item in _SCALARS:  # numbers: a view, not n Python objects
            self.pos += n * size
            return Field(_ARRAY, np.frombuffer(self.data, "<" + _SCALARS[item], n, self.pos - n * size), item)
        return Field(_ARRAY, [self.value(item) for _ in range(n)], item)


def _parse(path: Path, data: np.memmap) -> GGUFFile:
    c = _Cursor(data, 4)
    version = c.scalar("I")
    if version not in (2, 3):
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        what = "big-endian GGUF files are not supported" if swapped in (2, 3) else f"GGUF version {version}"
        raise CheckpointError(f"{path}: {what}; expected a little-endian GGUF version 2 or 3")
    n_tensors, n_keys = c.scalar("Q"), c.scalar("Q")
    fields = {}
    for _ in range(n_keys):
        key, vtype = c.string(), c.scalar("I")
        v = c.value(vtype)
        if key in fields:
            raise CheckpointError(f"{path}: GGUF key '{key}' appears twice")
        fields[key] = v if isinstance(v, Field) else Field(vtype, v)
    infos = []
    for _ in range(n_tensors):
        name, n_dims = c.string(), c.scalar("I")
        dims = tuple(c.scalar("Q") for _ in range(n_dims))
        infos.append((name, dims, c.scalar("I"), c.scalar("Q")))
    align = fields.get("general.alignment", Field(4, DEFAULT_ALIGNMENT))
    if align.type not in _INT_TYPES or align.value <= 0 or align.value & (align.value - 1):
        raise CheckpointError(f"{path}: GGUF key 'general.alignment' must be a power of two, got {align.value!r}")
    start = -(-c.pos // align.value) * align.value
    tensors = {}
    for name, dims, type_id, offset in infos:
        t = _raw_tensor(path, name, dims, type_id, start + offset)
        if name in tensors:
            raise CheckpointError(f"{path}: tensor {name} appears twice")
        if t.offset + t.nbytes > len(data):
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {t.offset + t.nbytes}, "
                                  f"file has {len(data)}")
        tensors[name] = t
    return GGUFFile(path, fields, tensors, data)


def _raw_tensor(path, name, dims, type_id, offset) -> RawTensor:
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise CheckpointError(f"{path}: tensor {name} has unknown ggml type {type_id}") from None
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    if not dims or dims[0] % block:
        raise CheckpointError(f"{path}: tensor {name} has shape {list(dims)}: rows must be whole {qtype.name} "
                              f"blocks of {block}")
    return RawTensor(name, qtype.name, dims, offset, int(np.prod(dims)) // block * type_bytes)


# ---- which files ----------------------------------------------------------------------------------------------

def shard_paths(path: Path) -> list[Path]:
    """The files of the model at `path`: a folder holding one .gguf file or one split set, a single file, or
    any split of a set (the set is completed from its name: NAME-0000k-of-0000n.gguf)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".gguf" and p.is_file())
        models = sorted({m["stem"] if (m := SPLIT_NAME.match(p.name)) else p.name for p in files})
        if not files:
            raise CheckpointError(f"{path}: no .gguf file in this folder")
        if len(models) > 1:
            raise CheckpointError(f"{path}: holds {len(models)} GGUF models ({', '.join(models)}); name one file")
        path = files[0]
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file or folder")
    m = SPLIT_NAME.match(path.name)
    if m is None:
        return [path]
    count = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for i, p in enumerate(paths, 1):
        if not p.is_file():
            raise CheckpointError(f"{p}: split {i} of {count} is missing")
    return paths


def _check_splits(files: list[GGUFFile]):
    count = len(files)
    for i, f in enumerate(files):
        meta = Metadata(f)
        n = meta.int("split.count", optional=True, minimum=0)
        if count == 1:
            if n not in (None, 0, 1):
                raise CheckpointError(f"{f.path}: split.count is {n}, but the file is not named as split 1 of "
                                      f"{n} (NAME-00001-of-{n:05d}.gguf)")
            continue
        no = meta.int("split.no", minimum=0)
        if (no, n) != (i, count):
            raise CheckpointError(f"{f.path}: split.no/split.count say split {no + 1} of {n}; its name says "
                                  f"{i + 1} of {count}")
    total = sum(len(f.tensors) for f in files)
    declared = Metadata(files[0]).int("split.tensors.count", optional=True, minimum=0)
    if declared is not None and count > 1 and declared != total:
        raise CheckpointError(f"{files[0].path}: split.tensors.count is {declared}, the {count} splits hold {total}")


# ---- metadata -> ModelConfig ----------------------------------------------------------------------------------

class Metadata:
    """Typed access to one file's GGUF keys; a missing or mistyped key is one ConfigError naming file and key."""

    def __init__(self, f: GGUFFile):
        self.path, self.fields = f.path, f.fields

    def _get(self, key, optional, allowed, what):
        f = self.fields.get(key)
        if f is None:
            if optional:
                return None
            raise ConfigError(f"{self.path}: GGUF key '{key}' is missing")
        if f.type not in allowed:
            item = f" of {_VALUE_TYPE_NAMES.get(f.item_type, '?')}" if f.type == _ARRAY else ""
            raise ConfigError(f"{self.path}: GGUF key '{key}' must be {what}, got {_VALUE_TYPE_NAMES[f.type]}{item}")
        return f

    def int(self, key, optional=False, default=None, minimum=1):
        f = self._get(key, optional or default is not None, _INT_TYPES, "an integer")
        if f is None:
            return default
        if f.value < minimum:
            raise ConfigError(f"{self.path}: GGUF key '{key}' must be >= {minimum}, got {f.value}")
        return int(f.value)

    def float(self, key, optional=False, default=None):
        """A float32 key reads as the shortest decimal that rounds to it (2.827, not 2.8269999027)."""
        f = self._get(key, optional or default is not None, _INT_TYPES + _FLOAT_VALUE_TYPES, "a number")
        if f is None:
            return default
        return float(str(np.float32(f.value))) if f.type == _FLOAT32 else float(f.value)

    def bool(self, key, default=None):
        f = self._get(key, default is not None, (_BOOL,), "true or false")
        return default if f is None else bool(f.value)

    def str(self, key, optional=False, default=None):
        f = self._get(key, optional or default is not None, (_STRING,), "a string")
        return default if f is None else f.value

    def array(self, key, item_types, what) -> list | np.ndarray:
        f = self._get(key, False, (_ARRAY,), what)
        if f.item_type not in item_types:
            raise ConfigError(f"{self.path}: GGUF key '{key}' must be {what}, got an array of "
                              f"{_VALUE_TYPE_NAMES.get(f.item_type, '?')}")
        return f.value


def model_config(meta: Metadata, tensor_names) -> ModelConfig:
    """The Hugging Face config a deepseek2 GGUF was converted from, rebuilt from its metadata (and whether it
    holds a router correction bias) and checked by parse_config like any config.json."""
    a = ARCH + "."
    rope = meta.int(a + "rope.dimension_count")
    if a + "attention.key_length_mla" in meta.fields:
        qk_key, v_key = a + "attention.key_length_mla", a + "attention.value_length_mla"
    else:  # converted before MLA was stored as MQA: key/value_length are the per-head sizes
        qk_key, v_key = a + "attention.key_length", a + "attention.value_length"
    qk = meta.int(qk_key)
    if qk <= rope:
        raise ConfigError(f"{meta.path}: GGUF key '{qk_key}' ({qk}) must exceed {a}rope.dimension_count ({rope})")
    gating = meta.int(a + "expert_gating_func", default=GATING_SOFTMAX)
    if gating not in (GATING_SOFTMAX, GATING_SIGMOID):
        raise ConfigError(f"{meta.path}: GGUF key '{a}expert_gating_func' is {gating}; supported: 1 (softmax), "
                          f"2 (sigmoid)")
    n_group = meta.int(a + "expert_group_count", default=1)
    has_bias = any(n.endswith(".exp_probs_b.bias") for n in tensor_names)
    eos = [meta.int(f"tokenizer.ggml.{k}_token_id", optional=True, minimum=0) for k in ("eos", "eot")]
    raw = {
        "model_type": "kimi_k2" if _is_k2(meta) else "deepseek_v3",
        "vocab_size": len(meta.array("tokenizer.ggml.tokens", (_STRING,), "an array of strings")),
        "hidden_size": meta.int(a + "embedding_length"),
        "intermediate_size": meta.int(a + "feed_forward_length"),
        "moe_intermediate_size": meta.int(a + "expert_feed_forward_length"),
        "num_hidden_layers": meta.int(a + "block_count"),
        "num_attention_heads": meta.int(a + "attention.head_count"),
        "q_lora_rank": meta.int(a + "attention.q_lora_rank", optional=True),
        "kv_lora_rank": meta.int(a + "attention.kv_lora_rank"),
        "qk_nope_head_dim": qk - rope,
        "qk_rope_head_dim": rope,
        "v_head_dim": meta.int(v_key),
        "n_routed_experts": meta.int(a + "expert_count"),
        "n_shared_experts": meta.int(a + "expert_shared_count", default=0, minimum=0),
        "num_experts_per_tok": meta.int(a + "expert_used_count"),
        "first_k_dense_replace": meta.int(a + "leading_dense_block_count", default=0, minimum=0),
        "n_group": n_group,
        "topk_group": meta.int(a + "expert_group_used_count", default=1),
        # llama.cpp adds the correction bias when the file has one, and limits groups when there are several.
        "topk_method": "noaux_tc" if has_bias else "group_limited_greedy" if n_group > 1 else "greedy",
        "scoring_func": "sigmoid" if gating == GATING_SIGMOID else "softmax",
        "norm_topk_prob": meta.bool(a + "expert_weights_norm", default=False),
        "routed_scaling_factor": meta.float(a + "expert_weights_scale", default=1.0),
        "rms_norm_eps": meta.float(a + "attention.layer_norm_rms_epsilon"),
        "rope_theta": meta.float(a + "rope.freq_base", default=10000.0),
        "rope_scaling": _rope_scaling(meta),
        "max_position_embeddings": meta.int(a + "context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.int("tokenizer.ggml.bos_token_id", optional=True, minimum=0),
        "eos_token_id": list(dict.fromkeys(i for i in eos if i is not None)),
        "torch_dtype": "bfloat16",
    }
    return parse_config(raw, f"{meta.path} (GGUF metadata)")


def _is_k2(meta: Metadata) -> bool:
    """Kimi-K2 and DeepSeek-V3 share the deepseek2 architecture; K2's tokenizer tells them apart."""
    return meta.str("tokenizer.ggml.pre", default="") == K2_PRE_TOKENIZER


def _rope_scaling(meta: Metadata) -> dict | None:
    a = ARCH + ".rope.scaling."
    kind = meta.str(a + "type", default="none")
    if kind == "none":
        return None
    if kind != "yarn":
        raise ConfigError(f"{meta.path}: GGUF key '{a}type' is {kind!r}; supported: none, yarn")
    # deepseek2 files store 0.1 x mscale_all_dim; mscale equals mscale_all_dim in every DeepSeek-V3-family
    # config, and llama.cpp's deepseek2 graph assumes it (the rotary scale cancels; only the softmax scale moves).
    mscale = float(f"{meta.float(a + 'yarn_log_multiplier', default=0.0) / 0.1:.9g}")
    return {"type": "yarn", "factor": meta.float(a + "factor"),
            "original_max_position_embeddings": meta.int(a + "original_context_length"),
            # Absent from deepseek2 files as llama.cpp's converter writes them (and llama.cpp 0.3.36 ignores them,
            # running 32 and 1). The model's own values are what it was trained with: K2's config.json says 1 and
            # 1, DeepSeek-V3's 32 and 1. So a K2 GGUF runs K2's RoPE here, as transformers does, not llama.cpp's.
            "beta_fast": meta.float(a + "yarn_beta_fast", default=1.0 if _is_k2(meta) else 32.0),
            "beta_slow": meta.float(a + "yarn_beta_slow", default=1.0),
            "mscale": mscale, "mscale_all_dim": mscale}


# ---- GGUF tensors under Hugging Face names --------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    name: str  # Hugging Face name
    path: Path  # the file holding it (attn_k_b's, for a kv_b_proj rebuilt from two)
    dtype: str  # ggml type name: F32, BF16, Q8_0, Q4_K, IQ1_M, ...
    shape: tuple[int, ...]  # Hugging Face (torch) order, in weights
    nbytes: int  # bytes in the file
    sources: tuple[str, ...]  # the GGUF tensor(s) it is read from
    expert: int | None = None  # its slab of a routed-expert tensor


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a one-to-one GGUF tensor; None for experts, MLA's k_b/v_b/kv_b and unknowns."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    m = _BLOCK_NAME.match(gguf_name)
    if m and m[2] in LAYER_NAMES:
        return f"{names.layer_prefix(int(m[1]))}.{LAYER_NAMES[m[2]]}"
    return None


def _hf_tensors(files: list[GGUFFile], n_layers: int) -> dict[str, GGUFTensor]:
    out, mla = {}, {}  # mla: layer -> {K_B/V_B/KV_B: (file, RawTensor)}
    for f in files:
        for name, t in f.tensors.items():
            m = _BLOCK_NAME.match(name)
            if m and int(m[1]) >= n_layers:
                continue  # multi-token-prediction layers past block_count, which the model never reads
            if (hf := hf_name(name)) is not None:
                out[hf] = GGUFTensor(hf, f.path, t.type_name, t.ggml_shape[::-1], t.nbytes, (name,))
            elif m and m[2] in EXPERT_NAMES:
                if len(t.ggml_shape) != 3:
                    raise CheckpointError(f"{f.path}: tensor {name} has shape {list(t.ggml_shape)}; expected "
                                          f"[in, out, experts]")
                n_in, n_out, n_experts = t.ggml_shape
                for e in range(n_experts):
                    key = names.expert_key(int(m[1]), e, EXPERT_NAMES[m[2]])
                    out[key] = GGUFTensor(key, f.path, t.type_name, (n_out, n_in), t.nbytes // n_experts,
                                          (name,), e)
            elif m and m[2] in (K_B, V_B, KV_B):
                mla.setdefault(int(m[1]), {})[m[2]] = (f, t)
            else:
                raise CheckpointError(f"{f.path}: tensor {name} is not part of a {ARCH} model")
    for layer, parts in mla.items():
        info = _kv_b(layer, parts)
        out[info.name] = info
    return out


def stored_types(tensors: dict[str, GGUFTensor]) -> tuple[tuple[str, str], ...]:
    """ModelConfig.stored_types: (names.stored_key, ggml type) per stored tensor, for the planner's byte counts.
    A kv_b_proj whose halves differ in type is counted in the wider one (it is a few MB; never undercounted)."""
    def bytes_per_weight(type_name):
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
        return type_bytes / block

    return tuple({names.stored_key(n): max(i.dtype.split("+"), key=bytes_per_weight)
                  for n, i in tensors.items() if i.expert in (None, 0)}.items())


def _kv_b(layer: int, parts: dict) -> GGUFTensor:
    name = f"{names.layer_prefix(layer)}.self_attn.kv_b_proj.weight"
    if K_B in parts and V_B in parts:
        (fk, k), (_, v) = parts[K_B], parts[V_B]
        if len(k.ggml_shape) != 3 or len(v.ggml_shape) != 3 or k.ggml_shape[1:] != v.ggml_shape[::2]:
            raise CheckpointError(f"{fk.path}: blk.{layer}.{K_B} {list(k.ggml_shape)} and {V_B} {list(v.ggml_shape)} "
                                  f"do not split one kv_b_proj (expected [N, R, Hh] and [R, V, Hh])")
        n_nope, rank, heads = k.ggml_shape
        dtype = k.type_name if k.type_name == v.type_name else f"{k.type_name}+{v.type_name}"
        return GGUFTensor(name, fk.path, dtype, (heads * (n_nope + v.ggml_shape[1]), rank), k.nbytes + v.nbytes,
                          (k.name, v.name))
    if KV_B in parts:
        f, t = parts[KV_B]
        return GGUFTensor(name, f.path, t.type_name, t.ggml_shape[::-1], t.nbytes, (t.name,))
    f, t = next(iter(parts.values()))
    raise CheckpointError(f"{f.path}: blk.{layer} holds {t.name} but not its pair ({K_B} + {V_B}, or {KV_B})")


def open_gguf(path) -> "GGUFCheckpoint":
    """Open and validate a GGUF model: a folder holding one .gguf file or one split set, a file, or a split."""
    if gguf is None:
        raise CheckpointError(f"{path}: reading GGUF files needs the gguf package (pip install gguf)")
    paths = shard_paths(Path(path))
    files = [read_gguf_file(p) for p in paths]
    _check_splits(files)
    meta = Metadata(files[0])
    arch = meta.str("general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"{paths[0]}: general.architecture is {arch!r}; expected {ARCH!r} (Kimi-K2, "
                              f"DeepSeek-V3 family)")
    seen = {}
    for f in files:
        for name in f.tensors:
            if name in seen:
                raise CheckpointError(f"{f.path}: tensor {name} is also in {seen[name]}")
            seen[name] = f.path
    config = model_config(meta, seen)
    tensors = _hf_tensors(files, config.num_hidden_layers)
    ckpt = GGUFCheckpoint(paths[0].parent, replace(config, stored_types=stored_types(tensors)), tensors, files)
    ckpt.validate()
    return ckpt


class GGUFCheckpoint:
    """An opened, validated GGUF model with the interface of hybrid.read.checkpoint.Checkpoint: config (its
    stored_types filled), tensors under Hugging Face names, weight() dequantized; plus the stored blocks
    (expert_blocks for a layer's routed experts, blocks for one matrix) and the tokenizer's pieces."""

    def __init__(self, folder: Path, config: ModelConfig, tensors: dict[str, GGUFTensor], files: list[GGUFFile]):
        self.folder, self.config, self.tensors = folder, config, tensors
        self.files = {f.path: f for f in files}  # path -> parsed, mapped file
        self._files_by_tensor = {name: f for f in files for name in f.tensors}
        self._meta = Metadata(files[0])

    def validate(self):
        """Every tensor the metadata implies is present once, with its shape and a type gguf-py dequantizes;
        norms, router and bias in a float type; nothing else."""
        cfg, expected = self.config, names.expected_tensors(self.config)
        for name, info in self.tensors.items():
            n_experts = self.files[info.path].tensors[info.sources[0]].ggml_shape[-1]
            if info.expert == 0 and n_experts != cfg.n_routed_experts:
                raise CheckpointError(f"{info.path}: tensor {info.sources[0]} holds {n_experts} experts; "
                                      f"{ARCH}.expert_count says {cfg.n_routed_experts}")
            if name not in expected:
                raise CheckpointError(f"{info.path}: tensor {'+'.join(info.sources)} ({name}) is not part of the "
                                      f"model the GGUF metadata describes")
        for name, shape in expected.items():
            info = self.tensors.get(name)
            if info is None:
                raise CheckpointError(f"{self._meta.path}: tensor {_gguf_name(name)} ({name}) is missing; the GGUF "
                                      f"metadata implies it")
            if info.shape != shape:
                raise CheckpointError(f"{info.path}: tensor {'+'.join(info.sources)} holds {name} as "
                                      f"{list(info.shape)}; the GGUF metadata implies {list(shape)}")
            types = FLOAT_TYPES if len(shape) == 1 or name.endswith("mlp.gate.weight") else SUPPORTED_TYPES
            for t in info.dtype.split("+"):
                if t not in types:
                    raise CheckpointError(f"{info.path}: tensor {'+'.join(info.sources)} has type {t}; expected "
                                          f"one of {', '.join(types)}")

    def _view(self, info: GGUFTensor, source: int = 0) -> tuple[str, np.ndarray]:
        """(ggml type, zero-copy view) of one of the GGUF tensors `info` is read from; its slab for an expert."""
        f = self._files_by_tensor[info.sources[source]]
        view = f.view(info.sources[source])
        return f.tensors[info.sources[source]].type_name, view if info.expert is None else view[info.expert]

    def is_fp8(self, name: str) -> bool:
        return False

    def blocks(self, name: str) -> tuple[str, np.ndarray]:
        """(ggml type, the tensor as stored, zero-copy; a routed expert's slab), in the layout expert_blocks
        describes. A kv_b_proj rebuilt from attn_k_b + attn_v_b is no one stored tensor: ValueError."""
        info = self._info(name)
        if len(info.sources) > 1:
            raise ValueError(f"{name} is rebuilt from {' and '.join(info.sources)}; no one tensor stores it")
        return self._view(info)

    def _info(self, name: str) -> GGUFTensor:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.folder}: no tensor {name}")
        return info

    def raw(self, name: str) -> torch.Tensor:
        """The tensor in its stored float dtype (F32, F16, BF16), or dequantized to float32; always a copy."""
        info = self._info(name)
        if len(info.sources) == 1:
            return to_torch(*self._view(info))
        k, v = to_torch(*self._view(info, 0)), to_torch(*self._view(info, 1))  # [Hh, R, N], [Hh, V, R]
        kv = torch.cat([k.float().transpose(1, 2), v.float()], dim=1)  # [Hh, N + V, R]
        return kv.reshape(info.shape).to(k.dtype if k.dtype == v.dtype else torch.float32)

    def weight(self, name: str, dtype=torch.float32) -> torch.Tensor:
        return self.raw(name).to(dtype)

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())

    def expert_blocks(self, layer: int) -> dict[str, tuple[str, np.ndarray]]:
        """proj -> (ggml type name, the layer's routed experts as stored, zero-copy): uint8 [E, out, bytes per row]
        for block-quantized types, float32/float16 [E, out, in] for F32/F16, uint16 bf16 bits for BF16."""
        if layer not in self.config.moe_layers:
            raise ValueError(f"layer {layer} has no routed experts (MoE layers: {self.config.moe_layers})")
        out = {}
        for proj in EXPERT_NAMES.values():
            info = self.tensors[names.expert_key(layer, 0, proj)]
            out[proj] = info.dtype, self.files[info.path].view(info.sources[0])
        return out

    def tokenizer_pieces(self) -> tuple[dict[bytes, int], dict[str, int], dict[str, str], str | None]:
        """K2's tiktoken encoder from the token list: (mergeable ranks = ids of NORMAL tokens, special tokens =
        CONTROL / USER_DEFINED / UNUSED ones, bos/eos/unk/pad strings, the chat template or None)."""
        meta = self._meta
        model, pre = meta.str("tokenizer.ggml.model"), meta.str("tokenizer.ggml.pre", default="default")
        if (model, pre) != ("gpt2", K2_PRE_TOKENIZER):
            raise ConfigError(f"{meta.path}: this GGUF's tokenizer is {model!r} with pre-tokenizer {pre!r}; only "
                              f"Kimi-K2's (gpt2, {K2_PRE_TOKENIZER!r}) can be read from a GGUF file")
        tokens = meta.array("tokenizer.ggml.tokens", (_STRING,), "an array of strings")
        kinds = meta.array("tokenizer.ggml.token_type", _INT_TYPES, "an array of integers")
        if len(kinds) != len(tokens):
            raise ConfigError(f"{meta.path}: GGUF key 'tokenizer.ggml.token_type' has {len(kinds)} entries, "
                              f"tokenizer.ggml.tokens {len(tokens)}")
        to_bytes = {ord(c): chr(b) for b, c in byte_alphabet().items()}
        to_bytes.update({b: None for b in range(256) if b not in to_bytes})  # not in the alphabet: dropped, caught
        ranks, special = {}, {}
        for i, (token, kind) in enumerate(zip(tokens, kinds.tolist())):
            if kind == TOKEN_NORMAL:
                text = token.translate(to_bytes)
                if len(text) != len(token) or max(text, default="\0") > "\xff":
                    raise ConfigError(f"{meta.path}: token {i} ({token!r}) is not spelled in GPT-2's byte alphabet")
                ranks[text.encode("latin-1")] = i
            elif kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED):
                special[token] = i
            else:
                raise ConfigError(f"{meta.path}: token {i} ({token!r}) has type {kind}; a {K2_PRE_TOKENIZER} "
                                  f"vocabulary holds normal, control, user-defined and unused tokens only")
        special_map = {}
        for role, key in SPECIAL_TOKEN_IDS.items():
            i = meta.int(key, optional=True, minimum=0)
            if i is not None:
                if i >= len(tokens):
                    raise ConfigError(f"{meta.path}: GGUF key '{key}' ({i}) is outside the {len(tokens)} tokens")
                special_map[role] = tokens[i]
        return ranks, special, special_map, meta.str("tokenizer.chat_template", optional=True)


def _gguf_name(hf: str) -> str:
    """The GGUF name a Hugging Face tensor is read from (for messages)."""
    for g, h in GLOBAL_NAMES.items():
        if h == hf:
            return g
    layer, rest = names.layer_of(hf), hf.split(".", 3)[-1]
    if (parsed := names.parse_expert_key(hf)) is not None:
        return f"blk.{layer}.{next(g for g, p in EXPERT_NAMES.items() if p == parsed[2])}"
    if rest == "self_attn.kv_b_proj.weight":
        return f"blk.{layer}.{K_B} + {V_B}"
    return f"blk.{layer}." + next((g for g, h in LAYER_NAMES.items() if h == rest), rest)


def to_torch(type_name: str, view: np.ndarray) -> torch.Tensor:
    """A GGUF tensor view as an owned torch tensor: F32/F16/BF16 as stored, block types dequantized to float32."""
    if type_name in ("F32", "F16"):
        return torch.from_numpy(np.array(view))
    if type_name == "BF16":
        return torch.from_numpy(np.array(view).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(gguf.quants.dequantize(view, gguf.GGMLQuantizationType[type_name]))
