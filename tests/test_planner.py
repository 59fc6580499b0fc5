"""The planner on the real K2 config: sizes, fits and refusals, hot experts, NUMA, disk-backed experts, GPUs
named by their index."""

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from hybrid.errors import PlanError
from hybrid.read.names import quantizable
from placement import memory, presets
from placement.hardware import describe, gpu_device, load_hardware
from placement.plan import Plan, Rule
from placement.planner import PlanRequest, evaluate, make_plan

ROOT = Path(__file__).resolve().parents[1]

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


def test_two_numa_nodes_project_the_unsplit_experts_slower():
    one, two = make_plan(K2, "k2", hw()), make_plan(K2, "k2", hw(numa_nodes=2))
    assert one.projection.decode_tps > 1.3 * two.projection.decode_tps  # the kernels do not split experts by node
    assert any("do not split experts across nodes" in r for r in two.reasons)


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


def test_two_gpus_plan_onto_the_first_by_its_name(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("gpu: [RTX 4090, {name: big, memory_gib: 80, bandwidth_gbps: 3000, bf16_tflops: 900}]\n"
                    "ram_gib: 768\nmemory: DDR5-4800x8\ncores: 32\n")
    two = load_hardware(path)
    assert [g.name for g in two.gpus] == ["RTX 4090", "big"] and two.gpu_device == gpu_device(0) == "cuda:0"
    r = make_plan(K2, "k2", two, PlanRequest(context_length=131072))
    one = make_plan(K2, "k2", hw(), PlanRequest(context_length=131072))
    assert r.plan.rules == one.plan.rules and r.plan.settings == one.plan.settings  # planned for the 4090 alone
    assert r.plan.devices == {"cpu", "cuda:0"} and r.plan.cache_device == "cuda:0"
    rules = (Rule(r"\.mlp\.experts\.", "cpu", "int4", "cpu_moe"), Rule(".*", gpu_device(1), "bf16", "torch"))
    with pytest.raises(PlanError, match="second.yaml: cache_device cuda:0 is not the attention's device cuda:1"):
        evaluate(Plan("k2", r.plan.settings, rules, source="second.yaml"), K2, two)
    unset = replace(r.plan.settings, cache_device=None)  # the attention's device, cuda:1
    with pytest.raises(PlanError, match=r"second.yaml: places tensors on cuda:1, but plans use one GPU \(cuda:0\)"):
        evaluate(Plan("k2", unset, rules, source="second.yaml"), K2, two)


FLAG_ERRORS = [
    ("--experts int3", "--experts int3: not one of bf16, int8, int4 (with -g32, -g64 or -g128) or gguf (a GGUF "
                       "checkpoint's experts as stored)"),
    ("--experts Q4_K", "--experts Q4_K: not one of bf16, int8, int4 (with -g32, -g64 or -g128) or gguf (a GGUF "
                       "checkpoint's experts as stored)"),
    ("--cores 0", "--cores must be a whole number, 1 or more, got 0"),
    ("--context 0", "--context must be a whole number, 1 or more, got 0"),
    ("--context -5", "--context must be a whole number, 1 or more, got -5"),
    ("--batch 0", "--batch must be a whole number, 1 or more, got 0"),
    ("--gpu-expert-layers -1", "--gpu-expert-layers must be a whole number, 0 or more, got -1"),
    ("--ram -5GB", "--ram: '-5GB' is not a size like 768GB or 24GiB"),
    ("--ram 0", "--ram must be a number above 0, got 0.0"),
    ("--gpu-memory -3", "--gpu-memory must be a number above 0, got -3.0"),
    ("--ram-bandwidth 0", "--ram-bandwidth must be a number above 0, got 0.0"),
    ("--disk-bandwidth -1", "--disk-bandwidth must be a number above 0, got -1.0"),
    ("--numa-nodes 0", "--numa-nodes must be a whole number, 1 or more, got 0"),
]


@pytest.mark.parametrize("flags,line", FLAG_ERRORS, ids=[f for f, _ in FLAG_ERRORS])
def test_nonsense_flags_are_one_line_before_planning(flags, line):
    """`hybrid plan kimi-k2 --gpu "RTX 4090" --ram 768GB FLAGS`: one line and exit code 2 (was a ValueError or
    ZeroDivisionError traceback, or a plan for a context of 0)."""
    from click.testing import CliRunner

    from hybrid.cli import cli

    r = CliRunner().invoke(cli, ["plan", "kimi-k2", "--gpu", "RTX 4090", "--ram", "768GB", *flags.split()])
    assert (r.exit_code, r.output) == (2, f"error: {line}\n")


DEFS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def code_strings(path: Path) -> list[str]:
    """A module's string constants, f-string parts included; docstrings (which show plan files) left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, DEFS) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_gpu_device_names_come_from_one_function():
    modules = [path for pkg in ("placement", "hybrid") for path in sorted((ROOT / pkg).rglob("*.py"))]
    spelled = [str(path.relative_to(ROOT)) for path in modules if any("cuda:0" in s for s in code_strings(path))]
    assert spelled == [], "name a GPU's device with placement.hardware.gpu_device(index)"


def test_an_expert_width_the_format_does_not_divide(tmp_path):
    """Width 96: int4-g128 is refused with the format that fits named; planning for this machine picks it."""
    from hybrid.generation.runtime import plan_for_this_machine
    from hybrid.read.checkpoint import Checkpoint
    from hybrid.read.tiny import TinySpec, make_tiny

    folder = make_tiny(tmp_path / "w96", TinySpec(layers=2, experts=8, top_k=2, moe_width=96))
    cfg = Checkpoint.open(folder).config
    with pytest.raises(PlanError, match="expert width \\(moe_intermediate_size\\) 96 is not a multiple of 128.*"
                                        "--experts int4-g32"):
        make_plan(cfg, str(folder), hw("none"), PlanRequest())
    assert plan_for_this_machine(Checkpoint.open(folder)).plan.settings.expert_format == "int4-g32"


def test_plan_takes_a_hub_id_from_the_cache_reading_only_its_config(tmp_path):
    """`hybrid plan org/name`: the config.json in the Hugging Face cache is all it reads (no shards needed).
    In a process of its own: huggingface_hub reads HF_HUB_CACHE when it is imported."""
    import json
    import os
    import subprocess
    import sys

    repo = tmp_path / "hub" / "models--moonshotai--Kimi-K2-Instruct-0905"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    config = Path(__file__).parent / "data" / "kimi-k2" / "config_0905.reconstructed.json"
    (repo / "snapshots" / "abc" / "config.json").write_text(config.read_text())
    env = os.environ | {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    hybrid = str(Path(sys.executable).parent / "hybrid")
    r = subprocess.run([hybrid, "plan", "moonshotai/Kimi-K2-Instruct-0905", "--gpu", "RTX 4090", "--ram", "768GB",
                        "--json"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == "moonshotai/Kimi-K2-Instruct-0905"
    r = subprocess.run([hybrid, "plan", "nobody/nothing"], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "not in the Hugging Face cache" in r.stderr


# --- GPU prefill: experts streamed to the GPU for long prefill chunks

def test_gpu_prefill_threshold_is_where_the_copy_beats_the_cpu():
    machine = hw()
    plan = make_plan(K2, "k2", machine, PlanRequest(context_length=131072)).plan
    s = plan.settings
    # by hand: one MoE layer's int4 experts over PCIe against the CPU's FLOPs for C tokens (and reading the experts
    # from RAM, which the CPU path does and the copy replaces)
    layer_bytes = K2.n_routed_experts * memory.expert_bytes(K2, "int4")
    copy_s = layer_bytes / (machine.gpu.pcie_gbps * 1e9)
    read_s = layer_bytes / (machine.ram_bandwidth_gbps * 1e9 * machine.cpu_kernel_efficiency)
    per_token_s = K2.num_experts_per_tok * 6 * K2.hidden_size * K2.moe_intermediate_size / machine.cpu_flops
    assert s.gpu_prefill_tokens - 64 < (copy_s - read_s) / per_token_s <= s.gpu_prefill_tokens
    assert s.prefill_chunk >= s.gpu_prefill_tokens  # a chunk that reaches it, or the setting would do nothing
    budget = make_plan(K2, "k2", machine, PlanRequest(context_length=131072)).budget
    assert budget.by_device["cuda:0"]["staging"] == budget.by_device["cpu"]["staging"] == 2 * memory.STAGING_SLOT_BYTES


def test_gpu_prefill_projects_faster_prompts_than_the_cpu():
    result = make_plan(K2, "k2", hw(), PlanRequest(context_length=131072))
    streamed = result.projection.prompt_prefill_tps
    assert sorted(streamed) == [2048, 8192, 32768]
    plan = result.plan
    off = replace(plan, settings=replace(plan.settings, gpu_prefill_tokens=0))
    on_cpu = evaluate(off, K2, hw()).projection.prompt_prefill_tps
    assert all(streamed[n] > 2 * on_cpu[n] for n in streamed)
    assert "staging" not in evaluate(off, K2, hw()).budget.by_device["cuda:0"]


def test_gpu_prefill_is_off_without_a_gpu_and_for_short_contexts_lists_only_fitting_prompts():
    cpu_only = make_plan(K2, "k2", hw(gpu="none"), PlanRequest(context_length=8192))
    assert cpu_only.plan.settings.gpu_prefill_tokens == 0
    assert sorted(cpu_only.projection.prompt_prefill_tps) == [2048, 8192]
