"""Plan files: round trip, and one error naming file and line per bad case; the check against the model and the
machine that `hybrid plan --check` and the runtime share; the cache device and expert backing the runtime obeys;
KTransformers rules; hardware files; the CLI."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from hybrid.cli import cli
from hybrid.errors import PlanError
from hybrid.generation.runtime import open_runtime
from hybrid.read.config import load_config
from placement import presets
from hybrid.run.experts import HybridExperts
from hybrid.run.loader import cache_device, load_model, torch_device
from placement.hardware import describe, device_here, hardware_to_dict, load_hardware
from placement.ktransformers import translate
from placement.plan import Architecture, Plan, Rule, Settings
from placement.plan_file import dump_plan, load_checked_plan, load_plan, save_plan
from placement.planner import PlanRequest, evaluate, make_plan

K2 = presets.load("kimi-k2-instruct-0905")
HW = describe(gpu="RTX 4090", ram="768GB", memory="DDR5-4800x8", cores=32)
HYBRID = str(Path(sys.executable).parent / "hybrid")

GOOD = """\
model: kimi-k2-instruct-0905
settings:
  context_length: 16384
  cpu_threads: 16
  prefill_chunk: 64
rules:
  - match: '\\.mlp\\.experts\\.'
    device: cpu
    format: int4
    kernel: cpu_moe
  - match: '^model\\.embed_tokens\\.'
    device: cpu
    format: bf16
    kernel: torch
  - match: '.*'
    device: cuda:0
    format: bf16
    kernel: torch
