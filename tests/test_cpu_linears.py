"""Weight matrices outside the routed experts on the CPU kernels (plan kernel cpu_linear): planned by default
without a GPU, accounted in their format's bytes, spelled in plan files, loaded, and held to a logit bound.

The bound (docs/planner.md): with int8 linears, bf16 experts and float32 activations on the tiny K2 (block-FP8) and
V3 (bf16) checkpoints, every position before the first routed-expert choice that differs from the reference's
keeps its logits within 4 % (relative L2) of the reference's (measured at most 1.8 %); over all positions the
median is within 4 % (measured 1.3-1.5 %) and the argmax agrees at 85 % of them or more (measured 94-98 %).
Token-for-token greedy equality is not asked of these random-weight models: their top two logits are often within
1 % of the logit scale of each other, closer than int8 (or bf16 activations alone) moves them, and int8's 0.5 %
per matrix flips a router's choice at a few positions, whose logits then move by up to 30 %.
"""

import numpy as np
import pytest
import torch
import yaml
from conftest import K2_SPEC

from cpu_kernels.formats import MATVEC_ERROR_BOUND, Format, matrix_bytes
from hybrid.errors import PlanError
from hybrid.generation.generate import new_cache
from hybrid.run.blocks import AbsorbedKvB, BlockLinear
from hybrid.run.layers import MoE
from hybrid.run.loader import load_model
from placement import memory, presets
from placement.hardware import describe
from placement.plan import Plan, Rule, Settings, check_rule, place_all
from placement.plan_file import dump_plan, load_plan, save_plan
from placement.planner import CPU_LINEAR_RE, EXPERTS_RE, PlanRequest, make_plan

K2 = presets.load("kimi-k2-instruct-0905")
NO_GPU = describe(gpu="none", ram="768GB", memory="DDR5-4800x8", cores=32)
BOUND = 0.04  # relative L2 logit error the int8 linears stay within (module docstring)


def linear_plan(fmt="int8", main="fp32"):
    """Experts exact (bf16 on their kernels), the linears in `fmt`, the rest in `main`: only the linears differ."""
    return Plan("test", Settings(cpu_threads=2, expert_format="bf16"),
                (Rule(EXPERTS_RE, "cpu", "bf16", "cpu_moe"), Rule(CPU_LINEAR_RE, "cpu", fmt, "cpu_linear"),
                 Rule(".*", "cpu", main, "torch")))


def test_a_plan_without_a_gpu_keeps_its_linears_in_int8_and_projects_their_bytes():
    int8 = make_plan(K2, "k2", NO_GPU)
    assert [(r.match, r.kernel, r.format) for r in int8.plan.rules][1] == (CPU_LINEAR_RE, "cpu_linear", "int8")
    torch_plan = make_plan(K2, "k2", NO_GPU, PlanRequest(linear_format="torch"))
    assert not any(r.kernel == "cpu_linear" for r in torch_plan.plan.rules)
    counts, ours, theirs = memory.param_counts(K2), int8.budget.by_device["cpu"], torch_plan.budget.by_device["cpu"]
    for group in ("attention", "shared_experts", "dense_mlp", "lm_head"):
        assert 1.0 < ours[group] / counts[group] < 1.07  # int8-g128: 1.03 bytes a weight (the norms stay bf16)
        assert theirs[group] == 2 * counts[group]
    # kv_b_proj is kept as the absorbed attention uses it: per head [R, N] and [V, R]
    kv_b = "model.layers.3.self_attn.kv_b_proj.weight"
    per_head = matrix_bytes(Format("int8", 128), 512, 128) + matrix_bytes(Format("int8", 128), 128, 512)
    assert memory.linear_bytes(kv_b, (64 * 256, 512), "int8", K2) == 64 * per_head
    # the projection streams them at the kernels' share of the bandwidth, the torch plan's at torch's
    linear = int8.budget.linear_bytes
    assert linear == int8.traffic.cpu_linear_bytes == sum(ours[g] for g in ("attention", "shared_experts", "dense_mlp",
                                                                             "lm_head")) - _norm_bytes()
    bw = NO_GPU.ram_bandwidth_gbps * 1e9
    torch_linear = torch_plan.traffic.cpu_weight_bytes - (int8.traffic.cpu_weight_bytes - linear)
    saved_ms = 1e3 * (torch_linear / (bw * NO_GPU.cpu_torch_efficiency) - linear / (bw * NO_GPU.cpu_kernel_efficiency))
    got = torch_plan.projection.decode_ms["cpu_experts"] - int8.projection.decode_ms["cpu_experts"]
    assert got == pytest.approx(saved_ms, rel=1e-9) and got > 0
    assert int8.projection.decode_tps > torch_plan.projection.decode_tps


def _norm_bytes():
    """The attention's own norms (q_a_layernorm, kv_a_layernorm): in the attention group, in torch bf16."""
    return sum(2 * memory.numel(s) for n, s in memory.tensors(K2) if n.endswith("layernorm.weight") and ".self_attn." in n)


