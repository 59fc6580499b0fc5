"""export_gguf: a llama.cpp `deepseek2` GGUF model written from one of our tiny safetensors checkpoints, laid
out as convert_hf_to_gguf.py and llama-quantize lay out Unsloth's Kimi-K2 files, for the GGUF reader's tests.

Written with gguf-py's GGUFWriter, one writer per split (each split a complete file with split.no, split.count
and split.tensors.count; the first holds all metadata). Tensor names come from gguf-py's own name table
(gguf.get_tensor_name_map, the table llama.cpp's converter uses), not from the reader's. Routed experts are
stacked per layer into one [E, out, in] tensor; kv_b_proj is split into attn_k_b / attn_v_b exactly as the
converter's DeepseekV2Model.modify_tensors does (or kept whole as attn_kv_b, with the pre-April-2025 metadata
that goes with it: key/value_length per head, head_count_kv = head_count).

Types: F32, F16, BF16 and whatever gguf.quants.quantize knows (Q4_0..Q8_0, TQ1_0/TQ2_0, MXFP4) hold the
checkpoint's weights; the K and IQ types, which gguf-py cannot quantize, hold random blocks whose f16 scales
are small finite numbers (cpu_kernels' `random_blocks`): every such block decodes to finite weights.
"""

import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFValueType

from cpu_kernels.formats.gguf.samples import random_blocks
from hybrid.generation.tokenizer import read_ranks, read_tokenizer_config, special_tokens, special_tokens_map
from hybrid.read import names
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.gguf import byte_alphabet

ARCH = "deepseek2"
ALWAYS_F32 = re.compile(r"norm\.weight$|ffn_gate_inp\.weight$|exp_probs_b\.bias$")  # as llama.cpp keeps them
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5


class Meta(NamedTuple):
    type: GGUFValueType
    value: object
    item_type: GGUFValueType | None = None


def encode(w: torch.Tensor, type_name: str, rng, quantize=None) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """(array for GGUFWriter.add_tensor, raw_dtype): typed arrays for F32/F16, uint8 bytes for the rest.
    `quantize(float32 rows [n, n_per_row], type name) -> uint8 rows`, when given, quantizes every type but
    F32/F16/BF16 (a benchmark passes ggml's own, benchmarks/ggml_ref.py's `quantize`)."""
    if type_name == "F32":
        return w.float().contiguous().numpy(), None
    if type_name == "F16":
        return w.half().contiguous().numpy(), None
    qtype = GGMLQuantizationType[type_name]
    if type_name == "BF16":
        return w.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8), qtype
    if quantize is not None:
        rows = quantize(w.float().contiguous().numpy().reshape(-1, w.shape[-1]), type_name)
        return rows.reshape(*w.shape[:-1], -1), qtype
    try:
        return gguf.quants.quantize(w.float().contiguous().numpy(), qtype), qtype
    except NotImplementedError:  # K and IQ types
        rows = random_blocks(type_name, w[..., 0].numel(), w.shape[-1], rng)
        return rows.reshape(*w.shape[:-1], -1), qtype


def _type_picker(types) -> Callable[[str], str]:
    if types is None or isinstance(types, str):
        return lambda name: types or "F32"
    if callable(types):
        return types
    return lambda name: next((t for pattern, t in types.items() if re.search(pattern, name)), "F32")


