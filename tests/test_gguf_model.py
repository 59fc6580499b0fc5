"""A deepseek2 GGUF run as downloaded: the whole model on its blocks against the reference, and through both readers.

Files are written by tests/gguf_files.py (gguf-py's GGUFWriter) from tiny safetensors checkpoints: split into
shards, K2's tokenizer metadata, both MLA layouts, and routed experts in a different mix of GGUF types per layer,
as Unsloth's dynamic quants lay them out. The reference is the plain float32 torch model fed the weights that
gguf-py's own `dequantize` produces (`load_model(ckpt)` without a plan); the hybrid path computes the routed
experts (cpu_moe) and every other matrix (cpu_linear; fp32_plan spells it cpu_gguf, its earlier name, as older plan
files do) on the stored blocks with the CPU kernels.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_files import export_gguf

from cpu_kernels.formats import GGUF_NAMES
from hybrid.generation.generate import generate
from hybrid.generation.runtime import open_runtime, plan_for_this_machine
from hybrid.generation.sampling import SamplingParams
from hybrid.read.open import open_checkpoint
from hybrid.read.tiny import TinySpec, make_tiny
from hybrid.run.blocks import BlockEmbedding, BlockLinear
from hybrid.run.experts import HybridExperts
from hybrid.run.loader import load_model
from placement.plan import Plan, Rule, Settings
from placement.planner import EXPERTS_RE, GGUF_BLOCKS_RE

HYBRID = str(Path(sys.executable).parent / "hybrid")
# Rows and inputs of 256 wherever a 256-weight block type goes (hidden, q LoRA, expert and dense widths).
SPEC = TinySpec(layers=4, dense_layers=1, experts=8, top_k=2, moe_width=256, dense_width=256, q_lora_rank=256,
                fp8=False, seed=5)
# Per MoE layer (gate, up, down): a K-quant layer, an IQ layer, a ternary/1-bit layer; gate and up may differ.
EXPERT_MIX = {1: ("Q4_K", "Q5_K", "Q6_K"), 2: ("IQ2_XXS", "IQ2_XS", "IQ3_XXS"), 3: ("TQ1_0", "IQ1_M", "IQ4_XS")}
OTHERS = {"attn_q_a": "Q2_K", "attn_q_b": "IQ3_S", "attn_kv_a_mqa": "IQ2_S", "attn_output": "Q8_0",
          "attn_k_b": "Q8_0", "attn_v_b": "Q8_0", "attn_kv_b": "Q8_0", "shexp": "Q3_K", "ffn_": "IQ1_S",
          "token_embd": "Q4_K", "output": "Q6_K"}
PROMPT = [5, 17, 99, 3, 250, 7, 42, 1, 128]


def mixed_types(name: str) -> str:
    """The type of each GGUF tensor: EXPERT_MIX by layer for routed experts, OTHERS by name, else F32."""
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
        gate, up, down = EXPERT_MIX[int(parts[1])]
        return {"ffn_gate_exps": gate, "ffn_up_exps": up, "ffn_down_exps": down}[parts[2]]
    return next((t for key, t in OTHERS.items() if key in name), "F32")


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("hf") / "tiny", SPEC)


@pytest.fixture(scope="module")
def exported(tiny_hf, tmp_path_factory):
    """layout -> the tiny model as a 3-shard GGUF of mixed types in that MLA layout, written on first use."""
    folders = {}

    def folder(mla: str):
        if mla not in folders:
            folders[mla] = export_gguf(tiny_hf, tmp_path_factory.mktemp("gguf") / mla, mixed_types, n_shards=3,
                                       mla=mla)
        return folders[mla]

    return folder


@pytest.fixture(scope="module", params=["split", "kv_b"])
def mixed(request, exported):
    """The mixed-type GGUF in each MLA layout."""
    return exported(request.param)


def fp32_plan(threads: int = 2) -> Plan:
    """The hybrid plan with float32 activations, so the only difference from the reference is float32 sums."""
    settings = Settings(context_length=64, cpu_threads=threads, expert_format="gguf")
    return Plan("test", settings, (Rule(EXPERTS_RE, "cpu", "gguf", "cpu_moe", {"threads": threads}),
                                   Rule(GGUF_BLOCKS_RE, "cpu", "gguf", "cpu_gguf"), Rule(".*", "cpu", "fp32", "torch")))


def greedy(model, n: int = 8) -> list[int]:
    params = SamplingParams(temperature=0.0, max_new_tokens=n)
    return [s.token for s in generate(model, PROMPT, params)]


def test_every_type_on_its_blocks_equals_gguf_dequantize(mixed):
    ckpt = open_checkpoint(mixed)
    used = {t for layer in EXPERT_MIX.values() for t in layer} | {t for t in OTHERS.values()}
    assert used <= set(GGUF_NAMES)  # every type here runs on the block kernels, none falls back to floats
    reference = load_model(ckpt)
    ours = load_model(ckpt, plan=fp32_plan())
    experts = [layer.mlp.experts for layer in ours.model.layers[1:]]
    assert all(isinstance(e, HybridExperts) for e in experts)
    for layer, e in zip(EXPERT_MIX, experts):
        store, (gate, up, down) = e.cpu.store, EXPERT_MIX[layer]
        assert [str(store.format_of(p)) for p in ("gate_proj", "up_proj", "down_proj")] == [gate, up, down]
        view = ckpt.expert_blocks(layer)["down_proj"][1]
        assert np.shares_memory(store.values["down_proj"], view)  # the file's bytes, not a copy
    blocks = [m for m in ours.modules() if isinstance(m, BlockLinear)]
    # q_a, q_b, kv_a, o_proj per layer; the dense MLP and shared experts; the head
    assert len(blocks) == 4 * SPEC.layers + 3 * SPEC.layers + 1
    assert isinstance(ours.model.embed_tokens, BlockEmbedding)
    ids = torch.tensor([PROMPT])
    want, got = reference(ids), ours(ids)
    assert float((got - want).norm() / want.norm()) < 2e-5
    assert greedy(ours) == greedy(reference)


def test_experts_without_block_kernels_run_from_a_bf16_copy(tiny_hf, tmp_path):
    """Routed experts in a type the block kernels do not read (IQ4_NL here; BF16 or F32 experts alike) are
    dequantized into a bf16 store at load: the model still runs, within bf16 rounding of the reference."""
    folder = export_gguf(tiny_hf, tmp_path / "nl", {"_exps": "IQ4_NL", "": "Q8_0"})
    ckpt = open_checkpoint(folder)
    ours = load_model(ckpt, plan=fp32_plan())
    assert str(ours.model.layers[1].mlp.experts.cpu.store.fmt) == "bf16"
    ids = torch.tensor([PROMPT])
    want = load_model(ckpt)(ids)
    assert float((ours(ids) - want).norm() / want.norm()) < 1e-2


def test_planned_for_this_machine_runs_on_the_blocks(exported):
    """What `hybrid generate GGUF` does without --plan: the planner keeps every matrix in its blocks on a
    machine without GPU (bf16 activations), within bf16 rounding of the reference."""
    ckpt = open_checkpoint(exported("split"))
    plan = plan_for_this_machine(ckpt).plan
    assert plan.settings.expert_format == "gguf"
    assert {(r.kernel, r.format) for r in plan.rules} >= {("cpu_moe", "gguf"), ("cpu_linear", "gguf")}
    rt = open_runtime(ckpt, plan)
    logits, want = rt.model(torch.tensor([PROMPT])), load_model(ckpt)(torch.tensor([PROMPT]))
    assert float((logits - want).norm() / want.norm()) < 0.05  # bf16 activations


def test_cross_format_same_tokens_through_both_readers(k2_tiny, tmp_path):
    """The K2-layout tiny checkpoint (block-FP8 shards) exported to GGUF in BF16 holds exactly the weights the
    safetensors reader dequantizes: both readers give identical logits and greedy tokens, and `hybrid generate
    --reference` on the GGUF (its tokenizer rebuilt from the token list) continues the text as the safetensors
    model does."""
    folder = export_gguf(k2_tiny, tmp_path / "bf16", "BF16", n_shards=2)
    a, b = load_model(open_checkpoint(k2_tiny)), load_model(open_checkpoint(folder))
    assert torch.equal(a(torch.tensor([PROMPT])), b(torch.tensor([PROMPT])))
    r = subprocess.run([HYBRID, "generate", str(folder), "--reference", "--prompt", "Hello there", "--temperature",
                        "0", "--max-new-tokens", "6", "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["prompt_ids"] == open_runtime(k2_tiny).tokenizer.encode("Hello there")
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    assert out["generated_ids"] == [s.token for s in generate(a, out["prompt_ids"], params)]


def test_cli_runs_a_gguf_folder_and_a_shard(tiny_hf, tmp_path):
    """generate takes the folder or any one shard; the plan line says gguf; chat renders the file's template."""
    folder = export_gguf(tiny_hf, tmp_path / "q", mixed_types, n_shards=2)
    first = sorted(Path(folder).glob("*.gguf"))[1]
    r = subprocess.run([HYBRID, "generate", str(first), "--prompt", "Hi", "--max-new-tokens", "3", "--seed", "1",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "routed experts gguf" in r.stderr and json.loads(r.stdout)["generated_tokens"] == 3
    r = subprocess.run([HYBRID, "chat", str(folder), "--prompt", "Hi", "--max-new-tokens", "3"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
