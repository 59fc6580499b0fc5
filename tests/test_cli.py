"""The `hybrid` console command, run as a user runs it: a real process, real files."""

import json
import subprocess
import sys
from pathlib import Path

from hybrid.generation.generate import Stats, generate
from hybrid.run.loader import load_model
from hybrid.generation.sampling import SamplingParams

HYBRID = str(Path(sys.executable).parent / "hybrid")


def run(*args):
    return subprocess.run([HYBRID, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_make_tiny_then_generate_json(tmp_path):
    out = tmp_path / "tiny"
    r = run("make-tiny", out, "--layers", 2, "--experts", 8, "--top-k", 2, "--seed", 5)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors.index.json").is_file() and (out / "tiktoken.model").is_file()
    r = run("generate", out, "--prompt-ids", "5,6,7,8", "--max-new-tokens", 6, "--temperature", 0, "--json",
            "--reference")  # the plain torch model, as the library run below
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["prompt_ids"] == [5, 6, 7, 8] and result["finish_reason"] == "length"
    stats = Stats()
    list(generate(load_model(out), [5, 6, 7, 8], SamplingParams(max_new_tokens=6), stats=stats))
    assert result["generated_ids"] == stats.tokens


def test_prompt_text_goes_through_the_tokenizer(k2_tiny):
    # seeded: unseeded sampling at K2's 0.6 sometimes drew an end-of-sequence id first (fewer than 3 tokens)
    r = run("generate", k2_tiny, "--prompt", "Hi<|im_end|>", "--max-new-tokens", 3, "--seed", 0, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    # The tiny byte-level vocabulary; a special token written in the prompt is text (--allow-special: see
    # test_prompt_encoding).
    assert result["prompt_ids"] == list(b"Hi<|im_end|>")
    assert len(result["generated_ids"]) == 3 and isinstance(result["text"], str)


def test_sampling_with_a_seed_is_reproducible(k2_tiny):
    args = ("generate", k2_tiny, "--prompt-ids", "1,2,3", "--max-new-tokens", 8, "--temperature", 1.0,
            "--seed", 3, "--json")
    a, b = run(*args), run(*args)
    assert json.loads(a.stdout)["generated_ids"] == json.loads(b.stdout)["generated_ids"]


def test_usage_errors_are_one_line(k2_tiny):
    r = run("generate", k2_tiny, "--prompt-ids", "1,2,100000")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", k2_tiny, "--prompt-ids", "1,2", "--max-new-tokens", 100000)
    assert r.returncode == 2 and "context overflow" in r.stderr
    r = run("generate", k2_tiny)
    assert r.returncode == 2 and "--prompt" in r.stderr
    for args, words in ((("generate", k2_tiny, "--gen", "x"), "No such option '--gen'"),
                        (("nosuch",), "No such command 'nosuch'"),
                        (("generate", k2_tiny, "--prompt-ids", "1", "--seed", "x"), "'x' is not a valid integer")):
        r = run(*args)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_extreme_sampling_flags_are_one_line_or_work(k2_tiny):
    """In-process (the flags' handling is what is tested): a seed beyond 64 bits is one line before loading;
    temperatures and top_p that underflow sample the best token instead of a traceback."""
    from click.testing import CliRunner

    from hybrid.cli import cli

    base = ["generate", str(k2_tiny), "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--json"]
    r = CliRunner().invoke(cli, base + ["--seed", "100000000000000000000000"])
    assert r.exit_code == 2 and "sampling parameter seed" in r.output and "Traceback" not in r.output
    greedy = json.loads(CliRunner().invoke(cli, base + ["--temperature", "0"]).stdout)["generated_ids"]
    for flags in (["--temperature", "1e-300"], ["--temperature", "2", "--top-p", "1e-300"]):
        r = CliRunner().invoke(cli, base + flags + ["--seed", "1"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["generated_ids"] == greedy


def test_no_plan_runs_the_hybrid_runtime_planned_for_this_machine(k2_tiny):
    """`hybrid chat MODEL --prompt hi` without --plan: planned for this machine (said in one line), routed
    experts on the CPU kernels; --reference is the plain torch model."""
    from hybrid.generation.runtime import open_runtime, plan_for_this_machine
    from hybrid.read.checkpoint import Checkpoint
    from hybrid.run.experts import HybridExperts

    r = run("chat", k2_tiny, "--prompt", "hi", "--max-new-tokens", 3)
    assert r.returncode == 0, r.stderr
    assert "no --plan: planned for this machine: routed experts int4-g128 on" in r.stderr and "-o plan.yaml" in r.stderr
    moe = open_runtime(k2_tiny, plan_for_this_machine(Checkpoint.open(k2_tiny)).plan).model.model.layers[1].mlp
    assert isinstance(moe.experts, HybridExperts)
    assert not isinstance(open_runtime(k2_tiny).model.model.layers[1].mlp.experts, HybridExperts)


def test_model_names_that_are_not_folders_are_one_line(k2_tiny, tmp_path):
    """A .gguf, another file, a missing folder, an uncached hub id offline: one line, exit code 2; a hub id in
    the Hugging Face cache runs."""
    import os
    import shutil

    (tmp_path / "K2.gguf").write_bytes(b"GGUF")
    cases = [(tmp_path / "K2.gguf", "K2.gguf"),
             (k2_tiny / "config.json", "is a file; give the checkpoint folder"),
             (tmp_path / "missing", "no such folder, and not a Hugging Face id"),
             ("moonshotai/Kimi-K2-Instruct-0905", "not in the Hugging Face cache, and this machine is offline"),
             ("unsloth/Kimi-K2-Instruct-0905-GGUF:UD-Q2_K_XL", "not in the Hugging Face cache, and this machine")]
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    for model, words in cases:
        r = subprocess.run([HYBRID, "generate", str(model), "--prompt-ids", "1"], capture_output=True, text=True,
                           timeout=120, env=env)
        assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    # huggingface_hub's cache layout: refs/main names the snapshot that holds the files
    repo = tmp_path / "hf" / "hub" / "models--moonshotai--Kimi-K2-Instruct-0905"
    shutil.copytree(k2_tiny, repo / "snapshots" / "0123abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    r = subprocess.run([HYBRID, "generate", "moonshotai/Kimi-K2-Instruct-0905", "--prompt-ids", "1,2",
                        "--max-new-tokens", "2", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and len(json.loads(r.stdout)["generated_ids"]) == 2, r.stderr


def test_a_gguf_quant_from_the_hub_cache_runs(tmp_path):
    """`org/name:QUANT` resolves to that quant's folder in a GGUF repository from the Hugging Face cache, as
    llama.cpp's -hf does; a quant the repository lacks is one line."""
    import os

    from gguf_files import export_gguf

    from hybrid.read.tiny import TinySpec, make_tiny

    src = make_tiny(tmp_path / "tiny", TinySpec(layers=2, experts=4, top_k=2, fp8=False))
    repo = tmp_path / "hf" / "hub" / "models--unsloth--Tiny-GGUF"
    export_gguf(src, repo / "snapshots" / "abc123" / "UD-Q8_0", "Q8_0", n_shards=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    env = os.environ | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([HYBRID, "generate", "unsloth/Tiny-GGUF:UD-Q8_0", "--prompt-ids", "1,2", "--max-new-tokens",
                        "2", "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and len(json.loads(r.stdout)["generated_ids"]) == 2, r.stderr
    r = subprocess.run([HYBRID, "generate", "unsloth/Tiny-GGUF:Q4_K_M", "--prompt-ids", "1"], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 2 and "has no Q4_K_M quant" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_make_tiny_refuses_to_overwrite(k2_tiny):
    r = run("make-tiny", k2_tiny)
    assert r.returncode == 2 and "not empty; add --overwrite to replace it" in r.stderr
    r = run("-h")
    assert r.returncode == 0 and "Commands:" in r.stdout


def test_plan_convert_generate(k2_tiny, tmp_path):
    plan, store = tmp_path / "plan.yaml", tmp_path / "store"
    r = run("plan", k2_tiny, "--gpu", "none", "--ram", "16GB", "--experts", "int8", "-o", plan)
    assert r.returncode == 0, r.stderr
    r = run("convert", k2_tiny, store, "--experts", "int8")
    assert r.returncode == 0 and (store / "hybrid_store.json").is_file(), r.stderr
    r = run("generate", k2_tiny, "--plan", plan, "--store", store, "--prompt-ids", "1,2,3", "--max-new-tokens", 4,
            "--temperature", 0, "--json")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["generated_ids"]) == 4
    r = run("generate", k2_tiny, "--plan", plan, "--store", tmp_path, "--prompt-ids", "1", "--max-new-tokens", 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_bench_is_reachable_from_the_cli():
    r = run("bench", "--help")
    assert r.returncode == 0 and "--formats" in r.stdout