def export_gguf(hf_folder, out_folder, types=None, n_shards: int = 1, mla: str = "split", name: str = "Tiny",
                edit_metadata=None, edit_tensor=None, seed: int = 0, quantize=None) -> Path:
    """Write the GGUF model of the checkpoint at `hf_folder` into `out_folder` (NAME.gguf, or NAME-0000k-of-
    0000n.gguf for n_shards > 1) and return out_folder.

    types: the ggml type of each GGUF tensor: one type name for all, {regex: type name} (first search hit; F32
    where none hits) or a callable(gguf name) -> type name; norms, router and correction bias are always F32.
    mla: "split" (attn_k_b + attn_v_b, files since April 2025) or "kv_b" (attn_kv_b, older files).
    edit_metadata(dict of key -> Meta) may change the metadata; edit_tensor(gguf name, float tensor) may return
    another tensor, or None to leave it out: the tests' ways of writing damaged files.
    quantize: the quantizer of the non-float types (`encode`), default gguf-py's and random K/IQ blocks.
    """
    ckpt = Checkpoint.open(hf_folder)
    meta = model_metadata(ckpt.config, ckpt.folder, mla, name)
    if edit_metadata is not None:
        edit_metadata(meta)
    pick, rng = _type_picker(types), np.random.default_rng(seed)
    tensors = []
    for gguf_name, w in _gguf_tensors(ckpt, mla):
        if edit_tensor is not None and (w := edit_tensor(gguf_name, w)) is None:
            continue
        tensors.append((gguf_name, *encode(w, "F32" if ALWAYS_F32.search(gguf_name) else pick(gguf_name), rng,
                                               quantize)))
    out = Path(out_folder)
    for writer, chunk in _writers(out, name, n_shards, meta, len(tensors)):
        for gguf_name, array, raw_dtype in (tensors[j] for j in chunk):
            writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return out


def _writers(out: Path, name: str, n_shards: int, meta: dict[str, Meta], n_tensors: int):
    """(GGUFWriter holding the split's keys, indices of the tensors it holds) for each split."""
    out.mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(np.array_split(np.arange(n_tensors), n_shards)):
        fname = f"{name}-{i + 1:05d}-of-{n_shards:05d}.gguf" if n_shards > 1 else f"{name}.gguf"
        arch = meta["general.architecture"].value if "general.architecture" in meta else ARCH
        writer = gguf.GGUFWriter(out / fname, arch)
        if i == 0:
            for key, m in meta.items():
                if key != "general.architecture":
                    writer.add_key_value(key, m.value, m.type, sub_type=m.item_type)
        if n_shards > 1:
            writer.add_uint16("split.no", i)
            writer.add_uint16("split.count", n_shards)
            writer.add_int32("split.tensors.count", n_tensors)
        yield writer, chunk


def full_size_gguf(cfg, tokenizer_folder: Path, out_folder, n_shards: int, expert_type: str = "IQ2_XXS",
                   types=None) -> Path:
    """A GGUF set of the model `cfg` describes (K2's full size) whose tensor data are holes in sparse files:
    every header as real, ~250 GB apparent, a few MB on disk. By default routed experts in `expert_type`, Q4_K
    matrices, Q8_0 attn_k_b/v_b, F32 norms; `types(gguf name)` may choose any type instead (norms stay F32)."""
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)
    H, N, V, R = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    infos = []  # (GGUF name, numpy-order shape, type)
    for hf, shape in names.expected_tensors(cfg).items():
        parsed = names.parse_expert_key(hf)
        if parsed is not None:
            if parsed[1] == 0:
                infos.append((_name(table, f"{names.layer_prefix(parsed[0])}.mlp.experts.{parsed[2]}.weight"),
                              (cfg.n_routed_experts, *shape), expert_type))
        elif hf.endswith("kv_b_proj.weight"):
            infos += [(_name(table, hf.replace("kv_b", "k_b")), (H, R, N), "Q8_0"),
                      (_name(table, hf.replace("kv_b", "v_b")), (H, V, R), "Q8_0")]
        else:
            infos.append((_name(table, hf), shape, "F32" if ALWAYS_F32.search(_name(table, hf)) else "Q4_K"))
    if types is not None:
        infos = [(n, shape, t if t == "F32" else types(n)) for n, shape, t in infos]
    out = Path(out_folder)
    meta = model_metadata(cfg, Path(tokenizer_folder), "split", "K2")
    for writer, chunk in _writers(out, "K2", n_shards, meta, len(infos)):
        data_bytes = 0
        for gguf_name, shape, type_name in (infos[j] for j in chunk):
            qtype = GGMLQuantizationType[type_name]
            block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(shape)) // block * type_bytes
            writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), n_bytes, raw_dtype=qtype)
            data_bytes += writer.ggml_pad(n_bytes, writer.data_alignment)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fout = writer.fout[0]
        writer.write_padding(fout, fout.tell())
        end = fout.tell()
        writer.close()
        os.truncate(writer.path, end + data_bytes)
    return out