"""


def write(tmp_path, text):
    path = tmp_path / "plan.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_round_trip(tmp_path):
    made = make_plan(K2, "kimi-k2-instruct-0905", HW, PlanRequest(context_length=131072)).plan
    path = tmp_path / "p.yaml"
    path.write_text(dump_plan(made, "a header"))
    back = load_plan(path)
    assert back.settings == made.settings and back.settings.cache_device == "cuda:0"
    assert [(r.match, r.device, r.format, r.kernel, r.options) for r in back.rules] == \
           [(r.match, r.device, r.format, r.kernel, r.options) for r in made.rules]
    assert evaluate(back, K2, HW).budget.total("cuda:0") == evaluate(made, K2, HW).budget.total("cuda:0")
    assert back.architecture == made.architecture == Architecture.of(K2)
    assert "architecture:\n  num_hidden_layers: 61\n  first_k_dense_replace: 1\n" in path.read_text()


def test_hand_written_plan_is_checked_and_projected(tmp_path):
    result = evaluate(load_plan(write(tmp_path, GOOD)), K2, HW)
    assert result.plan.settings.context_length == 16384 and result.projection.decode_tps > 1
    assert result.plan.settings.cache_device is None and result.plan.cache_device == "cuda:0"  # the attention's
    assert "cache_device: cuda:0" in dump_plan(result.plan)
    # plan files written before numa_split was removed hold "numa_split: false": they still load
    old = load_plan(write(tmp_path, GOOD.replace("cpu_threads: 16", "cpu_threads: 16\n  numa_split: false")))
    assert old.settings == result.plan.settings


BAD = [
    ("settings:\n  contxt_length: 5\nrules: []\n", 2, "unknown key 'contxt_length'"),
    (GOOD.replace("  - match: '.*'", "  - match: '(unclosed'"), 15, "bad regex"),
    (GOOD.replace("device: cuda:0", "device: tpu:0"), 15, "unknown device 'tpu:0'"),
    (GOOD.replace("format: int4", "format: int3"), 7, "unknown format 'int3'"),
    (GOOD.replace("kernel: cpu_moe", "kernel: marlin"), 7, "unknown kernel 'marlin'"),
    (GOOD.replace("    kernel: torch\n", "    kernel: torch\n    colour: red\n", 1), 15, "unknown key 'colour'"),
    (GOOD.replace("cpu_threads: 16", "cpu_threads: many"), 4, "positive integer"),
    (GOOD.replace("cpu_threads: 16", "cache_device: gpu"), 4, "unknown cache_device 'gpu'"),
    (GOOD.replace("cpu_threads: 16", "cache_device: cpu"), 4, "cache_device cpu is not the attention's device cuda:0"),
    (GOOD.replace("cpu_threads: 16", "numa_split: true"), 4, "setting 'numa_split' was removed (nothing read it"),
    (GOOD.replace("cpu_threads: 16", "expert_backing: tape"), 4, "expert_backing must be one of ram, disk"),
    ("rules:\n  - match: x\n    device: cpu\n    kernel: torch\n", 2, "missing key 'format'"),
    ("model: [unclosed\n", 2, "not valid YAML"),
    ("architecture: {hidden_size: 7168}\n" + GOOD, 1, "architecture is missing key 'num_hidden_layers'"),
    (GOOD.replace("kernel: cpu_moe", "kernel: cpu_moe\n    options: {threads: 0}"), 7,
     "option threads must be a whole number, 1 or more, got 0"),
]


@pytest.mark.parametrize("text,line,what", BAD, ids=[b[2] for b in BAD])
def test_bad_file_names_file_and_line(tmp_path, text, line, what):
    path = write(tmp_path, text)
    with pytest.raises(PlanError) as e:
        load_plan(path)
    assert f"{path}:{line}:" in str(e.value) and what in str(e.value)


def test_unplaced_tensors_are_named(tmp_path):
    plan = load_plan(write(tmp_path, GOOD.split("  - match: '.*'")[0]))
    with pytest.raises(PlanError, match=r"plan.yaml: tensor model\.norm\.weight matches no rule"):
        evaluate(plan, K2, HW)


def test_overflowing_plan_is_refused_with_numbers(tmp_path):
    plan = load_plan(write(tmp_path, GOOD.replace("format: int4", "format: bf16").replace(
        "device: cpu\n    format: bf16\n    kernel: cpu_moe", "device: cuda:0\n    format: bf16\n    kernel: torch")))
    with pytest.raises(PlanError, match=r"plan.yaml: needs [\d.]+ GiB on cuda:0 \(routed experts [\d.]+.*\), has 24.0"):
        evaluate(plan, K2, HW)


def test_cpu_moe_on_non_expert_tensors_is_refused(tmp_path):
    plan = load_plan(write(tmp_path, GOOD.replace("'\\.mlp\\.experts\\.'", "'\\.mlp\\.'")))
    with pytest.raises(PlanError, match="plan.yaml:7: kernel cpu_moe computes routed experts only"):
        evaluate(plan, K2, HW)


def test_a_plan_for_another_model_is_refused_whatever_its_folder_is_called(tmp_path):
    """`hybrid plan deepseek-v3 --check k2.yaml` (and generate/chat/serve/profile, through load_checked_plan):
    the architecture the file records is compared, not the name under `model:`."""
    v3 = presets.load("deepseek-v3")
    path = tmp_path / "k2.yaml"
    save_plan(make_plan(K2, "/models/Kimi-K2-Instruct-0905", HW, PlanRequest(context_length=16384)).plan, path)
    with pytest.raises(PlanError) as e:
        evaluate(load_plan(path), v3, HW)
    assert str(e.value) == (f"{path}: written for another model (/models/Kimi-K2-Instruct-0905: first_k_dense_replace "
                            f"1, n_routed_experts 384), not for {v3.source} (first_k_dense_replace 3, n_routed_experts "
                            f"256); make a plan for it with `hybrid plan MODEL -o FILE`")
    assert evaluate(load_plan(path), K2, HW).notes == ()  # K2, wherever its folder is and whatever it is called
    # Files written before plans recorded their architecture: the preset (or folder) `model:` names is compared...
    with pytest.raises(PlanError, match="plan.yaml: written for another model \\(kimi-k2-instruct-0905: "):
        evaluate(load_plan(write(tmp_path, GOOD)), v3, HW)
    # ... and when it names neither, that is said, not passed over in silence.
    gone = load_plan(write(tmp_path, GOOD.replace("model: kimi-k2-instruct-0905", "model: /gone/K2")))
    assert evaluate(gone, K2, HW).notes == (
        f"{gone.source}: names no architecture (written before plan files recorded it) and its model '/gone/K2' is "
        f"no preset or folder here, so it was not compared with this checkpoint; `hybrid plan CHECKPOINT -o FILE` "
        f"writes a plan that records it",)


def test_the_runtime_refuses_a_plan_for_another_checkpoint_before_loading(k2_tiny, v3_tiny, tmp_path):
    plan = tmp_path / "plan.yaml"
    r = CliRunner().invoke(cli, ["plan", str(k2_tiny), "--gpu", "none", "--ram", "16GB", "--cores", "1",
                                 "-o", str(plan)])
    assert r.exit_code == 0, r.output
    with pytest.raises(PlanError) as e:
        open_runtime(v3_tiny, plan)
    assert str(e.value).startswith(f"{plan}: written for another model ({k2_tiny}: n_routed_experts 16), not for "
                                   f"{v3_tiny / 'config.json'} (n_routed_experts 32)")
    renamed = tmp_path / "Kimi-K2-renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((k2_tiny / "config.json").read_text())
    cpu_only = describe(gpu="none", ram="16GB", cores=1)
    assert load_checked_plan(plan, load_config(renamed / "config.json"), cpu_only).notes == ()


def test_a_gpu_plan_on_a_machine_without_one_runs_on_the_cpu_with_one_note(tmp_path):
    """One rule, hardware.device_here, for `hybrid plan --check`, load_checked_plan and the loader: a GPU this
    machine lacks runs on the CPU (plan files are shared between machines), said in one note line."""
    path = write(tmp_path, GOOD)
    note = (f"{path}: places tensors on cuda:0, but this machine has no GPU: those parts run on the CPU here "
            f"(checked and projected that way)")
    cpu_only = describe(gpu="none", ram="768GB", cores=32)
    result = evaluate(load_plan(path), K2, cpu_only)
    assert result.notes == (note,) and set(result.budget.by_device) == {"cpu"} and result.plan.cache_device == "cpu"
    assert load_checked_plan(path, K2, cpu_only).notes == (note,)  # what the runtime front ends get
    r = CliRunner().invoke(cli, ["plan", "kimi-k2", "--gpu", "none", "--ram", "768GB", "--cores", "32",
                                 "--check", str(path)])
    assert r.exit_code == 0 and f"note: {note}\n" in r.output, r.output
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert torch_device("cuda:0") == torch.device(device_here("cuda:0", n_gpus))
    assert (device_here("cuda:0", 0), device_here("cuda:1", 1), device_here("cuda:1", 2)) == ("cpu", "cpu", "cuda:1")


def test_more_threads_than_cores_is_a_note_and_a_longer_context_than_the_model_a_refusal(tmp_path):
    path = write(tmp_path, GOOD)  # cpu_threads: 16
    few = describe(gpu="RTX 4090", ram="768GB", cores=8)
    assert evaluate(load_plan(path), K2, few).notes == (
        f"{path}: 16 CPU expert threads on 8 cores: they will share cores and run slower; set cpu_threads (and any "
        f"threads option) to 8 for this machine",)
    with pytest.raises(PlanError) as e:
        evaluate(load_plan(write(tmp_path, GOOD.replace("context_length: 16384", "context_length: 1000000"))), K2, HW)
    assert str(e.value) == f"{path}: context_length 1000000 exceeds the model's max_position_embeddings (262144)"


def tiny_plan(backing="ram"):
    return Plan("tiny", Settings(cpu_threads=2, expert_backing=backing), (
        Rule(r"\.mlp\.experts\.", "cpu", "int8", "cpu_moe"), Rule(".*", "cuda:0", "fp32", "torch")), source="tiny.yaml")


def test_disk_backed_experts_need_a_store(k2_tiny, tmp_path):
    from hybrid.read.convert import convert

    with pytest.raises(PlanError, match="tiny.yaml: expert_backing disk keeps routed experts memory-mapped"):
        load_model(k2_tiny, plan=tiny_plan("disk"))
    model = load_model(k2_tiny, plan=tiny_plan("disk"), store=convert(k2_tiny, tmp_path / "store", "int8"))
    assert isinstance(model.model.layers[1].mlp.experts, HybridExperts)  # the store's memory map


def test_the_cache_device_is_where_attention_runs(k2_tiny):
    plan = tiny_plan()
    model = load_model(k2_tiny, plan=plan)
    assert model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.device == cache_device(plan)  # cuda:0 or cpu


# KTransformers' DeepSeek-V3-Chat.yaml, entries in its order (comments dropped): `^model$` comes before the
# embedding's own entry, so a translation that widened it to everything under `model.` put the embedding on the GPU.
KT_RULES = """\
- match:
    class: ktransformers.models.modeling_deepseek.DeepseekV3YarnRotaryEmbedding
  replace:
    class: ktransformers.operators.RoPE.YarnRotaryEmbedding
    kwargs: {generate_device: "cuda", prefill_device: "cuda"}
