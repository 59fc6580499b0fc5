"""Tiny random-weight checkpoints in Kimi-K2-Instruct-0905's exact on-disk layout.

Same files as the real release: config.json (with quantization_config), generation_config.json, shards
`model-0000N-of-0000NN.safetensors` (embeddings, then one per layer, like K2's 62 shards for 61 layers) with
model.safetensors.index.json, per-expert tensors `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`,
block-FP8 linear weights with `weight_scale_inv`, bf16 norms/embeddings/router and an f32 correction bias.
`TinySpec(int4=True)` writes K2-Thinking's layout instead: routed experts as compressed-tensors pack-quantized INT4
in groups of 32 (`weight_packed`, `weight_scale`, `weight_shape`; hybrid/read/int4.py) with its quantization_config,
everything else bf16 (no FP8 anywhere, whatever `fp8` says).
Tests, demos and benchmarks build on it; the dims are small but not multiples of 128 where K2's aren't
(kv_a_proj_with_mqa has a ragged last FP8 block).

Weights are N(0, 1/fan_in), residual writers (o_proj, down_proj) further divided by sqrt(2L), norms near 1:
activations stay O(1) through any depth, and logits differ from token to token.
"""

import base64
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybrid.read import fp8, int4, names
from hybrid.read.config import parse_config
from hybrid.errors import ConfigError

# K2's named special tokens, by offset after the last BPE rank (163584 in K2).
K2_SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
               6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
               11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
               14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>",
               254: "[UNK]", 255: "[PAD]"}
# K2-Thinking's reasoning markers, believed to sit at these offsets in its tokenizer_config.json (163606, 163607)
THINK_SPECIALS = {22: "<think>", 23: "</think>"}
N_BYTE_RANKS = 256
K2_N_RANKS = 163584


@dataclass(frozen=True)
class TinySpec:
    layers: int = 3
    dense_layers: int = 1
    experts: int = 16
    top_k: int = 4
    n_group: int = 1
    topk_group: int = 1
    hidden: int = 256
    heads: int = 4
    q_lora_rank: int | None = 96
    kv_lora_rank: int = 160  # + rope 32 = 192 rows: one full FP8 block and a ragged half, like K2's 576
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 32
    v_head_dim: int = 32
    moe_width: int = 128
    dense_width: int = 384
    max_position_embeddings: int = 512
    original_max_position_embeddings: int = 64
    yarn_factor: float = 8.0
    beta_fast: float = 1.0  # K2's values; DeepSeek-V3 uses 32 / 1
    beta_slow: float = 1.0
    routed_scaling_factor: float = 2.827
    model_type: str = "kimi_k2"
    fp8: bool = True
    seed: int = 0
    tokenizer_from: str | None = None  # a folder with K2's tiktoken.model + tokenizer_config.json
    # K2-Thinking's text side: its <think>/</think> special tokens and a thinking chat template (see
    # hybrid/generation/templates/SOURCES.md), written as the checkpoint's own chat_template.jinja
    thinking: bool = False
    # K2-Thinking's weights: routed experts pack-quantized INT4 in groups of int4_group, the rest bf16
    int4: bool = False
    int4_group: int = 32


# K2's true widths: a model of this shape with few layers and experts measures per-layer costs at full size.
K2_WIDTHS = dict(hidden=7168, heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, moe_width=2048, dense_width=18432,
                 max_position_embeddings=262144, original_max_position_embeddings=4096, yarn_factor=64.0)


