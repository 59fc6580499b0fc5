"""The planner on the real K2 config: sizes, fits and refusals, hot experts, NUMA, disk-backed experts."""

import pytest

from hybrid.errors import PlanError
from hybrid.names import quantizable
from placement import memory, presets
from placement.hardware import describe
from placement.planner import PlanRequest, make_plan

K2 = presets.load("kimi-k2-instruct-0905")
WORKSTATION = dict(memory="DDR5-4800x8", cores=32)


def hw(gpu="RTX 4090", ram="768GB", **kw):
    return describe(gpu=gpu, ram=ram, **(WORKSTATION | kw))


def test_k2_preset_sizes():
    total = sum(memory.param_counts(K2).values())
    assert abs(total / 1.026e12 - 1) < 0.005
    checkpoint_bytes = routed = 0
    for name, shape in memory.tensors(K2):
        b = memory.tensor_bytes(name, shape, "fp8" if quantizable(name) else "bf16")
        checkpoint_bytes += b
        routed += b if memory.is_routed_expert(name) else 0
    assert 0.984 < routed / checkpoint_bytes < 0.988  # ~98.6 % of the FP8 checkpoint is routed experts
    assert memory.kv_cache_bytes(K2, 1) == 68.625 * 1024


def test_presets_cover_the_family():
    for name, params in (("deepseek-v3", 671e9), ("deepseek-r1", 671e9), ("moonlight-16b-a3b", 15.96e9),
                         ("kimi-k2-instruct", 1.026e12)):
        assert abs(sum(memory.param_counts(presets.load(name)).values()) / params - 1) < 0.01, name


def test_24gb_gpu_and_768gb_ram_fit_k2_int4_at_128k():
    r = make_plan(K2, "k2", hw(), PlanRequest(context_length=131072, expert_format="int4"))
    assert r.budget.total("cuda:0") <= 24 * memory.GIB
    assert r.plan.rule_for("model.layers.5.mlp.experts.3.up_proj.weight").kernel == "cpu_moe"
    assert r.plan.rule_for("model.layers.5.self_attn.kv_b_proj.weight").device == "cuda:0"
    assert r.budget.by_device["cuda:0"]["kv_cache"] == memory.kv_cache_bytes(K2, 131072)
    assert 1 < r.projection.decode_tps < 100 and r.projection.bound == "cpu_experts"


def test_512gb_ram_says_by_how_much_and_offers_disk():
    with pytest.raises(PlanError) as e:
        make_plan(K2, "k2", hw(ram="512GB"), PlanRequest(context_length=131072))
    msg = str(e.value)
    assert "short by" in msg and "--allow-disk" in msg and "tok/s" in msg
    r = make_plan(K2, "k2", hw(ram="512GB"), PlanRequest(context_length=131072, allow_disk=True))
    assert r.plan.settings.expert_backing == "disk" and r.traffic.ram_hit_rate < 1


def test_int8_that_does_not_fit_offers_int4_with_its_speed():
    with pytest.raises(PlanError) as e:
        make_plan(K2, "k2", hw(), PlanRequest(expert_format="int8"))
    assert "--experts int4-g128 (" in str(e.value) and "tok/s" in str(e.value)


def test_12gb_gpu_at_256k_is_refused_with_numbers():
    with pytest.raises(PlanError) as e:
        make_plan(K2, "k2", hw(gpu="RTX 4070 Ti"), PlanRequest(context_length=262144))
    msg = str(e.value)
    assert "on cuda:0" in msg and "has 12.0" in msg and "kv cache 17.2 at 262144 tokens" in msg


def test_16gb_gpu_at_256k_is_offered_a_shorter_context():
    with pytest.raises(PlanError, match=r"would fit: --context \d+ \(\d+\.\d tok/s decode\)"):
        make_plan(K2, "k2", hw(gpu="RTX 4080"), PlanRequest(context_length=262144))


def test_80gb_gpu_takes_expert_layers():
    r = make_plan(K2, "k2", hw(gpu="H100"), PlanRequest(context_length=131072))
    assert r.plan.settings.gpu_expert_layers == (1,)
    assert r.plan.rule_for("model.layers.1.mlp.experts.3.up_proj.weight").device == "cuda:0"
    assert r.plan.rule_for("model.layers.2.mlp.experts.3.up_proj.weight").device == "cpu"
    assert 0 < r.traffic.gpu_expert_share < 0.05


def test_no_gpu_gives_all_cpu_plan():
    r = make_plan(K2, "k2", hw(gpu="none"))
    assert r.plan.devices == {"cpu"} and "cuda:0" not in r.budget.by_device


def test_ram_too_small_is_refused():
    with pytest.raises(PlanError, match="has 56.0 available"):
        make_plan(K2, "k2", hw(ram="64GB"))


def test_hot_experts_absorb_more_traffic_than_their_share():
    counts = {layer: [1000 if e < 8 else 1 for e in range(384)] for layer in K2.moe_layers}
    r = make_plan(K2, "k2", hw(gpu="H100"), PlanRequest(context_length=131072, routing_counts=counts))
    gpu_rules = [rule for rule in r.plan.rules if "experts" in rule.match and rule.device == "cuda:0"]
    assert gpu_rules and r.traffic.gpu_expert_share > 0.5
    uniform = make_plan(K2, "k2", hw(gpu="H100"), PlanRequest(context_length=131072))
    assert r.projection.decode_tps > uniform.projection.decode_tps


def test_numa_split_projects_faster_than_unsplit():
    two = hw(numa_nodes=2)
    split = make_plan(K2, "k2", two, PlanRequest(numa_split=True))
    unsplit = make_plan(K2, "k2", two, PlanRequest(numa_split=False))
    assert split.projection.decode_tps > 1.3 * unsplit.projection.decode_tps


def test_routing_counts_raise_the_page_cache_hit_rate():
    skewed = {layer: [100 if e % 4 == 0 else 1 for e in range(384)] for layer in K2.moe_layers}
    req = PlanRequest(context_length=131072, allow_disk=True)
    uniform = make_plan(K2, "k2", hw(ram="256GB"), req)
    hot = make_plan(K2, "k2", hw(ram="256GB"), PlanRequest(context_length=131072, allow_disk=True,
                                                           routing_counts=skewed))
    assert hot.traffic.ram_hit_rate > uniform.traffic.ram_hit_rate
    assert hot.projection.decode_tps > uniform.projection.decode_tps


def test_context_beyond_the_model_is_refused():
    with pytest.raises(PlanError, match="max_position_embeddings"):
        make_plan(K2, "k2", hw(), PlanRequest(context_length=10**6))