- match:
    name: "^model\\\\.layers\\\\.(?!.*self_attn\\\\.kv_b_proj).*$"
    class: torch.nn.Linear
  replace:
    class: ktransformers.operators.linear.KTransformersLinear
    kwargs: {generate_device: "cuda", prefill_device: "cuda", generate_op: "KLinearMarlin", prefill_op: "KLinearTorch"}
- match:
    name: "^model\\\\.layers\\\\..*\\\\.mlp$"
    class: ktransformers.models.modeling_deepseek.DeepseekV2MoE
  replace:
    class: ktransformers.operators.experts.KDeepseekV2MoE
    kwargs: {generate_device: "cuda", prefill_device: "cuda"}
- match:
    name: "^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$"
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs: {prefill_device: "cuda", prefill_op: "KExpertsTorch", generate_device: "cpu", generate_op: "KExpertsCPU", out_device: "cuda"}
  recursive: False
- match:
    name: "^model\\\\.layers\\\\..*\\\\.self_attn$"
  replace:
    class: ktransformers.operators.attention.KDeepseekV2Attention
    kwargs: {generate_device: "cuda", prefill_device: "cuda"}
- match:
    name: "^model$"
  replace:
    class: "ktransformers.operators.models.KDeepseekV2Model"
    kwargs: {per_layer_prefill_intput_threshold: 0}
