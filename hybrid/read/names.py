"""Tensor-name knowledge: the Hugging Face checkpoint names of every DeepSeek-V3-family weight, in one table.

Modules elsewhere carry these attribute names, so state-dict keys equal checkpoint keys. `expected_tensors`
is the contract a checkpoint must meet (name -> unquantized shape); `quantizable` says which of them a
block-FP8 checkpoint stores as float8_e4m3fn + `<name>_scale_inv`; `int4_stored` which of them a
pack-quantized INT4 checkpoint (K2-Thinking) stores as `<name>_packed`, `<name>_scale`, `<name>_shape`
(hybrid/read/int4.py).
"""

import re

from hybrid.read.config import ModelConfig

SCALE_SUFFIX = "_scale_inv"
EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")
INT4_SUFFIXES = ("_packed", "_scale", "_shape")  # weight_packed, weight_scale, weight_shape (hybrid/read/int4.py)

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
# Kept out of FP8 by every DeepSeek-V3-family checkpoint: lookups, norms and the router stay in bf16/fp32.
_NEVER_FP8 = re.compile(r"(embed_tokens|lm_head|layernorm|norm\.weight$|mlp\.gate\.weight$|e_score_correction_bias)")


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}"


def expert_key(layer: int, expert: int, proj: str) -> str:
    return f"{layer_prefix(layer)}.mlp.experts.{expert}.{proj}.weight"


def parse_expert_key(name: str):
    """(layer, expert, proj) for a routed-expert weight name, else None."""
    m = _EXPERT_RE.match(name)
    return (int(m[1]), int(m[2]), m[3]) if m else None


def layer_of(name: str):
    m = _LAYER_RE.match(name)
    return int(m[1]) if m else None


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def quantizable(name: str) -> bool:
    """True for the linear weights a block-FP8 checkpoint stores in float8 (attention and MLP projections)."""
    return name.endswith(".weight") and not _NEVER_FP8.search(name)


def int4_stored(name: str, cfg: ModelConfig) -> bool:
    """True for the tensors a pack-quantized INT4 checkpoint stores packed: its routed experts, nothing else."""
    return cfg.int4_group is not None and parse_expert_key(name) is not None


def owner_of(name: str, cfg: ModelConfig) -> str:
    """The model tensor a stored tensor belongs to: itself, or the weight whose FP8 scale or INT4 part it is."""
    if name.endswith(SCALE_SUFFIX):
        return name[: -len(SCALE_SUFFIX)]
    if cfg.int4_group is not None:
        for suffix in INT4_SUFFIXES:
            if name.endswith(suffix) and int4_stored(name[: -len(suffix)], cfg):
                return name[: -len(suffix)]
    return name


def ignored(name: str, cfg: ModelConfig) -> bool:
    """Tensors a checkpoint may hold that the model never reads: rotary caches and MTP layers past the last."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    layer = layer_of(name)
    return layer is not None and layer >= cfg.num_hidden_layers


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model reads, with its unquantized shape [out, in] (or [n] for norms and biases)."""
    H, Hh = cfg.hidden_size, cfg.num_attention_heads
    R, P = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    out = {"model.embed_tokens.weight": (cfg.vocab_size, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, H)
    for i in range(cfg.num_hidden_layers):
        p = layer_prefix(i)
        a = f"{p}.self_attn"
        if cfg.q_lora_rank is None:
            out[f"{a}.q_proj.weight"] = (Hh * cfg.qk_head_dim, H)
        else:
            out[f"{a}.q_a_proj.weight"] = (cfg.q_lora_rank, H)
            out[f"{a}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
            out[f"{a}.q_b_proj.weight"] = (Hh * cfg.qk_head_dim, cfg.q_lora_rank)
        out[f"{a}.kv_a_proj_with_mqa.weight"] = (R + P, H)
        out[f"{a}.kv_a_layernorm.weight"] = (R,)
        out[f"{a}.kv_b_proj.weight"] = (Hh * (cfg.qk_nope_head_dim + cfg.v_head_dim), R)
        out[f"{a}.o_proj.weight"] = (H, Hh * cfg.v_head_dim)
        out[f"{p}.input_layernorm.weight"] = (H,)
        out[f"{p}.post_attention_layernorm.weight"] = (H,)
        if cfg.is_moe_layer(i):
            out.update(_moe_tensors(cfg, i))
        else:
            out.update(mlp_tensors(f"{p}.mlp", H, cfg.intermediate_size))
    return out


def mlp_tensors(prefix: str, hidden: int, width: int) -> dict[str, tuple[int, int]]:
    return {
        f"{prefix}.gate_proj.weight": (width, hidden),
        f"{prefix}.up_proj.weight": (width, hidden),
        f"{prefix}.down_proj.weight": (hidden, width),
    }


def _moe_tensors(cfg: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    p = f"{layer_prefix(layer)}.mlp"
    H, I, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    out = {f"{p}.gate.weight": (E, H)}
    if cfg.topk_method == "noaux_tc":
        out[f"{p}.gate.e_score_correction_bias"] = (E,)
    if cfg.n_shared_experts:
        out.update(mlp_tensors(f"{p}.shared_experts", H, I * cfg.n_shared_experts))
    for e in range(E):
        out.update({expert_key(layer, e, proj): shape for proj, shape in zip(EXPERT_PROJS, ((I, H), (I, H), (H, I)))})
    return out


def stored_key(name: str) -> str:
    """The key a GGUF checkpoint's storage table (ModelConfig.stored_types) holds `name` under: routed experts
    share one tensor per layer and projection, `model.layers.L.mlp.experts.*.P.weight`; others are themselves."""
    key = parse_expert_key(name)
    return name if key is None else f"{layer_prefix(key[0])}.mlp.experts.*.{key[2]}.weight"