def _gguf_tensors(ckpt: Checkpoint, mla: str):
    """(GGUF name, float tensor in numpy order) for every tensor of the GGUF model, layer by layer."""
    cfg = ckpt.config
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, cfg.num_hidden_layers)

    def gguf_name(hf: str) -> str:  # llama.cpp's own name table, not the reader's
        return _name(table, hf)

    for hf in names.expected_tensors(cfg):
        parsed = names.parse_expert_key(hf)
        if parsed is not None:
            layer, expert, proj = parsed
            if expert == 0:  # the whole layer's experts as one [E, out, in] tensor
                stacked = torch.stack([ckpt.weight(names.expert_key(layer, e, proj))
                                       for e in range(cfg.n_routed_experts)])
                yield gguf_name(f"{names.layer_prefix(layer)}.mlp.experts.{proj}.weight"), stacked
        elif hf.endswith("kv_b_proj.weight") and mla == "split":
            # DeepseekV2Model.modify_tensors: view [Hh, N + V, R], split N / V, K transposed to [Hh, R, N]
            kv = ckpt.weight(hf).view(cfg.num_attention_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, -1)
            k, v = torch.split(kv, [cfg.qk_nope_head_dim, cfg.v_head_dim], dim=1)
            yield gguf_name(hf.replace("kv_b_proj", "k_b_proj")), k.transpose(1, 2).contiguous()
            yield gguf_name(hf.replace("kv_b_proj", "v_b_proj")), v.contiguous()
        else:
            yield gguf_name(hf), ckpt.weight(hf)


def _name(table, hf: str) -> str:
    # the converter renames the bias first, as gguf-py's table has only "...e_score_correction"
    return table.get_name(hf.replace("e_score_correction_bias", "e_score_correction.bias"),
                          try_suffixes=(".weight", ".bias"))


def model_metadata(cfg, tokenizer_folder: Path, mla: str, name: str) -> dict[str, Meta]:
    a = ARCH + "."
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    R, P, N, V = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim
    meta = {
        "general.architecture": Meta(GGUFValueType.STRING, ARCH),
        "general.name": Meta(GGUFValueType.STRING, name),
        "general.quantization_version": Meta(u32, 2),
        a + "block_count": Meta(u32, cfg.num_hidden_layers),
        a + "context_length": Meta(u32, cfg.max_position_embeddings),
        a + "embedding_length": Meta(u32, cfg.hidden_size),
        a + "feed_forward_length": Meta(u32, cfg.intermediate_size),
        a + "attention.head_count": Meta(u32, cfg.num_attention_heads),
        a + "attention.layer_norm_rms_epsilon": Meta(f32, cfg.rms_norm_eps),
        a + "attention.kv_lora_rank": Meta(u32, R),
        a + "rope.dimension_count": Meta(u32, P),
        a + "rope.freq_base": Meta(f32, cfg.rope_theta),
        a + "leading_dense_block_count": Meta(u32, cfg.first_k_dense_replace),
        a + "expert_feed_forward_length": Meta(u32, cfg.moe_intermediate_size),
        a + "expert_count": Meta(u32, cfg.n_routed_experts),
        a + "expert_used_count": Meta(u32, cfg.num_experts_per_tok),
        a + "expert_shared_count": Meta(u32, cfg.n_shared_experts),
        a + "expert_group_count": Meta(u32, cfg.n_group),
        a + "expert_group_used_count": Meta(u32, cfg.topk_group),
        a + "expert_weights_scale": Meta(f32, cfg.routed_scaling_factor),
        a + "expert_weights_norm": Meta(GGUFValueType.BOOL, cfg.norm_topk_prob),
        a + "expert_gating_func": Meta(u32, 2 if cfg.scoring_func == "sigmoid" else 1),
        a + "vocab_size": Meta(u32, cfg.vocab_size),
    }
    if cfg.q_lora_rank is not None:
        meta[a + "attention.q_lora_rank"] = Meta(u32, cfg.q_lora_rank)
    if mla == "split":  # MLA stored as MQA: one kv head of the latent plus the roped key
        meta.update({a + "attention.head_count_kv": Meta(u32, 1), a + "attention.key_length": Meta(u32, R + P),
                     a + "attention.value_length": Meta(u32, R), a + "attention.key_length_mla": Meta(u32, N + P),
                     a + "attention.value_length_mla": Meta(u32, V)})
    else:
        meta.update({a + "attention.head_count_kv": Meta(u32, cfg.num_attention_heads),
                     a + "attention.key_length": Meta(u32, N + P), a + "attention.value_length": Meta(u32, V)})
    y = cfg.rope_scaling
    if y is not None:
        meta.update({a + "rope.scaling.type": Meta(GGUFValueType.STRING, "yarn"),
                     a + "rope.scaling.factor": Meta(f32, y.factor),
                     a + "rope.scaling.original_context_length": Meta(u32, y.original_max_position_embeddings),
                     a + "rope.scaling.yarn_log_multiplier": Meta(f32, 0.1 * y.mscale_all_dim),
                     a + "rope.scaling.yarn_beta_fast": Meta(f32, y.beta_fast),
                     a + "rope.scaling.yarn_beta_slow": Meta(f32, y.beta_slow)})
    meta.update(tokenizer_metadata(tokenizer_folder, cfg))
    return meta


