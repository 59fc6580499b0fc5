"""The GGUF reader (hybrid.read.gguf) on real files that gguf-py's writer made from the tiny checkpoints
(tests/gguf_files.py): weights against the safetensors checkpoint and gguf-py's quantize/dequantize, the
container parser against gguf-py's GGUFReader, the tokenizer against K2's tiktoken.model."""

import shutil
from dataclasses import fields, replace

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from conftest import K2_FILES
from gguf_files import Meta, export_gguf, full_size_gguf, random_blocks
from hybrid.errors import CheckpointError, ConfigError
from hybrid.generation.tokenizer import TiktokenTokenizer, Tokenizer
from hybrid.read import names
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.config import load_config
from hybrid.read.gguf import open_gguf
from hybrid.read.tiny import TinySpec, make_tiny

# Routed-expert and shared-expert rows 256 wide, so the K and IQ types (256-weight blocks) fit them.
BLOCKS_SPEC = TinySpec(layers=2, dense_layers=1, experts=4, top_k=2, moe_width=256, dense_width=256, fp8=False,
                       seed=3)
BLOCK_TYPES = {"ffn_gate_exps": "Q4_K", "ffn_up_exps": "IQ2_XXS", "ffn_down_exps": "IQ1_M", "ffn_gate_shexp": "Q2_K",
               "ffn_up_shexp": "IQ3_XXS", "ffn_down_shexp": "Q6_K", "ffn_gate\\.": "Q3_K", "ffn_up\\.": "IQ4_XS",
               "ffn_down\\.": "TQ1_0", "attn_q_a": "IQ2_XS", "attn_q_b": "IQ4_NL", "attn_kv_a_mqa": "IQ3_S",
               "attn_k_b": "Q8_0", "attn_v_b": "Q4_0", "attn_output": "Q5_1", "token_embd": "IQ2_S", "output": "IQ1_S"}
ALL_BLOCK_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0",
                   "TQ2_0", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"]
