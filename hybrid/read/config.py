"""ModelConfig: the DeepSeek-V3-family config.json, parsed and validated once at the edge.

Kimi-K2 (model_type `kimi_k2`), DeepSeek-V3/R1/V3.1 and Moonlight (`deepseek_v3`) share one architecture;
their differences are values here. Every key the model uses is checked; an error names the file and key.
Training-only keys (aux_loss_alpha, seq_aux, initializer_range, num_nextn_predict_layers, ...) are ignored.

Dimension legend: H hidden, I_dense dense-MLP width, I expert width, E routed experts, K top-k, L layers,
R kv_lora_rank, P rope dims (qk_rope_head_dim), N nope dims, V value dims, Hh attention heads.
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from hybrid.errors import ConfigError

MODEL_TYPES = ("deepseek_v3", "kimi_k2")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE extension as DeepSeek configures it (rope_scaling with type/rope_type `yarn`)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    source: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    first_k_dense_replace: int
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: YarnScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    fp8_block: tuple[int, int] | None
    torch_dtype: str
    # A GGUF checkpoint's storage, for the planner to size each tensor by its real type: ((name, ggml type name),
    # ...) with HF names, routed experts once per layer and projection (`stored_key`). Empty for safetensors.
    stored_types: tuple[tuple[str, str], ...] = ()
    # Group size of routed experts stored as compressed-tensors pack-quantized INT4 (K2-Thinking: 32); None for
    # bf16, block-FP8 and GGUF checkpoints. Only the routed experts are INT4; everything else is bf16.
    int4_group: int | None = None

    @property
    def gguf(self) -> bool:
        """Whether the checkpoint is a GGUF file set (its tensors stay in their stored types)."""
        return bool(self.stored_types)

    @property
    def stored_expert_format(self) -> str | None:
        """The CPU expert-store format that holds the routed experts exactly as the checkpoint stores them
        (int4-g32 for K2-Thinking's pack-quantized INT4), else None (bf16 / FP8: any format quantizes them)."""
        return f"int4-g{self.int4_group}" if self.int4_group else None

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def moe_layers(self) -> range:
        return range(self.first_k_dense_replace, self.num_hidden_layers)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(N+P), times YaRN's mscale(factor, mscale_all_dim)^2 as DeepSeek's reference applies it."""
        scale = self.qk_head_dim ** -0.5
        y = self.rope_scaling
        if y is not None and y.mscale_all_dim:
            m = yarn_mscale(y.factor, y.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def kv_cache_bytes_per_token(self) -> int:
        """Compressed MLA cache (latent R + roped key P per layer) in bf16."""
        return (self.kv_lora_rank + self.qk_rope_head_dim) * self.num_hidden_layers * 2


def yarn_mscale(scale: float, mscale: float) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def read_json_object(path, missing_ok: bool = False) -> dict:
    """A checkpoint's JSON file (config.json, generation_config.json, tokenizer_config.json) as a dict; {} for
    a missing file when missing_ok; else one ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return {}
        raise ConfigError(f"{path}: not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return raw


def load_config(path) -> ModelConfig:
    """Read `path` (config.json, or a folder holding one) into a validated ModelConfig."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: config.json not found")
    return parse_config(read_json_object(path), str(path))


def parse_config(raw: dict, source: str = "config.json") -> ModelConfig:
    r = _Reader(raw, source)
    model_type = r.choice("model_type", MODEL_TYPES)
    fields = dict(
        source=source,
        model_type=model_type,
        vocab_size=r.int("vocab_size"),
        hidden_size=r.int("hidden_size"),
        intermediate_size=r.int("intermediate_size"),
        moe_intermediate_size=r.int("moe_intermediate_size"),
        num_hidden_layers=r.int("num_hidden_layers"),
        num_attention_heads=r.int("num_attention_heads"),
        q_lora_rank=r.int("q_lora_rank", optional=True),
        kv_lora_rank=r.int("kv_lora_rank"),
        qk_nope_head_dim=r.int("qk_nope_head_dim"),
        qk_rope_head_dim=r.int("qk_rope_head_dim"),
        v_head_dim=r.int("v_head_dim"),
        n_routed_experts=r.int("n_routed_experts"),
        n_shared_experts=r.int("n_shared_experts", minimum=0, default=0),
        num_experts_per_tok=r.int("num_experts_per_tok"),
        first_k_dense_replace=r.int("first_k_dense_replace", minimum=0, default=0),
        n_group=r.int("n_group", default=1),
        topk_group=r.int("topk_group", default=1),
        topk_method=r.choice("topk_method", TOPK_METHODS, default="greedy"),
        # DeepSeek's own config class defaults to softmax; every V3-family checkpoint writes sigmoid.
        scoring_func=r.choice("scoring_func", SCORING_FUNCS, default="softmax"),
        norm_topk_prob=r.bool("norm_topk_prob", default=False),
        routed_scaling_factor=r.float("routed_scaling_factor", default=1.0),
        rms_norm_eps=r.float("rms_norm_eps", default=1e-6),
        rope_theta=_rope_theta(r),
        rope_scaling=_rope_scaling(r),
        max_position_embeddings=r.int("max_position_embeddings"),
        tie_word_embeddings=r.bool("tie_word_embeddings", default=False),
        bos_token_id=r.int("bos_token_id", optional=True, minimum=0),
        eos_token_ids=_eos_ids(r),
        fp8_block=None,
        int4_group=None,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
    )
    fields.update(_quantization(r))
    _check_relations(r, fields)
    return ModelConfig(**fields)


class _Reader:
    """Typed access to one JSON object; every failure names the file and the key."""

    def __init__(self, raw: dict, source: str):
        self.raw, self.source = raw, source

    def fail(self, key: str, what: str):
        raise ConfigError(f"{self.source}: key '{key}' {what}")

    def get(self, key, default, optional):
        if key in self.raw and self.raw[key] is not None:
            return self.raw[key]
        if default is not None or optional:
            return default
        self.fail(key, "is missing")

    def int(self, key, *, optional=False, default=None, minimum=1):
        v = self.get(key, default, optional)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(key, f"must be an integer, got {v!r}")
        if v < minimum:
            self.fail(key, f"must be >= {minimum}, got {v}")
        return v

    def float(self, key, *, default=None, positive=True):
        v = self.get(key, default, False)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.fail(key, f"must be a finite number, got {v!r}")
        if positive and v <= 0:
            self.fail(key, f"must be > 0, got {v}")
        return float(v)

    def bool(self, key, *, default=None):
        v = self.get(key, default, False)
        if not isinstance(v, bool):
            self.fail(key, f"must be true or false, got {v!r}")
        return v

    def choice(self, key, allowed, *, default=None):
        v = self.get(key, default, False)
        if v not in allowed:
            self.fail(key, f"is {v!r}; supported: {', '.join(allowed)}")
        return v


def _rope_theta(r: _Reader) -> float:
    params = r.raw.get("rope_parameters")
    if "rope_theta" not in r.raw and isinstance(params, dict) and "rope_theta" in params:
        return _Reader(params, f"{r.source} rope_parameters").float("rope_theta")
    return r.float("rope_theta", default=10000.0)


def _rope_scaling(r: _Reader) -> YarnScaling | None:
    # Older files write rope_scaling.type, newer ones rope_type; transformers 5 writes rope_parameters.
    key = "rope_scaling" if r.raw.get("rope_scaling") is not None else "rope_parameters"
    rs = r.raw.get(key)
    if rs is None:
        return None
    if not isinstance(rs, dict):
        r.fail(key, f"must be an object or null, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in ROPE_TYPES:
        r.fail(f"{key}.type", f"is {kind!r}; supported: {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return None
    sub = _Reader(rs, f"{r.source} {key}")
    y = YarnScaling(
        factor=sub.float("factor"),
        original_max_position_embeddings=sub.int("original_max_position_embeddings"),
        beta_fast=sub.float("beta_fast", default=32.0),
        beta_slow=sub.float("beta_slow", default=1.0),
        mscale=sub.float("mscale", default=1.0, positive=False),
        mscale_all_dim=sub.float("mscale_all_dim", default=0.0, positive=False),
    )
    if y.factor < 1:
        r.fail(f"{key}.factor", f"must be >= 1 for yarn, got {y.factor}")
    return y


def _eos_ids(r: _Reader) -> tuple[int, ...]:
    v = r.raw.get("eos_token_id")
    if v is None:
        return ()
    ids = v if isinstance(v, list) else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        r.fail("eos_token_id", f"must be a token id or a list of them, got {v!r}")
    return tuple(ids)


def _quantization(r: _Reader) -> dict:
    """fp8_block and int4_group from quantization_config: block FP8 (DeepSeek-V3, K2-Instruct) or compressed-tensors
    pack-quantized INT4 experts (K2-Thinking); anything else is refused naming the key."""
    q = r.raw.get("quantization_config")
    if q is None:
        return {}
    method = q.get("quant_method") if isinstance(q, dict) else None
    if method == COMPRESSED_TENSORS:
        return {"int4_group": _int4_group(r, q)}
    if method != "fp8":
        r.fail("quantization_config.quant_method", f"must be 'fp8' (block FP8) or '{COMPRESSED_TENSORS}' "
                                                   f"(pack-quantized INT4), got {method if method else q!r}")
    if q.get("fmt", "e4m3") != "e4m3":
        r.fail("quantization_config.fmt", f"must be 'e4m3', got {q.get('fmt')!r}")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        r.fail("quantization_config.weight_block_size", f"must be [rows, cols], got {block!r}")
    return {"fp8_block": tuple(block)}


COMPRESSED_TENSORS = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
# What a pack-quantized group's weights must say for the CPU kernels' int4 format to hold them as they are
# (compressed-tensors' QuantizationArgs field names): symmetric 4-bit integers, one static scale per group of
# columns, no activation ordering (which would add a weight_g_idx permutation).
INT4_WEIGHTS = {"num_bits": 4, "type": "int", "strategy": "group", "symmetric": True, "dynamic": False,
                "actorder": None, "block_structure": None}
# QuantizationArgs' defaults, for a field a config leaves out.
ARGS_DEFAULTS = {"num_bits": 8, "type": "int", "strategy": None, "symmetric": True, "dynamic": False, "actorder": None,
                 "block_structure": None}
INT4_GROUP_SIZES = (32, 64, 128)  # cpu_kernels' int4 group sizes (formats/tiled.py GROUP_SIZES)


def _int4_group(r: _Reader, q: dict) -> int:
    """The group size of a compressed-tensors quantization_config the CPU kernels run as stored: format
    pack-quantized, status compressed, weight-only symmetric INT4 in groups; one group setting for every target."""
    key = "quantization_config"
    fmt = q.get("format")
    if fmt != PACK_QUANTIZED:
        r.fail(f"{key}.format", f"must be '{PACK_QUANTIZED}', got {fmt!r}")
    if q.get("quantization_status", "compressed") != "compressed":
        r.fail(f"{key}.quantization_status", f"must be 'compressed', got {q.get('quantization_status')!r}")
    if q.get("kv_cache_scheme") is not None:
        r.fail(f"{key}.kv_cache_scheme", f"must be null (the MLA cache is kept in bf16), got {q['kv_cache_scheme']!r}")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        r.fail(f"{key}.config_groups", f"must be an object of quantization groups, got {groups!r}")
    sizes = set()
    for name, group in groups.items():
        at = f"{key}.config_groups.{name}"
        if not isinstance(group, dict):
            r.fail(at, f"must be an object, got {group!r}")
        if group.get("format", fmt) not in (None, PACK_QUANTIZED):
            r.fail(f"{at}.format", f"must be '{PACK_QUANTIZED}', got {group['format']!r}")
        for side in ("input_activations", "output_activations"):
            if group.get(side) is not None:
                r.fail(f"{at}.{side}", f"must be null (weight-only INT4), got {group[side]!r}")
        weights = group.get("weights")
        if not isinstance(weights, dict):
            r.fail(f"{at}.weights", f"must be an object, got {weights!r}")
        for field, want in INT4_WEIGHTS.items():
            got = weights.get(field, ARGS_DEFAULTS[field])
            if got != want:
                r.fail(f"{at}.weights.{field}", f"must be {json.dumps(want)}, got {json.dumps(got)}")
        size = weights.get("group_size")
        if size not in INT4_GROUP_SIZES:
            r.fail(f"{at}.weights.group_size", f"must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {size!r}")
        sizes.add(size)
    if len(sizes) > 1:
        r.fail(f"{key}.config_groups", f"give one group_size for all groups, got {sorted(sizes)}")
    return sizes.pop()


def _check_relations(r: _Reader, f: dict):
    if f["num_experts_per_tok"] > f["n_routed_experts"]:
        r.fail("num_experts_per_tok", f"({f['num_experts_per_tok']}) exceeds n_routed_experts ({f['n_routed_experts']})")
    if f["n_routed_experts"] % f["n_group"]:
        r.fail("n_routed_experts", f"({f['n_routed_experts']}) is not divisible by n_group ({f['n_group']})")
    if f["topk_group"] > f["n_group"]:
        r.fail("topk_group", f"({f['topk_group']}) exceeds n_group ({f['n_group']})")
    per_group = f["n_routed_experts"] // f["n_group"]
    if f["topk_method"] == "noaux_tc" and f["n_group"] > 1 and per_group < 2:
        r.fail("n_group", "leaves fewer than 2 experts per group; noaux_tc scores a group by its top 2")
    if f["topk_group"] * per_group < f["num_experts_per_tok"]:
        r.fail("topk_group", f"groups hold {f['topk_group'] * per_group} experts, fewer than num_experts_per_tok")
    if f["int4_group"]:
        for key in ("hidden_size", "moe_intermediate_size"):
            if f[key] % f["int4_group"]:
                r.fail("quantization_config.config_groups.*.weights.group_size",
                       f"({f['int4_group']}) must divide {key} ({f[key]})")
    if f["first_k_dense_replace"] > f["num_hidden_layers"]:
        r.fail("first_k_dense_replace", f"exceeds num_hidden_layers ({f['num_hidden_layers']})")
    if r.raw.get("moe_layer_freq", 1) != 1:
        r.fail("moe_layer_freq", f"must be 1 (every layer after the dense ones is MoE), got {r.raw['moe_layer_freq']!r}")
    if r.raw.get("hidden_act", "silu") != "silu":
        r.fail("hidden_act", f"must be 'silu', got {r.raw.get('hidden_act')!r}")
    if r.raw.get("attention_bias", False):
        r.fail("attention_bias", "must be false: DeepSeek-V3-family attention has no biases")
    if f["qk_rope_head_dim"] % 2:
        r.fail("qk_rope_head_dim", f"must be even (rotated in pairs), got {f['qk_rope_head_dim']}")
    if f["bos_token_id"] is not None and f["bos_token_id"] >= f["vocab_size"]:
        r.fail("bos_token_id", f"({f['bos_token_id']}) is outside vocab_size ({f['vocab_size']})")
    for i in f["eos_token_ids"]:
        if i >= f["vocab_size"]:
            r.fail("eos_token_id", f"({i}) is outside vocab_size ({f['vocab_size']})")