def tokenizer_metadata(folder: Path, cfg) -> dict[str, Meta]:
    """K2's tokenizer as llama.cpp's converter writes it: the tiktoken ranks as tokens spelled in GPT-2's byte
    alphabet (id = rank), the special slots as CONTROL tokens, gaps as UNUSED "[PADn]". Merges are left out:
    the converter derives 163,328 of them for llama.cpp's BPE, but a tiktoken encoder needs the ranks alone."""
    ranks = read_ranks(folder / "tiktoken.model")
    tok_cfg = read_tokenizer_config(folder)
    special = special_tokens(tok_cfg, folder / "tokenizer_config.json", len(ranks))
    alphabet = byte_alphabet()
    by_id = {i: ("".join(alphabet[b] for b in token), TOKEN_NORMAL) for token, i in ranks.items()}
    by_id.update({i: (text, TOKEN_CONTROL) for text, i in special.items()})
    entries = [by_id.get(i, (f"[PAD{i}]", TOKEN_UNUSED)) for i in range(cfg.vocab_size)]
    meta = {
        "tokenizer.ggml.model": Meta(GGUFValueType.STRING, "gpt2"),
        "tokenizer.ggml.pre": Meta(GGUFValueType.STRING, "kimi-k2"),
        "tokenizer.ggml.tokens": Meta(GGUFValueType.ARRAY, [t for t, _ in entries], GGUFValueType.STRING),
        "tokenizer.ggml.token_type": Meta(GGUFValueType.ARRAY, [k for _, k in entries], GGUFValueType.INT32),
        "tokenizer.ggml.bos_token_id": Meta(GGUFValueType.UINT32, cfg.bos_token_id),
        "tokenizer.ggml.eos_token_id": Meta(GGUFValueType.UINT32, cfg.eos_token_ids[0]),
    }
    texts = special_tokens_map(tok_cfg)
    for role, key in (("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id")):
        if texts.get(role) in special:
            meta[f"tokenizer.ggml.{key}"] = Meta(GGUFValueType.UINT32, special[texts[role]])
    template = folder / "chat_template.jinja"
    text = template.read_text() if template.is_file() else tok_cfg.get("chat_template")
    if isinstance(text, str):
        meta["tokenizer.chat_template"] = Meta(GGUFValueType.STRING, text)
    return meta