MIXED_FLOATS = {"attn_output": "F16", "attn": "F32", "": "BF16"}
CORPUS = ["Hello, world! I'M here, don't you see?", "你好，世界。机器学习是人工智能的一个分支。",
          "emoji 🚀🔥 family 👨‍👩‍👧 flags 🇫🇷", "def f(x):\n\treturn {'a': x ** 2}\n\n",
          "<|im_user|>user<|im_middle|>hi<|im_end|><|reserved_token_163600|>[EOS]", "numbers 1234567 ①② ٣٤٥"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def float_split(k2_tiny, out):
    """K2's tiny checkpoint in three splits, F32 attention (F16 o_proj), BF16 elsewhere, attn_k_b + attn_v_b."""
    return export_gguf(k2_tiny, out / "float", MIXED_FLOATS, n_shards=3)


@pytest.fixture(scope="module")
def q8_kv_b(k2_tiny, out):
    """The same in Q8_0, one file, with the older single attn_kv_b."""
    return export_gguf(k2_tiny, out / "q8", "Q8_0", mla="kv_b")


@pytest.fixture(scope="module")
def blocks(tmp_path_factory, out):
    src = make_tiny(tmp_path_factory.mktemp("ckpt") / "blocks", BLOCKS_SPEC)
    return src, export_gguf(src, out / "blocks", BLOCK_TYPES, n_shards=2)


def one_line(error_type, path) -> str:
    with pytest.raises(error_type) as e:
        open_gguf(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def gguf_file(folder):
    return sorted(folder.glob("*.gguf"))


def test_folder_first_split_any_split_and_single_file_open(float_split, q8_kv_b):
    by_folder = open_gguf(float_split)
    first, second, third = gguf_file(float_split)
    assert first.name == "Tiny-00001-of-00003.gguf"
    for path in (first, second):
        ckpt = open_gguf(path)
        assert ckpt.folder == float_split and list(ckpt.files) == [first, second, third]
        assert {n: i.path for n, i in ckpt.tensors.items()} == {n: i.path for n, i in by_folder.tensors.items()}
    single = open_gguf(q8_kv_b / "Tiny.gguf")
    assert single.folder == q8_kv_b and set(single.tensors) == set(by_folder.tensors) == \
        set(names.expected_tensors(by_folder.config))


def same_config(gguf_cfg, hf_cfg, skip=("source", "fp8_block", "stored_types")):
    differ = [f.name for f in fields(hf_cfg) if f.name not in skip
              and getattr(gguf_cfg, f.name) != getattr(hf_cfg, f.name)]
    assert not differ, [(n, getattr(gguf_cfg, n), getattr(hf_cfg, n)) for n in differ]


def test_config_is_the_source_checkpoints(k2_tiny, float_split, q8_kv_b):
    hf = Checkpoint.open(k2_tiny).config
    assert hf.rope_scaling is not None and hf.q_lora_rank is not None and hf.topk_method == "noaux_tc"
    same_config(open_gguf(float_split).config, hf)
    same_config(open_gguf(q8_kv_b).config, hf)  # key/value_length per head, as files before MLA-as-MQA have


def test_yarn_betas_absent_are_the_models_own(k2_tiny, v3_tiny, out):
    """llama.cpp's converter writes no YaRN betas for deepseek2: a K2 file then runs K2's 1 and 1 (its config.json,
    what transformers runs), a DeepSeek-V3 file V3's 32 and 1."""
    def drop_betas(pre):
        def edit(meta):
            for key in [k for k in meta if "yarn_beta" in k]:
                del meta[key]
            meta["tokenizer.ggml.pre"] = Meta(meta["tokenizer.ggml.pre"].type, pre)  # what tells K2 from V3
        return edit

    for src, pre, beta_fast in ((k2_tiny, "kimi-k2", 1.0), (v3_tiny, "deepseek-v3", 32.0)):
        folder = export_gguf(src, out / f"betas-{pre}", "F32", edit_metadata=drop_betas(pre))
        scaling = open_gguf(folder).config.rope_scaling
        assert (scaling.beta_fast, scaling.beta_slow) == (beta_fast, 1.0)
        assert scaling == Checkpoint.open(src).config.rope_scaling


def test_float_weights_equal_the_checkpoint(k2_tiny, float_split):
    hf, ckpt = Checkpoint.open(k2_tiny), open_gguf(float_split)
    reference = gguf.GGUFReader  # where gguf-py finds each tensor, and its type
    in_file = {t.name: (path, t.tensor_type.name) for path in gguf_file(float_split) for t in reference(path).tensors}
    for name in names.expected_tensors(hf.config):
        got, info, want = ckpt.weight(name), ckpt.tensors[name], hf.weight(name)
        if info.dtype == "F16":
            want = want.half().float()  # torch's rounding, independent of the reader's
        assert got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want), name
        path, dtype = in_file[info.sources[0]]
        assert info.path == path and info.dtype == dtype and ckpt.weight(name, torch.bfloat16).dtype == torch.bfloat16
    assert ckpt.tensors["model.layers.1.self_attn.o_proj.weight"].dtype == "F16"
    assert ckpt.raw("model.layers.1.mlp.experts.3.up_proj.weight").dtype == torch.bfloat16
    assert ckpt.total_bytes() == sum(t.n_bytes for p in gguf_file(float_split) for t in reference(p).tensors)
    assert not ckpt.is_fp8("model.layers.1.self_attn.q_a_proj.weight")


def test_q8_0_weights_equal_gguf_dequantize(k2_tiny, q8_kv_b):
    hf, ckpt = Checkpoint.open(k2_tiny), open_gguf(q8_kv_b)
    q8 = GGMLQuantizationType.Q8_0
    for name, shape in names.expected_tensors(hf.config).items():
        want = hf.weight(name)
        if len(shape) == 2 and not name.endswith("mlp.gate.weight"):
            want = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(want.numpy(), q8), q8))
            assert ckpt.tensors[name].dtype == "Q8_0"
        assert torch.equal(ckpt.weight(name), want), name


def test_both_mla_layouts_give_the_same_kv_b_proj(k2_tiny, float_split, out):
    hf, split = Checkpoint.open(k2_tiny), open_gguf(float_split)
    whole = open_gguf(export_gguf(k2_tiny, out / "kv_b", MIXED_FLOATS, mla="kv_b"))
    for layer in range(hf.config.num_hidden_layers):
        name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        assert split.tensors[name].sources == (f"blk.{layer}.attn_k_b.weight", f"blk.{layer}.attn_v_b.weight")
        assert whole.tensors[name].sources == (f"blk.{layer}.attn_kv_b.weight",)
        assert torch.equal(split.weight(name), hf.weight(name)) and torch.equal(whole.weight(name), hf.weight(name))