- match:
    name: "^model.embed_tokens"
  replace:
    class: "default"
    kwargs: {generate_device: "cpu", prefill_device: "cpu"}
"""


def test_ktransformers_rules_translate(tmp_path):
    path = tmp_path / "DeepSeek-V3-Chat.yaml"
    path.write_text(KT_RULES)
    t = translate(path)
    plan = Plan("k2", Settings(context_length=8192, cpu_threads=32, prefill_chunk=64), t.rules, source=str(path))
    assert plan.rule_for("model.layers.3.mlp.experts.7.down_proj.weight").kernel == "cpu_moe"
    assert plan.rule_for("model.layers.3.self_attn.o_proj.weight").device == "cuda:0"
    assert plan.rule_for("model.embed_tokens.weight").device == "cpu"
    # their walk: the experts' subtree first (recursive: False), then the file's order; `$` = the module's own tensors
    assert [r.match for r in t.rules] == [
        r"^model\.layers\..*\.mlp\.experts\.", r"^model\.layers\.(?!.*self_attn\.kv_b_proj).*\.[^.]+$",
        r"^model\.layers\..*\.mlp\.[^.]+$", r"^model\.layers\..*\.self_attn\.[^.]+$", r"^model\.[^.]+$",
        r"^model.embed_tokens", ".*"]
    notes = "\n".join(t.notes)
    assert "KLinearMarlin has no equivalent" in notes and "per_layer_prefill_intput_threshold" in notes
    assert "out_device" in notes and "matches by class only" in notes
    assert evaluate(plan, K2, HW).projection.decode_tps > 1


def test_a_translation_that_does_not_fit_is_written_beside_the_refusal(tmp_path):
    # 31.0 GiB: the workspace is the 1024-token chunk's 1.7 GiB (attention in key blocks), no longer 16 tokens' 1.01
    rules, out = tmp_path / "DeepSeek-V3-Chat.yaml", tmp_path / "from-kt.yaml"
    rules.write_text(KT_RULES)
    r = CliRunner().invoke(cli, ["plan", "kimi-k2", "--gpu", "RTX 4090", "--ram", "768GB", "--cores", "32",
                                 "--context", "131072", "--from-ktransformers", str(rules), "-o", str(out)])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert r.output.startswith(f"error: {rules}: needs 31.0 GiB on cuda:0 (attention 11.5, kv cache 8.6, ")
    assert r.output.endswith(f"has 24.0 (the translation is written to {out}: edit it, then check it with "
                             f"`hybrid plan MODEL --check {out}`)\n")
    assert load_plan(out).rule_for("model.embed_tokens.weight").device == "cpu"
    assert f"\n# refused here: {rules}: needs 31.0 GiB on cuda:0" in out.read_text()


def test_hardware_yaml(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("gpu: RTX 4090\nram_gib: 512\nmemory: DDR5-4800x8\ncores: 32\n")
    h = load_hardware(path)
    assert h.gpu.memory_gib == 24 and round(h.ram_bandwidth_gbps, 1) == 230.4 and len(h.gpus) == 1
    assert isinstance(hardware_to_dict(h)["gpu"], dict)  # one GPU: written as before
    path.write_text("gpu: [RTX 4090, RTX 3090]\ngpu_memory_gib: 20\nram_gib: 512\n")
    two = load_hardware(path)
    assert [(g.name, g.memory_gib) for g in two.gpus] == [("RTX 4090", 20), ("RTX 3090", 24)]
    path.write_text(yaml.safe_dump(hardware_to_dict(two)))
    assert load_hardware(path).gpus == two.gpus
    path.write_text("gpu: RTX 4090\nram_gib: 512\nram_speed: fast\n")
    with pytest.raises(PlanError, match="hw.yaml: unknown key 'ram_speed'"):
        load_hardware(path)
    for line, error in (("cores: 0", "cores must be a whole number, 1 or more, got 0"),
                        ("ram_bandwidth_gbps: -5", "ram_bandwidth_gbps must be a number above 0, got -5")):
        path.write_text(f"gpu: RTX 4090\nram_gib: 512\n{line}\n")
        with pytest.raises(PlanError) as e:
            load_hardware(path)
        assert str(e.value) == f"{path}: {error}"


def run(*args):
    return subprocess.run([HYBRID, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_plan_json_and_file(tmp_path):
    out = tmp_path / "plan.yaml"
    r = run("plan", "kimi-k2-instruct-0905", "--gpu", "RTX 4090", "--ram", "768GB", "--memory", "DDR5-4800x8",
            "--cores", 32, "--context", 131072, "--json", "-o", out)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["devices"]["cuda:0"]["total"] <= 24 * 2**30 and data["projection"]["decode_tokens_per_s"] > 1
    r = run("plan", "kimi-k2-instruct-0905", "--gpu", "RTX 4090", "--ram", "768GB", "--check", out)
    assert r.returncode == 0, r.stderr
    assert "projected" in r.stdout


def test_cli_refusal_is_one_line():
    r = run("plan", "kimi-k2-instruct-0905", "--gpu", "RTX 4070 Ti", "--ram", "768GB", "--context", 262144)
    assert r.returncode == 2 and "needs" in r.stderr and "has 12.0" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_a_plan_may_name_its_expert_store(tmp_path, k2_tiny):
    """expert_store in a plan file (relative to the file) is the store the runtime loads: no --store needed."""
    from hybrid.generation.runtime import open_runtime
    from hybrid.read.convert import convert
    from placement.planner import PlanRequest, make_plan
    from placement.resolve import resolve_hardware
    from hybrid.read.checkpoint import Checkpoint

    convert(k2_tiny, tmp_path / "store", "int8")
    made = make_plan(Checkpoint.open(k2_tiny).config, str(k2_tiny), resolve_hardware(),
                     PlanRequest(expert_format="int8")).plan
    text = dump_plan(made).replace("  defer_experts: 0\n", "  defer_experts: 0\n  expert_store: store\n")
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    plan = load_plan(path)
    assert plan.settings.expert_store == str(tmp_path / "store")
    assert "expert_store: " in dump_plan(plan) and "expert_store" not in dump_plan(made)
    experts = open_runtime(k2_tiny, path).model.model.layers[1].mlp.experts.cpu
    assert isinstance(experts.store.values["gate_proj"], __import__("numpy").memmap)  # read from the store
    (tmp_path / "bad.yaml").write_text(text.replace("expert_store: store", "expert_store: 5"))
    with pytest.raises(PlanError, match="bad.yaml:\\d+: expert_store must be a folder path"):
        load_plan(tmp_path / "bad.yaml")


def test_gpu_prefill_tokens_round_trips_and_zero_is_off(tmp_path):
    result = make_plan(K2, "kimi-k2-instruct-0905", HW, PlanRequest(context_length=131072))
    assert result.plan.settings.gpu_prefill_tokens > 0
    path = tmp_path / "plan.yaml"
    save_plan(result.plan, path)
    assert load_plan(path).settings.gpu_prefill_tokens == result.plan.settings.gpu_prefill_tokens
    text = path.read_text()
    path.write_text(text.replace(f"gpu_prefill_tokens: {result.plan.settings.gpu_prefill_tokens}",
                                 "gpu_prefill_tokens: 0"))
    assert load_plan(path).settings.gpu_prefill_tokens == 0
    path.write_text(text.replace(f"gpu_prefill_tokens: {result.plan.settings.gpu_prefill_tokens}",
                                 "gpu_prefill_tokens: -5"))
    with pytest.raises(PlanError, match=r"plan.yaml:\d+: gpu_prefill_tokens must be a non-negative integer"):
        load_plan(path)
