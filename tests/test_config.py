"""config.json parsing: K2's real files, and one clear error per impossible or missing value."""

import json

import pytest

from conftest import K2_FILES
from hybrid.read.config import load_config
from hybrid.errors import ConfigError

K2_0905 = K2_FILES / "config_0905.reconstructed.json"


def test_k2_configs_parse_with_their_real_values():
    for name, factor in (("config_0711.json", 32.0), ("config_0905.reconstructed.json", 64.0)):
        cfg = load_config(K2_FILES / name)
        assert cfg.model_type == "kimi_k2"
        assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.first_k_dense_replace) == (7168, 61, 1)
        assert (cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (384, 8, 2048)
        assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank, cfg.num_attention_heads) == (512, 64, 1536, 64)
        assert (cfg.scoring_func, cfg.topk_method, cfg.n_group) == ("sigmoid", "noaux_tc", 1)
        assert cfg.routed_scaling_factor == 2.827 and cfg.vocab_size == 163840
        assert cfg.rope_scaling.factor == factor and cfg.rope_scaling.original_max_position_embeddings == 4096
        assert cfg.fp8_block == (128, 128)
        # The compressed MLA cache: (512 + 64) x 61 layers x 2 bytes.
        assert cfg.kv_cache_bytes_per_token == 70272


def write(tmp_path, **changes):
    raw = json.loads(K2_0905.read_text())
    for key, value in changes.items():
        if value is DELETE:
            raw.pop(key)
        else:
            raw[key] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


DELETE = object()

BAD = [
    (dict(hidden_size=DELETE), "hidden_size", "missing"),
    (dict(num_experts_per_tok=400), "num_experts_per_tok", "exceeds n_routed_experts"),
    (dict(n_group=8, topk_group=9), "topk_group", "exceeds n_group"),
    (dict(n_group=5), "n_routed_experts", "not divisible by n_group"),
    (dict(topk_method="sparsemixer"), "topk_method", "supported"),
    (dict(scoring_func="relu"), "scoring_func", "supported"),
    (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "rope_scaling.type", "supported"),
    (dict(model_type="llama"), "model_type", "supported"),
    (dict(hidden_size="7168"), "hidden_size", "integer"),
    (dict(vocab_size=0), "vocab_size", ">= 1"),
    (dict(rms_norm_eps=-1.0), "rms_norm_eps", "> 0"),
    (dict(hidden_act="gelu"), "hidden_act", "silu"),
    (dict(moe_layer_freq=2), "moe_layer_freq", "must be 1"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim", "even"),
    (dict(eos_token_id=999999), "eos_token_id", "outside vocab"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config.quant_method", "fp8"),
]


@pytest.mark.parametrize("changes,key,what", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_value_is_one_error_naming_file_and_key(tmp_path, changes, key, what):
    path = write(tmp_path, **changes)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and f"'{key}'" in msg and what in msg and "\n" not in msg


def test_rope_type_is_accepted_as_well_as_type(tmp_path):
    rs = json.loads(K2_0905.read_text())["rope_scaling"]
    rs["rope_type"] = rs.pop("type")
    assert load_config(write(tmp_path, rope_scaling=rs)).rope_scaling.factor == 64.0


def test_training_only_and_unknown_keys_are_ignored(tmp_path):
    cfg = load_config(write(tmp_path, aux_loss_alpha=DELETE, seq_aux=DELETE, ep_size=8, num_nextn_predict_layers=1))
    assert cfg.hidden_size == 7168


def test_unreadable_file_names_itself(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_config(path)
    with pytest.raises(ConfigError, match="config.json not found"):
        load_config(tmp_path / "nowhere")