def test_groups_a_matrix_does_not_divide_fall_back_to_one_it_does_or_to_torch():
    assert memory.linear_format(Format("int8", 128), 7168) == Format("int8", 128)
    assert memory.linear_format(Format("int8", 128), 96) == Format("int8", 32)  # the tiny K2's q LoRA rank
    assert memory.linear_format(Format("int4", 64), 80) is None
    assert memory.linear_bytes("model.layers.0.self_attn.q_b_proj.weight", (128, 80), "int4-g64", K2) == 2 * 128 * 80


def test_plan_files_spell_it_cpu_linear_and_plans_with_cpu_gguf_still_load(tmp_path):
    plan = make_plan(K2, "kimi-k2-instruct-0905", NO_GPU).plan

    def spelled(rules):
        return [(r.match, r.device, r.format, r.kernel, r.options) for r in rules]

    assert spelled(load_plan(save_plan(plan, tmp_path / "plan.yaml")).rules) == spelled(plan.rules)
    rule = yaml.safe_load(dump_plan(plan))["rules"][1]
    assert rule == {"match": CPU_LINEAR_RE, "device": "cpu", "format": "int8", "kernel": "cpu_linear",
                    "options": {"threads": 32}}
    old = tmp_path / "old.yaml"  # a GGUF plan as written before cpu_linear
    old.write_text("model: k2\nrules:\n- {match: '^lm_head\\.', device: cpu, format: gguf, kernel: cpu_gguf}\n"
                   "- {match: '.*', device: cpu, format: bf16, kernel: torch}\n")
    assert load_plan(old).rules[0].kernel == "cpu_gguf"
    for rule, why in ((Rule(CPU_LINEAR_RE, "cuda:0", "int8", "cpu_linear"), "runs on cpu, not cuda:0"),
                      (Rule(CPU_LINEAR_RE, "cpu", "Q4_K", "cpu_linear"), "is a GGUF type"),
                      (Rule(CPU_LINEAR_RE, "cpu", "int8", "cpu_gguf"), "takes format gguf")):
        with pytest.raises(PlanError, match=why):
            check_rule(rule, "plan.yaml")


@pytest.mark.parametrize("match, why", [(r"\.mlp\.gate\.weight$", "also matches model.layers.1.mlp.gate.weight"),
                                        (r"^model\.embed_tokens\.", "the embedding is a lookup"),
                                        (r"\.mlp\.experts\.", "outside the routed experts and routers")])
def test_what_cpu_linear_does_not_compute_is_refused(match, why):
    plan = Plan("k2", Settings(), (Rule(match, "cpu", "int8", "cpu_linear"), Rule(".*", "cpu", "bf16", "torch")))
    with pytest.raises(PlanError, match=why):
        place_all(plan, K2)


def test_linear_formats_a_request_cannot_have_are_refused():
    with pytest.raises(PlanError, match="--linears Q4_K"):
        PlanRequest(linear_format="Q4_K")
    with pytest.raises(PlanError, match="is not one"):
        make_plan(K2, "k2", NO_GPU, PlanRequest(linear_format="gguf"))


def test_loaded_linears_stay_within_int8s_matvec_bound(k2_tiny):
    """Each matrix on the kernels against the reference model's own weight, in float64 on random inputs."""
    ours, ref = load_model(k2_tiny, plan=linear_plan()), load_model(k2_tiny)
    weights = dict(ref.named_parameters())
    blocks = {name: m for name, m in ours.named_modules() if isinstance(m, BlockLinear)}
    # per layer q_a, q_b, kv_a, o_proj; gate/up/down of the dense MLP and the 2 shared experts; the head
    assert len(blocks) == 4 * K2_SPEC.layers + 3 * K2_SPEC.layers + 1
    assert str(blocks["model.layers.0.self_attn.q_b_proj"].matrix.fmt) == "int8-g32"  # 96 inputs: the group that divides
    rng = np.random.default_rng(0)
    for name, block in blocks.items():
        w = weights[f"{name}.weight"].double()
        x = torch.from_numpy(rng.standard_normal((3, w.shape[1])).astype(np.float32))
        want = x.double() @ w.T
        assert float((block(x).double() - want).norm() / want.norm()) < MATVEC_ERROR_BOUND["int8"], name
    for layer in range(K2_SPEC.layers):
        kv_b = ours.model.layers[layer].self_attn.kv_b_proj
        assert isinstance(kv_b, AbsorbedKvB)
        cfg = ours.config
        N, R = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        w = weights[f"model.layers.{layer}.self_attn.kv_b_proj.weight"].double().view(cfg.num_attention_heads, -1, R)
        q = torch.from_numpy(rng.standard_normal((1, 5, cfg.num_attention_heads, N)).astype(np.float32))
        o = torch.from_numpy(rng.standard_normal((1, 5, cfg.num_attention_heads, R)).astype(np.float32))
        for got, want in ((kv_b.absorb_query(q), torch.einsum("bthn,hnr->bthr", q.double(), w[:, :N])),
                          (kv_b.absorb_output(o), torch.einsum("bthr,hvr->bthv", o.double(), w[:, N:]))):
            assert float((got.double() - want).norm() / want.norm()) < MATVEC_ERROR_BOUND["int8"]