def test_block_types_equal_gguf_dequantize_and_experts_are_zero_copy(blocks):
    src, folder = blocks
    hf, ckpt = Checkpoint.open(src), open_gguf(folder)
    readers = {p: gguf.GGUFReader(p) for p in gguf_file(folder)}
    stored = {t.name: t for r in readers.values() for t in r.tensors}
    for name, info in ckpt.tensors.items():
        got = ckpt.weight(name)
        assert torch.isfinite(got).all(), name
        if name.endswith("kv_b_proj.weight"):  # Q8_0 / Q4_0 of the checkpoint's weights
            assert torch.allclose(got, hf.weight(name), atol=0.15 * hf.weight(name).abs().max().item()), name
            continue
        t = stored[info.sources[0]]
        data = t.data if info.expert is None else t.data[info.expert]
        assert torch.equal(got, torch.from_numpy(np.array(gguf.quants.dequantize(data, t.tensor_type)))), name
    cfg = ckpt.config
    for layer in cfg.moe_layers:
        got = ckpt.expert_blocks(layer)
        assert list(got) == list(names.EXPERT_PROJS)
        for proj, (type_name, array) in got.items():
            t = stored[f"blk.{layer}.ffn_{proj.split('_')[0]}_exps.weight"]
            n_out, n_in = (cfg.hidden_size, cfg.moe_intermediate_size) if proj == "down_proj" else \
                (cfg.moe_intermediate_size, cfg.hidden_size)
            block, type_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
            assert type_name == t.tensor_type.name and array.dtype == np.uint8
            assert array.shape == (cfg.n_routed_experts, n_out, n_in // block * type_bytes)
            assert not array.flags.owndata and not array.flags.writeable
            assert np.shares_memory(array, ckpt.files[ckpt.tensors[names.expert_key(layer, 0, proj)].path].data)
            assert np.array_equal(array, t.data)
            one = gguf.quants.dequantize(array[2], t.tensor_type)
            assert torch.equal(torch.from_numpy(one), ckpt.weight(names.expert_key(layer, 2, proj)))
    with pytest.raises(ValueError, match="no routed experts"):
        ckpt.expert_blocks(0)


def test_blocks_of_one_matrix_and_the_stored_types(blocks):
    ckpt = open_gguf(blocks[1])
    type_name, array = ckpt.blocks("model.layers.1.self_attn.q_a_proj.weight")
    t = next(t for t in gguf.GGUFReader(ckpt.tensors["model.layers.1.self_attn.q_a_proj.weight"].path).tensors
             if t.name == "blk.1.attn_q_a.weight")
    assert type_name == "IQ2_XS" and np.array_equal(array, t.data) and not array.flags.owndata
    type_name, array = ckpt.blocks("model.layers.1.mlp.experts.3.down_proj.weight")
    assert type_name == "IQ1_M" and np.array_equal(array, ckpt.expert_blocks(1)["down_proj"][1][3])
    with pytest.raises(ValueError, match="attn_k_b"):
        ckpt.blocks("model.layers.1.self_attn.kv_b_proj.weight")
    stored = dict(ckpt.config.stored_types)
    assert stored["model.layers.1.mlp.experts.*.down_proj.weight"] == "IQ1_M" and ckpt.config.gguf
    assert stored["model.layers.1.self_attn.kv_b_proj.weight"] == "Q8_0"  # the wider of Q8_0 and Q4_0
    assert stored["model.norm.weight"] == "F32" and len(stored) == len({names.stored_key(n) for n in ckpt.tensors})


def test_float_expert_blocks_are_typed_views(float_split):
    ckpt = open_gguf(float_split)
    type_name, array = ckpt.expert_blocks(1)["up_proj"]
    assert type_name == "BF16" and array.dtype == np.uint16 and array.shape == (16, 128, 256)
    assert not array.flags.owndata
    as_bf16 = torch.from_numpy(array[5].astype(np.int16)).view(torch.bfloat16)
    assert torch.equal(as_bf16.float(), ckpt.weight("model.layers.1.mlp.experts.5.up_proj.weight"))


@pytest.mark.parametrize("type_name", ALL_BLOCK_TYPES)
def test_random_blocks_decode_to_small_finite_weights(type_name):
    rows = random_blocks(type_name, 8, 512, np.random.default_rng(0))
    w = gguf.quants.dequantize(rows, GGMLQuantizationType[type_name])
    assert w.shape == (8, 512) and np.isfinite(w).all() and 0 < np.abs(w).max() < 100  # K: d x 6-bit x 5-bit


def test_parser_agrees_with_gguf_reader(float_split, blocks):
    for path in gguf_file(float_split) + gguf_file(blocks[1]):
        ours, theirs = open_gguf(path).files[path], gguf.GGUFReader(path)
        keys = [k for k in theirs.fields if not k.startswith("GGUF.")]
        assert list(ours.fields) == keys
        for key in keys:
            value, field = ours.fields[key].value, theirs.fields[key]
            value = [v for v in value] if isinstance(value, (list, np.ndarray)) else value
            assert ours.fields[key].type == field.types[0] and value == field.contents(), key
        assert list(ours.tensors) == [t.name for t in theirs.tensors]
        for t in theirs.tensors:
            mine = ours.tensors[t.name]
            assert (mine.type_name, mine.ggml_shape, mine.offset, mine.nbytes) == \
                (t.tensor_type.name, tuple(t.shape.tolist()), t.data_offset, t.n_bytes)
            view = ours.view(t.name)
            assert np.array_equal(view.view(np.uint8), t.data.view(np.uint8)) and np.shares_memory(view, ours.data)


@pytest.fixture(scope="module")
def k2_sized(out):
    """K2-0905's real dimensions and 163,840-token vocabulary in three sparse splits (~270 GB apparent), opened."""
    hf = load_config(K2_FILES / "config_0905.reconstructed.json")
    return hf, open_gguf(full_size_gguf(hf, K2_FILES, out / "k2", n_shards=3))


def test_tokenizer_from_gguf_is_k2s_tiktoken_model(k2_sized):
    ckpt = k2_sized[1]
    ours, k2 = TiktokenTokenizer.from_gguf(ckpt), Tokenizer.from_folder(K2_FILES)
    assert ours.n_vocab == k2.n_vocab == ckpt.config.vocab_size == 163840
    assert ours.special == k2.special and ours.special_tokens_map == k2.special_tokens_map
    for text in CORPUS:
        assert ours.encode(text) == k2.encode(text) and ours.decode(k2.encode(text)) == text
        assert ours.encode(text, allow_special=False) == k2.encode(text, allow_special=False)
    assert all(ours.token_bytes(i) == k2.token_bytes(i) for i in range(0, 163840, 97))
    template = ckpt.tokenizer_pieces()[3]
    assert template == k2_config_template() and "<|im_end|>" in template


def k2_config_template():
    import json

    return json.loads((K2_FILES / "tokenizer_config.json").read_text())["chat_template"]


def test_tiny_vocabulary_round_trips(k2_tiny, float_split):
    ours, theirs = TiktokenTokenizer.from_gguf(open_gguf(float_split)), Tokenizer.from_folder(k2_tiny)
    assert ours.special == theirs.special and ours.special_tokens_map == theirs.special_tokens_map
    assert ours.encode(CORPUS[4] + CORPUS[1]) == theirs.encode(CORPUS[4] + CORPUS[1])
    assert open_gguf(float_split).tokenizer_pieces()[3] is None  # the tiny checkpoint has no template


def test_v3_without_q_lora_reads_q_proj(v3_tiny, out):
    hf = Checkpoint.open(v3_tiny)
    ckpt = open_gguf(export_gguf(v3_tiny, out / "v3", "BF16"))
    same_config(ckpt.config, replace(hf.config, model_type="kimi_k2"))  # its tiktoken files make it K2-like
    assert ckpt.config.q_lora_rank is None and ckpt.config.n_group == 8
    name = "model.layers.2.self_attn.q_proj.weight"
    assert ckpt.tensors[name].sources == ("blk.2.attn_q.weight",) and torch.equal(ckpt.weight(name), hf.weight(name))


def edit(key, value=None, type_=None):
    def change(meta):
        if value is None:
            del meta[key]
        else:
            meta[key] = Meta(type_ or meta[key].type, value)
    return change


def test_another_tokenizer_is_refused_in_one_line(blocks, out):
    folder = export_gguf(blocks[0], out / "pre", "BF16", edit_metadata=edit("tokenizer.ggml.pre", "deepseek-v3"))
    ckpt = open_gguf(folder)
    assert ckpt.config.model_type == "deepseek_v3"
    with pytest.raises(ConfigError) as e:
        ckpt.tokenizer_pieces()
    assert "\n" not in str(e.value) and str(folder / "Tiny.gguf") in str(e.value) and "'deepseek-v3'" in str(e.value)


def test_missing_split(float_split, tmp_path):
    folder = shutil.copytree(float_split, tmp_path / "set")
    (folder / "Tiny-00002-of-00003.gguf").unlink()
    for path in (folder, folder / "Tiny-00001-of-00003.gguf"):
        message = one_line(CheckpointError, path)
        assert str(folder / "Tiny-00002-of-00003.gguf") in message and "missing" in message


@pytest.mark.parametrize("change, error_type, words", [
    (dict(edit_metadata=edit("general.architecture", "llama")), CheckpointError, ["general.architecture", "'llama'"]),
    (dict(edit_metadata=edit("deepseek2.expert_count")), ConfigError, ["'deepseek2.expert_count' is missing"]),
    (dict(edit_metadata=edit("deepseek2.block_count", "3", gguf.GGUFValueType.STRING)), ConfigError,
     ["'deepseek2.block_count' must be an integer, got string"]),
    (dict(edit_tensor=lambda n, w: w[:-1] if n == "blk.1.attn_q_a.weight" else w), CheckpointError,
     ["blk.1.attn_q_a.weight", "[95, 256]", "[96, 256]"]),
    (dict(edit_tensor=lambda n, w: None if n == "blk.1.ffn_norm.weight" else w), CheckpointError,
     ["blk.1.ffn_norm.weight", "missing"]),
    (dict(edit_tensor=lambda n, w: w[:-1] if n == "blk.1.ffn_up_exps.weight" else w), CheckpointError,
     ["blk.1.ffn_up_exps.weight", "holds 3 experts", "deepseek2.expert_count"]),
], ids=["architecture", "missing-key", "key-type", "tensor-shape", "missing-tensor", "expert-count"])
def test_damaged_files_fail_in_one_line_naming_file_and_key(blocks, tmp_path, change, error_type, words):
    folder = export_gguf(blocks[0], tmp_path, "BF16", **change)
    message = one_line(error_type, folder)
    assert str(folder / "Tiny.gguf") in message and all(w in message for w in words), message


def test_k2_sized_split_set_opens_from_its_headers(k2_sized):
    """Opening parses headers and the token list only (gguf.GGUFReader alone takes ~10 s over that list)."""
    hf, ckpt = k2_sized
    same_config(ckpt.config, hf, skip=("source", "fp8_block", "stored_types"))
    assert len(ckpt.tensors) == len(names.expected_tensors(hf)) == 69975
    assert ckpt.tensors["model.layers.60.self_attn.kv_b_proj.weight"].shape == (64 * 256, 512)
    blocks = ckpt.expert_blocks(60)
    assert blocks["down_proj"][0] == "IQ2_XXS" and blocks["down_proj"][1].shape == (384, 7168, 2048 // 256 * 66)


def test_not_gguf_or_truncated(q8_kv_b, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a GGUF file" in one_line(CheckpointError, junk)
    cut = tmp_path / "cut" / "Tiny.gguf"
    cut.parent.mkdir()
    cut.write_bytes((q8_kv_b / "Tiny.gguf").read_bytes()[:-5000])
    assert "truncated" in one_line(CheckpointError, cut.parent)
    cut.write_bytes((q8_kv_b / "Tiny.gguf").read_bytes()[:3000])
    assert "corrupt or truncated GGUF header" in one_line(CheckpointError, cut)
    (tmp_path / "empty").mkdir()
    assert "no .gguf file" in one_line(CheckpointError, tmp_path / "empty")