def config_dict(spec: TinySpec, vocab: int, bos: int, eos: int) -> dict:
    """A config.json with K2's keys in K2's order, scaled down to `spec`."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "aux_loss_alpha": 0.001,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "first_k_dense_replace": spec.dense_layers,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.dense_width,
        "kv_lora_rank": spec.kv_lora_rank,
        "max_position_embeddings": spec.max_position_embeddings,
        "model_type": spec.model_type,
        "moe_intermediate_size": spec.moe_width,
        "moe_layer_freq": 1,
        "n_group": spec.n_group,
        "n_routed_experts": spec.experts,
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.heads,
        "num_nextn_predict_layers": 0,
        "pretraining_tp": 1,
        "q_lora_rank": spec.q_lora_rank,
        "qk_nope_head_dim": spec.qk_nope_head_dim,
        "qk_rope_head_dim": spec.qk_rope_head_dim,
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
        "rms_norm_eps": 1e-06,
        "rope_theta": 50000.0,
        "routed_scaling_factor": spec.routed_scaling_factor,
        "rope_scaling": {"beta_fast": spec.beta_fast, "beta_slow": spec.beta_slow, "factor": spec.yarn_factor,
                         "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": spec.original_max_position_embeddings, "type": "yarn"},
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": spec.topk_group,
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.48.3",
        "use_cache": True,
        "v_head_dim": spec.v_head_dim,
        "vocab_size": vocab,
    }
    if spec.int4:
        cfg["quantization_config"] = int4_quantization_config(spec.int4_group)
    elif not spec.fp8:
        del cfg["quantization_config"]
    return cfg


def int4_quantization_config(group: int = 32) -> dict:
    """K2-Thinking's quantization_config: compressed-tensors, pack-quantized, weight-only symmetric INT4 in groups,
    everything but the routed experts ignored (kept in bf16)."""
    return {
        "config_groups": {"group_0": {
            "input_activations": None, "output_activations": None, "targets": ["Linear"],
            "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": group,
                        "num_bits": 4, "observer": "minmax", "observer_kwargs": {}, "strategy": "group",
                        "symmetric": True, "type": "int"}}},
        "format": "pack-quantized",
        "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
    }


def make_tiny(out, spec: TinySpec = TinySpec(), overwrite: bool = False) -> Path:
    """Write a tiny checkpoint folder at `out` (atomically: built beside it, then renamed into place)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: exists and is not empty (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        n_ranks = _write_tokenizer(tmp, spec)
        if spec.thinking:
            _make_thinking(tmp)
        vocab = n_ranks + 256
        bos, eos = n_ranks, n_ranks + 1
        raw = config_dict(spec, vocab, bos, eos)
        cfg = parse_config(raw, f"{out}/config.json")  # the same validation a user's checkpoint gets
        (tmp / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        gen = {"bos_token_id": bos, "eos_token_id": [eos, n_ranks + 2], "max_length": spec.max_position_embeddings}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        (tmp / "hybrid_tiny.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
        _write_shards(tmp, cfg, spec)
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint folder is ordinary shared data
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_tokenizer(folder: Path, spec: TinySpec) -> int:
    """K2's real tokenizer files when given, else a byte-level one in the same format; returns the rank count."""
    if spec.tokenizer_from:
        src = Path(spec.tokenizer_from)
        for name in ("tiktoken.model", "tokenizer_config.json"):
            if not (src / name).is_file():
                raise ConfigError(f"{src / name}: not found (needed to copy K2's tokenizer)")
            shutil.copyfile(src / name, folder / name)
        for extra in ("chat_template.jinja",):
            if (src / extra).is_file():
                shutil.copyfile(src / extra, folder / extra)
        return K2_N_RANKS
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(N_BYTE_RANKS)]
    (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
    decoder = {str(N_BYTE_RANKS + off): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for off, tok in K2_SPECIALS.items()}
    tok_cfg = {"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]",
               "unk_token": "[UNK]", "tokenizer_class": "TikTokenTokenizer", "model_max_length": 1 << 20}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return N_BYTE_RANKS


def _make_thinking(folder: Path) -> None:
    """Turn the tokenizer just written into K2-Thinking's: the reasoning markers become special tokens and the
    packaged thinking template becomes the checkpoint's own."""
    path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(path.read_text())
    first_special = min(int(k) for k in tok_cfg["added_tokens_decoder"])  # [BOS], the first reserved id
    for off, tok in THINK_SPECIALS.items():
        tok_cfg["added_tokens_decoder"][str(first_special + off)] = {
            "content": tok, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True}
    path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    template = Path(__file__).resolve().parents[1] / "generation" / "templates" / "kimi_k2_thinking.jinja"
    shutil.copyfile(template, folder / "chat_template.jinja")


def _init(name: str, shape, n_layers: int, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(shape, generator=gen)
    if "norm" in name:
        return 1.0 + 0.1 * w
    if name.endswith("e_score_correction_bias"):
        return 0.1 * w  # large enough to change which experts win, as the real bias does
    if name == "model.embed_tokens.weight":
        return w
    w = w / math.sqrt(shape[1])
    if "o_proj" in name or "down_proj" in name:
        w = w / math.sqrt(2 * n_layers)
    return w


def _write_shards(folder: Path, cfg, spec: TinySpec):
    gen = torch.Generator().manual_seed(spec.seed)
    n_shards = cfg.num_hidden_layers + 1
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(n_shards)]
    for name, shape in names.expected_tensors(cfg).items():
        layer = names.layer_of(name)
        shard = shards[n_shards - 1 if layer is None and name != "model.embed_tokens.weight" else
                       0 if layer is None else layer + 1]
        w = _init(name, shape, cfg.num_hidden_layers, gen)
        if names.int4_stored(name, cfg):
            packed, scale, shape = int4.quantize(w, cfg.int4_group)
            for part, t in zip(int4.tensor_names(name), (packed, scale, shape)):
                shard[part] = t
        elif spec.fp8 and not spec.int4 and names.quantizable(name):
            shard[name], shard[names.scale_name(name)] = fp8.quantize(w, cfg.fp8_block)
        elif name.endswith("e_score_correction_bias"):
            shard[name] = w.float()
        else:
            shard[name] = w.to(torch.bfloat16)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:06d}.safetensors"
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