@pytest.mark.parametrize("name", ["int8-g32", "int4-g64", "bf16"])
def test_a_dense_matrix_in_a_store_format_quantizes_in_row_blocks_and_pads_its_last_tile(name, monkeypatch):
    """200 rows (not a multiple of the 128-row tile), quantized 128 rows at a time: the same arrays as at once, and
    the products of the dequantized weights, for one token (decode) and six (the four-token kernel and the rest)."""
    from cpu_kernels import KernelThreads, dequantize_matrix, parse_format, quantize_matrix
    from cpu_kernels import dense
    from cpu_kernels.dense import DenseMatrix, DenseStack

    fmt, rng, threads = parse_format(name), np.random.default_rng(1), KernelThreads(2)
    w = rng.standard_normal((200, 256)).astype(np.float32)
    monkeypatch.setattr(dense, "QUANTIZE_ROWS", 128)
    m = DenseMatrix.quantized(fmt, w, threads)
    values, scales = quantize_matrix(w, fmt)
    assert np.array_equal(m.values, values) and np.array_equal(m.scales, scales)
    exact = dequantize_matrix(values, scales, fmt, 200, 256).astype(np.float64)
    assert np.array_equal(m.rows(np.array([199, 0, 130])), exact[[199, 0, 130]].astype(np.float32))
    for n_tokens in (1, 6):
        x = rng.standard_normal((n_tokens, 256)).astype(np.float32)
        want = x @ exact.T
        assert np.linalg.norm(m.forward(x) - want) < 0.01 * np.linalg.norm(want)  # int8 inputs: within 1 %
    stack = DenseStack.quantized(fmt, np.stack([w, -w[::-1]]), threads)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    got = stack.forward(x)
    assert got.shape == (2, 3, 200)
    assert np.linalg.norm(got[0] - x[0] @ exact.T) < 0.01 * np.linalg.norm(x[0] @ exact.T)


def routed(model, ids):
    """Logits [T, vocab] and each MoE layer's chosen experts, sorted: [layers, T, K]."""
    chosen = []
    hooks = [m.gate.register_forward_hook(lambda _, __, out: chosen.append(out[1].sort(-1).values))
             for m in model.modules() if isinstance(m, MoE)]
    logits = model(ids)[0]
    for h in hooks:
        h.remove()
    return logits, torch.stack(chosen)


@pytest.mark.parametrize("which", ["k2", "v3"])
def test_int8_linears_keep_the_logits_within_the_bound(which, k2_tiny, v3_tiny):
    folder = {"k2": k2_tiny, "v3": v3_tiny}[which]
    ours, ref = load_model(folder, plan=linear_plan()), load_model(folder)
    clean, medians, agree = [], [], []
    for seed in range(4):
        ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(seed))
        (got, got_experts), (want, want_experts) = routed(ours, ids), routed(ref, ids)
        rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
        flipped = (got_experts != want_experts).any(-1).any(0).cumsum(0) > 0  # at or after a changed choice
        clean.append(rel[~flipped])
        medians.append(float(rel.median()))
        agree.append(float((got.argmax(-1) == want.argmax(-1)).float().mean()))
    clean = torch.cat(clean)
    print(f"\n{which}: {len(clean)} positions before a router's choice differs, their relative logit error at most "
          f"{float(clean.max()):.4f}; medians {[f'{m:.4f}' for m in medians]}; argmax agreement {agree}")
    assert len(clean) >= 8 and float(clean.max()) < BOUND
    assert max(medians) < BOUND and min(agree) >= 0.85


def test_decode_steps_through_the_absorbed_kernels_equal_one_prefill(k2_tiny):
    model = load_model(k2_tiny, plan=linear_plan(main="bf16"))
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(7))
    cache = new_cache(model, 24)
    steps = torch.cat([model(ids[:, :8], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(8, 24)],
                      dim=1)
    whole = model(ids)
    rel = (steps - whole).norm(dim=-1) / whole.norm(dim=-1)
    assert float(rel.median()) < 0.03  # the one-token kernels may quantize their inputs, the four-token ones not


def test_planned_for_a_machine_without_gpu_runs_on_the_kernels(v3_tiny):
    """What generate/chat/serve load without --plan on a CPU-only machine: int8 linears, bf16 activations."""
    from hybrid.generation.runtime import open_runtime, plan_for_this_machine
    from hybrid.read.open import open_checkpoint

    ckpt = open_checkpoint(v3_tiny)
    plan = plan_for_this_machine(ckpt, request=PlanRequest(expert_format="int8"), hw=NO_GPU).plan
    rt = open_runtime(ckpt, plan)
    assert isinstance(rt.model.lm_head, BlockLinear) and str(rt.model.lm_head.matrix.fmt) == "int8-g128"
    assert isinstance(rt.model.model.layers[0].self_attn.kv_b_proj, AbsorbedKvB)
    ids = torch.randint(0, 512, (1, 32), generator=torch.Generator().manual_seed(1))
    got, want = rt.model(ids), load_model(ckpt)(ids)
    assert float(((got - want).norm(dim=-1) / want.norm(dim=-1)).median()) < 0.1  # int8 experts, bf16 activations
