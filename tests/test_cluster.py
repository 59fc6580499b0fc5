"""`hybrid plan MODEL --cluster`: the memory arithmetic against what the engines and Moonshot publish, and the launch
commands against the flags vLLM and SGLang document."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from hybrid.cli import cli
from hybrid.read.config import load_config
from hybrid.read.names import expected_tensors, owner_of
from hybrid.read.tiny import TinySpec, make_tiny
from placement import presets
from placement.api import cluster_command
from placement.cluster import SGLANG, SGLANG_KT, VLLM, VLLM_RESERVE_GIB, layouts, parse_cluster, tp_refusal, weights
from placement.memory import GIB, checkpoint_bytes

CONTEXT = 131072

# The flags the commands may use, as the engines define them, with where: vLLM 0.33.0 (vllm/engine/arg_utils.py
# EngineArgs; vllm/entrypoints/common/cli_args.py for the serving front end; --headless in vllm/entrypoints/cli/
# serve.py), SGLang 0.5.23 (sglang/srt/arg_groups/fields/: parallel.py for --tp-size, --nnodes, --node-rank,
# --dist-init-addr; serving.py for --host, --port, --served-model-name; exec_.py for the kt-kernel flags, its
# "[ktransformers parameter]" group), Ray's `ray start`. benchmarks/cluster_flags.py checks the same commands with
# the engines' own parsers.
DOCUMENTED = {
    VLLM: {"--tensor-parallel-size", "--data-parallel-size", "--data-parallel-size-local", "--data-parallel-address",
           "--data-parallel-rpc-port", "--data-parallel-start-rank", "--headless", "--enable-expert-parallel",
           "--distributed-executor-backend", "--gpu-memory-utilization", "--max-model-len", "--max-num-seqs",
           "--max-num-batched-tokens", "--enable-auto-tool-choice", "--tool-call-parser", "--reasoning-parser",
           "--trust-remote-code", "--served-model-name", "--port"},
    SGLANG: {"--model-path", "--tp-size", "--dist-init-addr", "--nnodes", "--node-rank", "--context-length",
             "--tool-call-parser", "--reasoning-parser", "--trust-remote-code", "--served-model-name", "--host",
             "--port", "--kt-weight-path", "--kt-method", "--kt-cpuinfer", "--kt-threadpool-count",
             "--kt-num-gpu-experts"},
    "ray": {"--head", "--port", "--address"},
}
DOCUMENTED[SGLANG_KT] = DOCUMENTED[SGLANG]
SWITCHES = {"--headless", "--enable-expert-parallel", "--enable-auto-tool-choice", "--trust-remote-code", "--head"}
PROGRAMS = {VLLM: ("vllm", "serve"), SGLANG: ("python", "-m", "sglang.launch_server"),
            SGLANG_KT: ("python", "-m", "sglang.launch_server"), "ray": ("ray", "start")}


def fits(model, spec):
    return {(layout.engine, layout.name): layout for layout in layouts(presets.load(model), parse_cluster(spec),
                                                                          CONTEXT) if layout.fits}


def test_fp8_k2_at_128k_needs_16_h200_class_gpus():
    # Moonshot's deployment guide: FP8 K2 at 128K takes 16 H200/H20, as vLLM TP16, vLLM DP16+EP or SGLang TP16.
    assert fits("kimi-k2-instruct-0905", "8xH200") == {}
    assert fits("kimi-k2-instruct-0905", "8xH20") == {}
    on_16 = fits("kimi-k2-instruct-0905", "2x8xH200")
    assert set(on_16) == {(VLLM, "TP16"), (VLLM, "DP16+EP"), (SGLANG, "TP16")}
    assert {(VLLM, "TP16"), (SGLANG, "TP16")} <= set(fits("kimi-k2-instruct-0905", "2x8xH20"))
    # The 0711 release is the same size.
    assert fits("kimi-k2-instruct", "8xH200") == {}


def test_int4_k2_thinking_fits_one_8_gpu_h200_node():
    # The K2-Thinking recipes run TP8 on 8 H200 (vLLM's with --reasoning-parser kimi_k2).
    on_8 = fits("kimi-k2-thinking", "8xH200")
    assert {(VLLM, "TP8"), (SGLANG, "TP8")} <= set(on_8)
    assert on_8[(VLLM, "TP8")].sequences >= 1


def test_vllm_cache_arithmetic_reproduces_the_k2_thinking_recipe_log():
    # vllm-project/recipes PR 115, K2-Thinking TP8 on 8 H200 at the then-default --gpu-memory-utilization 0.9:
    # "Available KV cache memory: 46.80 GiB", "GPU KV cache size: 715,072 tokens".
    cfg = presets.load("kimi-k2-thinking")
    per_token = 46.80 * GIB / 715_072
    assert cfg.kv_cache_bytes_per_token == pytest.approx(per_token, rel=1e-3)  # MLA: 576 bf16 values per layer
    tp8 = next(x for x in layouts(cfg, parse_cluster("8xH200"), CONTEXT) if x.engine == VLLM and x.name == "TP8")
    available = 0.9 * 141 - VLLM_RESERVE_GIB - tp8.weights_gib
    assert available == pytest.approx(46.80, rel=0.03)


def test_refused_layouts_say_why_with_numbers():
    cfg = presets.load("kimi-k2-instruct-0905")
    by_name = {(x.engine, x.name): x for x in layouts(cfg, parse_cluster("8xH200"), CONTEXT)}
    tp8 = by_name[(VLLM, "TP8")]
    assert tp8.cache_tokens < CONTEXT and f"{tp8.cache_tokens:,} tokens" in tp8.refusal and "131,072" in tp8.refusal
    assert "exceed" in by_name[(VLLM, "DP8+EP")].refusal
    # FP8 splits in whole 128-wide blocks: K2's expert width 2048 allows TP16 at most, its dense MLP 18432 TP16 too.
    assert tp_refusal(cfg, 16) is None
    assert "does not split 32 ways into whole 128-wide FP8 blocks" in tp_refusal(cfg, 32)
    assert "heads" in tp_refusal(cfg, 3)
    # K2-Thinking's INT4 experts split in whole 32-wide groups; its attention is bf16.
    assert tp_refusal(presets.load("kimi-k2-thinking"), 32) is None


@pytest.mark.parametrize("spec", [TinySpec(layers=3, dense_layers=1, experts=8, top_k=2, seed=5),
                                  TinySpec(layers=3, dense_layers=1, experts=8, top_k=2, int4=True, seed=6)],
                         ids=["fp8", "int4"])
def test_checkpoint_bytes_equal_the_files(tmp_path, spec):
    # The engines hold the checkpoint as stored: its bytes per model tensor are what the files hold for it (FP8
    # weights + block scales; INT4 packed words + bf16 scales + shape; bf16 and fp32 tensors).
    folder = make_tiny(tmp_path / "ckpt", spec)
    cfg = load_config(folder)
    in_files = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                owner = owner_of(key, cfg)
                in_files[owner] = in_files.get(owner, 0) + t.numel() * t.element_size()
    expected = {name: checkpoint_bytes(cfg, name, shape) for name, shape in expected_tensors(cfg).items()}
    assert expected == {name: in_files[name] for name in expected}
    assert weights(cfg).total == sum(expected.values())


def test_commands_use_documented_flags_and_k2_parsers():
    for model, spec in (("kimi-k2-instruct-0905", "2x8xH200"), ("kimi-k2-thinking", "8xH200"),
                        ("kimi-k2-instruct-0905", "4xH100"), ("kimi-k2-thinking", "3x8xH20")):
        plan = cluster_command(model, spec, CONTEXT, ram="1TB" if spec == "4xH100" else None, cores=64)
        assert plan.fits and plan.commands
        thinking = "thinking" in model
        for cmd in plan.commands:
            program = PROGRAMS[cmd.engine]
            assert cmd.argv[:len(program)] == program
            args = list(cmd.argv[len(program):])
            if cmd.engine == VLLM:
                assert args.pop(0) == plan.target.model  # vllm serve's positional model
            flags = [a for a in args if a.startswith("--")]
            assert set(flags) <= DOCUMENTED[cmd.engine], set(flags) - DOCUMENTED[cmd.engine]
            assert len(flags) == len(set(flags))
            for i, a in enumerate(args):  # every flag but a switch has its value, and every value its flag
                if a.startswith("--") and a not in SWITCHES:
                    assert not args[i + 1].startswith("--"), a
                elif not a.startswith("--"):
                    assert args[i - 1].startswith("--") and args[i - 1] not in SWITCHES, a
            if cmd.engine == "ray":
                continue
            pairs = dict(zip(args, args[1:]))
            assert pairs["--tool-call-parser"] == "kimi_k2"
            assert pairs.get("--reasoning-parser") == ("kimi_k2" if thinking else None)
            assert pairs["--served-model-name"] == plan.target.served_name == plan.target.model.split("/")[-1]
            assert pairs["--port"] == "8000"
            assert pairs.get("--max-model-len", pairs.get("--context-length")) == str(CONTEXT)
            if cmd.engine == VLLM:
                assert "--enable-auto-tool-choice" in args


def test_multi_node_commands_cover_every_node_and_rank(tmp_path):
    yaml_file = tmp_path / "cluster.yaml"
    yaml_file.write_text("nodes: 2\ngpus_per_node: 8\ngpu: H200\nhead_ip: 10.1.2.3\n")
    plan = cluster_command("kimi-k2-instruct-0905", str(yaml_file), CONTEXT)
    by = {}
    for cmd in plan.commands:
        by.setdefault((cmd.engine, cmd.layout), []).append(cmd)
    ray = by[("ray", "TP16")]
    assert [c.node for c in ray] == [0, 1] and "10.1.2.3:6379" in ray[1].argv
    tp = by[(VLLM, "TP16")]
    assert len(tp) == 1 and tp[0].node == 0 and tp[0].argv[-2:] == ("--distributed-executor-backend", "ray")
    dp = by[(VLLM, "DP16+EP")]
    starts = [dict(zip(c.argv, c.argv[1:])).get("--data-parallel-start-rank") for c in dp]
    assert starts == [None, "8"] and "--headless" in dp[1].argv and "--headless" not in dp[0].argv
    assert all(dict(zip(c.argv, c.argv[1:]))["--data-parallel-address"] == "10.1.2.3" for c in dp)
    sg = by[(SGLANG, "TP16")]
    assert [dict(zip(c.argv, c.argv[1:]))["--node-rank"] for c in sg] == ["0", "1"]
    assert all("10.1.2.3:50000" in c.argv for c in sg)
    assert not any("${HEAD_IP}" in c.shell for c in plan.commands)
    # Without head_ip the commands leave ${HEAD_IP} for the shell, quoted so that it still expands.
    plain = cluster_command("kimi-k2-instruct-0905", "2x8xH200", CONTEXT)
    assert any('"${HEAD_IP}:50000"' in c.shell for c in plain.commands)
    assert any("HEAD_IP" in note for note in plain.notes)


def test_kt_kernel_layout_for_one_node_with_big_ram():
    # Four H100 cannot hold FP8 K2; with 1 TB of RAM SGLang + kt-kernel keeps the experts on the CPU.
    plan = cluster_command("kimi-k2-instruct-0905", "4xH100", CONTEXT, ram="1TB", cores=96, numa_nodes=2)
    kt = next(x for x in plan.layouts if x.engine == SGLANG_KT)
    assert kt.fits and [x for x in plan.layouts if x.fits] == [kt]
    assert 0 < kt.gpu_experts < 384 and kt.sequences == 1 and kt.kt_method == "FP8"
    cmd = next(c for c in plan.commands if c.engine == SGLANG_KT)
    pairs = dict(zip(cmd.argv, cmd.argv[1:]))
    assert pairs["--kt-num-gpu-experts"] == str(kt.gpu_experts) and pairs["--kt-cpuinfer"] == "96"
    assert pairs["--kt-threadpool-count"] == "2" and pairs["--kt-weight-path"] == "${MODEL_DIR}"
    # Too little RAM: refused with the experts' size; K2-Thinking's experts run as their raw INT4.
    small = cluster_command("kimi-k2-instruct-0905", "4xH100", CONTEXT, ram="512GB")
    assert not small.fits and "945.2 GiB of RAM" in small.refusal()
    assert next(x for x in cluster_command("kimi-k2-thinking", "2xH100", CONTEXT, ram="768GB").layouts
                if x.engine == SGLANG_KT).kt_method == "RAWINT4"


def test_checkpoint_folder_is_served_by_path_and_name(tmp_path):
    folder = make_tiny(tmp_path / "My-K2-Thinking-Tiny", TinySpec(layers=2, experts=8, top_k=2, thinking=True,
                                                                   int4=True, seed=7))
    plan = cluster_command(str(folder), "8xH100", 256)
    assert plan.target.model == str(folder.resolve()) and plan.target.served_name == "My-K2-Thinking-Tiny"
    vllm = next(c for c in plan.commands if c.engine == VLLM)
    assert vllm.argv[2] == str(folder.resolve())
    assert dict(zip(vllm.argv, vllm.argv[1:]))["--reasoning-parser"] == "kimi_k2"
    # A thinking template in a folder not named so is found too; a plain K2 folder gets no reasoning parser.
    renamed = folder.rename(tmp_path / "renamed")
    assert cluster_command(str(renamed), "8xH100", 256).target.reasoning_parser == "kimi_k2"
    plain = make_tiny(tmp_path / "plain", TinySpec(layers=2, experts=8, top_k=2, seed=8))
    target = cluster_command(str(plain), "8xH100", 256, served_model_name="k2").target
    assert (target.reasoning_parser, target.served_name) == (None, "k2")


def hybrid(*args):
    """The CLI in this process (its one-line errors and exit codes are the group's own, as from the shell)."""
    r = CliRunner().invoke(cli, list(args))
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


def test_cli_refuses_8_h200_with_the_numbers_and_the_cluster_that_fits():
    r = subprocess.run([sys.executable, "-m", "hybrid.cli", "plan", "kimi-k2", "--cluster", "8xH200"],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2
    error = r.stderr.strip().splitlines()[-1]
    assert error.startswith("error: kimi-k2 at 131,072 tokens of context does not fit 1x8 H200")
    assert "tokens, under the context of 131,072" in error and "--cluster 2x8xH200" in error
    assert "vllm serve" not in r.stdout


def test_cli_json_for_a_cluster_that_fits():
    r = hybrid("plan", "kimi-k2-thinking", "--cluster", "8xH200", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] and out["engine_model"] == "moonshotai/Kimi-K2-Thinking" and out["context"] == CONTEXT
    tp8 = next(x for x in out["layouts"] if x["engine"] == VLLM and x["name"] == "TP8")
    assert tp8["fits"] and tp8["cache_tokens"] > CONTEXT and tp8["engine_version"] == "0.33.0"
    assert "/v1/messages" in out["routes"]
    assert out["commands"][0]["shell"].startswith("vllm serve moonshotai/Kimi-K2-Thinking --tensor-parallel-size 8")


@pytest.mark.parametrize("args, message", [
    (("--cluster", "big"), "--cluster 'big': expected NODESxGPUSxTYPE"),
    (("--cluster", "0x8xH200"), "--cluster nodes must be a whole number, 1 or more, got 0"),
    (("--cluster", "8xB9000"), "--cluster '8xB9000': GPU 'B9000' is not in the table"),
    (("--cluster", "2x8xH200", "-o", "x.yaml"), "-o plans one machine"),
    (("--cluster", "2x8xH200", "--gpu", "H100"), "--gpu plans one machine"),
    (("--served-model-name", "k2"), "--served-model-name goes with --cluster"),
    (("--cluster", "2x8xH200", "--context", "300000"), "beyond kimi-k2's 262,144 positions"),
])
def test_cli_bad_cluster_input_is_one_line(args, message):
    r = hybrid("plan", "kimi-k2", *args)
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cluster_yaml_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("nodes: 2\ngpus_per_node: 8\ngpu: H200\nram: 1TB\n")
    r = hybrid("plan", "kimi-k2", "--cluster", str(bad))
    assert r.returncode == 2 and f"{bad}: unknown key 'ram'" in r.stderr
    bad.write_text("nodes: 2\ngpu: H200\n")
    assert f"{bad}: key 'gpus_per_node' is missing" in hybrid("plan", "kimi-k2", "--cluster", str(bad)).stderr
    bad.write_text("nodes: 2\ngpus_per_node: 8\ngpu: {name: B300, memory_gib: 270}\n")
    plan = cluster_command("kimi-k2", str(bad), CONTEXT)
    assert plan.cluster.node.gpu.memory_gib == 270 and plan.fits
