"""Greedy choices against llama.cpp itself: tiny split `deepseek2` GGUFs whose experts ggml quantized to K-quant
and IQ/TQ mixes, run by a scratch llama.cpp build and by hybrid's planned runtime, compared position by position.

    .venv/bin/python benchmarks/llamacpp_agreement.py --llama-python /work/scratch/llama-venv/bin/python \
        [--mix Q4_K/Q6_K ...] [--prompts 8 --length 32] [--work /tmp/hybrid-llamacpp] [--json out.json]

llama.cpp is an outside oracle, never a dependency and never in CI: `--llama-python` is an interpreter with
llama-cpp-python built from source, gguf and numpy (benchmarks/ggml_ref.py's docstring says how to build one).
This file runs in both interpreters: as the driver in the project venv, and as a child in the llama one
(`--child quantize|logits`, which imports only gguf, numpy, ggml_ref and llama_cpp).

Per mix:
1. `make_tiny` writes a float checkpoint (hidden 256, experts 256 wide: every K/IQ/TQ 256-weight block fits
   gate, up and down) and tests/gguf_files.py's `export_gguf` writes it as a 2-split F32 GGUF, adding what
   llama.cpp needs and the exporter leaves out: `tokenizer.ggml.merges`.
2. Child `quantize` rewrites each split with ggml's own quantizers (`ggml_ref.quantize`, llama-quantize's code;
   IQ2_XXS/IQ2_XS/IQ1_S with an all-ones importance matrix): the mix's types on the routed experts, Q8_0 or F32
   on the other matrices, norms / router / correction bias F32. Keys and split keys are copied as they are.
3. Child `logits` runs llama.cpp (CPU) on token ids, keeping the logits of every position (each position of a
   teacher-forced prompt is one greedy choice) and, through its eval callback, the experts each MoE layer chose.
4. hybrid opens the same files with the planner's plan for this machine (experts through the GGUF block
   kernels, cpu_moe; the other matrices in their blocks, cpu_gguf); the plain dequantized fp32 torch model
   (`load_model` without a plan) runs beside it as the reference. Both record their routing too.

What counts as clear. llama.cpp rounds the activations of every quantized matmul to 8 bits (Q8_K per 256, Q8_0
per 32) and hybrid's plan carries activations in bf16, so each logit moves by ~1% of the logits' spread; near-ties
may go either way, and there are two kinds:
- the top-2 logits: a position is clear when llama.cpp's top1 - top2 > CLEAR_MARGIN_STD x the std of its logits
  there. The table prints how far hybrid moved that margin (sd / max, same unit) so the headroom is visible;
- the routers: where an expert's score (sigmoid + bias) is within ~0.01 of the next one's, rounding may swap it,
  and that token's logits, and through attention every later token's, jump by 20-100%. So a position is
  compared only when llama.cpp, hybrid and the reference sent every token up to it to the same experts.
Routing is itself checked so this cannot hide a bug: in each prompt, the first token-layer where llama.cpp or
hybrid routes differently from the reference must be a router near-tie (the reference's K-th - (K+1)-th score
< CLEAR_ROUTER_GAP). Exit status 1 when a clear position disagrees, a divergence is not at a near-tie, or
hybrid cannot run a file.

llama.cpp settings: F32 KV cache (its default F16 cache rounds MLA's latent once more), no flash attention,
2 threads, the file's YaRN betas handed over as context parameters (see `file_yarn_betas`), use_extra_bufts
off on CPUs with AMX (gguf-notes: its AMX buffer type asserts on deepseek2 MoE graphs) or with
--no-extra-bufts, otherwise its defaults (CPU_REPACK on). Longer than ~400 lines: two interpreters' halves of
one comparison, kept in one file so they cannot drift apart.
"""

import argparse
import ctypes
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Measured over 8 mixes x 32 prompts x 48 positions (12,288 choices; 6,300 with identical routing): the top-2
# margin moves by 0.017-0.027 std (sd) between llama.cpp and hybrid, at most 0.104; 0.2 leaves twice that.
CLEAR_MARGIN_STD = 0.2
# In the same runs every routing divergence began at a reference score gap below 0.0101 (llama.cpp's noisier
# 8-bit activations) or 0.0036 (hybrid's): 0.02 leaves twice the largest.
CLEAR_ROUTER_GAP = 0.02
N_PROMPTS, PROMPT_LEN = 8, 32
REST_MATRICES = r"^(?!.*(norm|ffn_gate_inp|exp_probs_b)).*\.weight$"  # every matrix but norms and router
# (name, {regex: ggml type} for the routed experts, type of the other matrices). Gate and up differ in one mix:
# each tensor's own type is dispatched on, never a recipe.
MIXES = [
    ("Q4_K/Q6_K", {"ffn_(gate|up)_exps": "Q4_K", "ffn_down_exps": "Q6_K"}, "Q8_0"),
    ("Q2_K/Q3_K", {"ffn_(gate|up)_exps": "Q2_K", "ffn_down_exps": "Q3_K"}, "Q8_0"),
    ("Q5_K/Q8_0", {"ffn_(gate|up)_exps": "Q5_K", "ffn_down_exps": "Q8_0"}, "F32"),
    ("IQ2_XXS/IQ3_XXS", {"ffn_(gate|up)_exps": "IQ2_XXS", "ffn_down_exps": "IQ3_XXS"}, "Q8_0"),
    ("IQ2_XS/IQ3_S", {"ffn_(gate|up)_exps": "IQ2_XS", "ffn_down_exps": "IQ3_S"}, "Q8_0"),
    ("IQ1_S,IQ1_M/IQ2_S", {"ffn_gate_exps": "IQ1_S", "ffn_up_exps": "IQ1_M", "ffn_down_exps": "IQ2_S"}, "Q8_0"),
    ("TQ1_0/IQ4_XS", {"ffn_(gate|up)_exps": "TQ1_0", "ffn_down_exps": "IQ4_XS"}, "F32"),
    ("TQ2_0/IQ4_NL", {"ffn_(gate|up)_exps": "TQ2_0", "ffn_down_exps": "IQ4_NL"}, "Q8_0"),
    # Unsloth-style dynamic file: types per layer; K-quants on shared experts, dense MLP, attention and output
    ("UD-like", {r"blk\.1\.ffn_(gate|up)_exps": "Q4_K", r"blk\.1\.ffn_down_exps": "Q6_K",
                 r"blk\.2\.ffn_(gate|up)_exps": "IQ3_XXS", r"blk\.2\.ffn_down_exps": "IQ4_XS",
                 r"_shexp|ffn_(gate|up|down)\.": "Q5_K", r"attn_(q_a|q_b|kv_a_mqa)\.": "Q4_K",
                 r"^output\.": "Q6_K"}, "Q8_0"),
]


# ---- llama interpreter side: gguf, numpy, ggml_ref and llama_cpp only --------------------------------------

def child_quantize(src: Path, dst: Path, rules: list):
    """Rewrite every split of `src` into `dst`, each F32 tensor in the first matching rule's ggml type (ggml's
    quantizers); tensors no rule matches are copied. Keys, their order and the split keys are kept."""
    import gguf

    sys.path.insert(0, str(HERE))
    from ggml_ref import quantize

    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.gguf")):
        reader = gguf.GGUFReader(path)
        writer = gguf.GGUFWriter(dst / path.name, reader.fields["general.architecture"].contents())
        for field in reader.fields.values():
            if field.name == "general.architecture" or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
        for t in reader.tensors:
            type_name = next((ty for pattern, ty in rules if re.search(pattern, t.name)), "F32")
            data = np.asarray(t.data)
            if type_name == "F32" or t.tensor_type != gguf.GGMLQuantizationType.F32:
                writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
                continue
            rows = quantize(data.reshape(-1, data.shape[-1]), type_name)
            writer.add_tensor(t.name, rows.reshape(*data.shape[:-1], -1),
                              raw_dtype=gguf.GGMLQuantizationType[type_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def file_yarn_betas(first_shard: Path) -> tuple[float, float]:
    """The file's YaRN beta_fast / beta_slow (-1, llama.cpp's own choice, where it has none). llama.cpp 0.3.36's
    deepseek2 loader does not read these keys and runs 32 / 1 whatever the file says (measured: asking for the
    file's values gives logits bit-identical to 32 on a file saying 1, K2's value), so they are passed as
    context parameters, as a user would with --yarn-beta-fast / --yarn-beta-slow."""
    import gguf

    fields = gguf.GGUFReader(first_shard).fields
    arch = fields["general.architecture"].contents()
    get = lambda key: float(fields[key].contents()) if key in fields else -1.0  # noqa: E731
    return get(f"{arch}.rope.scaling.yarn_beta_fast"), get(f"{arch}.rope.scaling.yarn_beta_slow")


class _RoutingTap:
    """llama.cpp's eval callback keeping each `ffn_moe_topk-L` tensor (the experts chosen, int32 [T, K], maybe a
    strided view of the argsort). Reads ne/nb at their offsets in ggml.h's struct ggml_tensor (type, buffer,
    ne[4], nb[4]); the logits are bit-identical with and without the callback (checked once by hand)."""

    NE_OFFSET, NB_OFFSET = 16, 48

    def __init__(self, lib_dir: Path):
        base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
        self.name, self.nbytes, self.get = base.ggml_get_name, base.ggml_nbytes, base.ggml_backend_tensor_get
        self.name.restype, self.name.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        self.nbytes.restype, self.nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
        self.get.restype = None
        self.get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.seen = {}  # layer -> [T, K] of the last eval

    def __call__(self, t, ask, _user):
        name = self.name(t).decode()
        match = re.fullmatch(r"ffn_moe_topk-(\d+)", name)
        if ask or match is None:
            return match is not None  # ask: observe only these; otherwise: keep computing
        ne = (ctypes.c_int64 * 4).from_address(t + self.NE_OFFSET)
        nb = (ctypes.c_size_t * 4).from_address(t + self.NB_OFFSET)
        raw = np.empty(self.nbytes(t), np.uint8)
        self.get(t, raw.ctypes.data, 0, raw.nbytes)
        ids = np.lib.stride_tricks.as_strided(raw.view(np.int32), shape=(ne[1], ne[0]), strides=(nb[1], nb[0]))
        self.seen[int(match.group(1))] = np.sort(ids, axis=-1)
        return True


def child_logits(first_shard: Path, prompts: list, out: Path, threads: int, extra_bufts: bool):
    """llama.cpp on each prompt from position 0: logits [P, T, vocab] to `out`.npy, routing [P, T, L, K] (sorted
    expert ids per MoE layer) to `out`.routing.npy."""
    import llama_cpp
    import llama_cpp.llama_cpp as api  # Llama() takes its default params from here

    tap = _RoutingTap(Path(llama_cpp.__file__).parent / "lib")
    callback = api.ggml_backend_sched_eval_callback(tap)
    model_defaults, context_defaults = api.llama_model_default_params, api.llama_context_default_params

    def model_params():
        p = model_defaults()
        p.use_extra_bufts = extra_bufts
        return p

    def context_params():
        p = context_defaults()
        p.cb_eval = callback
        return p

    api.llama_model_default_params, api.llama_context_default_params = model_params, context_params
    n_ctx = max(len(p) for p in prompts)
    beta_fast, beta_slow = file_yarn_betas(first_shard)
    llm = llama_cpp.Llama(model_path=str(first_shard), n_gpu_layers=0, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                          n_threads=threads, n_threads_batch=threads, logits_all=True, flash_attn=False,
                          type_k=0, type_v=0,  # GGML_TYPE_F32
                          yarn_ext_factor=-1.0, yarn_attn_factor=-1.0, yarn_beta_fast=beta_fast,
                          yarn_beta_slow=beta_slow, verbose=False)
    logits, routing = [], []
    for ids in prompts:
        llm.reset()
        tap.seen.clear()
        llm.eval(ids)  # one ubatch: n_ubatch = n_ctx
        logits.append(np.array(llm.scores[:len(ids)], dtype=np.float32))
        routing.append(np.stack([tap.seen[layer] for layer in sorted(tap.seen)], axis=1))
    np.save(out, np.stack(logits))
    np.save(out.with_suffix(".routing.npy"), np.stack(routing))


# ---- project side ------------------------------------------------------------------------------------------

def has_amx() -> bool:
    try:
        return "amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def export_f32(work: Path) -> Path:
    """The tiny checkpoint as a 2-split F32 GGUF (norms, router, bias F32 anyway), with one BPE merge."""
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_files import export_gguf

    from hybrid.read.tiny import TinySpec, make_tiny

    spec = TinySpec(layers=3, dense_layers=1, experts=8, top_k=2, moe_width=256, dense_width=256,
                    q_lora_rank=256, fp8=False)
    hf = make_tiny(work / "hf", spec, overwrite=True)
    return export_gguf(hf, work / "f32", "F32", n_shards=2, edit_metadata=add_merges)


def add_merges(meta: dict):
    """export_gguf's edit_metadata for make_tiny's byte-level vocabulary: llama.cpp refuses a gpt2 vocabulary
    without merges, gguf-py an empty array, and a byte-level vocabulary has none, so one harmless pair whose
    product is no token (llama.cpp then falls back to the two bytes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf import GGUFValueType
    from gguf_files import Meta

    from hybrid.read.gguf import byte_alphabet

    alphabet = byte_alphabet()
    meta["tokenizer.ggml.merges"] = Meta(GGUFValueType.ARRAY, [f"{alphabet[0]} {alphabet[1]}"], GGUFValueType.STRING)


def run_child(llama_python: str, *args) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([llama_python, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llama.cpp child {args[0]} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return time.perf_counter() - t0


def hybrid_side(folder: Path, prompts: list) -> dict:
    """hybrid on `prompts`: for "hybrid" (the planned runtime) and "reference" (the plain dequantized fp32 torch
    model), logits [P, T, vocab] and routing [P, T, L, K] (sorted expert ids per MoE layer); "router_gap"
    [P, T, L], the reference's K-th minus (K+1)-th choice score (sigmoid + bias); "kernels", the plan's."""
    import torch

    from hybrid.generation.runtime import open_runtime, plan_for_this_machine
    from hybrid.read.open import open_checkpoint
    from hybrid.run.layers import Router
    from hybrid.run.loader import load_model

    ckpt = open_checkpoint(folder)
    plan = plan_for_this_machine(ckpt).plan
    models = {"hybrid": open_runtime(ckpt, plan).model, "reference": load_model(open_checkpoint(folder))}
    seen = []  # (ids [T, K], gap [T]) per MoE layer of the forward in progress

    def tap(router, inputs, out):
        cfg = router.cfg
        logits = torch.nn.functional.linear(inputs[0].float(), router.weight.float())
        choice = logits.sigmoid() if cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if router.e_score_correction_bias is not None:
            choice = choice + router.e_score_correction_bias.float()
        top = choice.topk(cfg.num_experts_per_tok + 1, dim=-1).values
        seen.append((out[1].sort(dim=-1).values.numpy(), (top[:, -2] - top[:, -1]).numpy()))

    result = {"kernels": sorted({r.kernel for r in plan.rules})}
    for key, model in models.items():
        hooks = [m.register_forward_hook(tap) for m in model.modules() if isinstance(m, Router)]
        logits, routing, gaps = [], [], []
        with torch.inference_mode():
            for ids in prompts:
                seen.clear()
                logits.append(model(torch.tensor([ids]))[0].float().numpy())
                routing.append(np.stack([chosen for chosen, _ in seen], axis=1))
                gaps.append(np.stack([gap for _, gap in seen], axis=1))
        for h in hooks:
            h.remove()
        result[key] = {"logits": np.stack(logits), "routing": np.stack(routing)}
        result["router_gap"] = np.stack(gaps)  # the reference's, which runs last
    return result


def compare(llama: dict, ours: dict, ref: dict, router_gap: np.ndarray) -> dict:
    """`ours` against llama.cpp at every position, and at the clear ones (module docstring). Each of the three is
    {"logits": [P, T, vocab], "routing": [P, T, L, K]}."""
    theirs, mine = llama["logits"], ours["logits"]
    std = theirs.std(axis=-1)
    order = np.argsort(-theirs, axis=-1)[..., :2]
    pick = lambda x: np.take_along_axis(x, order, axis=-1)  # noqa: E731  llama's top-2 in `x`
    margin = -np.diff(pick(theirs), axis=-1)[..., 0] / std
    moved = margin + np.diff(pick(mine), axis=-1)[..., 0] / std  # how far ours moved llama's margin
    routed_alike = ((llama["routing"] == ref["routing"]) & (ours["routing"] == ref["routing"])).all(axis=(2, 3))
    alike = np.logical_and.accumulate(routed_alike, axis=1)  # the whole prefix routed alike
    clear = alike & (margin > CLEAR_MARGIN_STD)
    same = theirs.argmax(-1) == mine.argmax(-1)
    rel = np.linalg.norm(mine - theirs, axis=-1) / np.linalg.norm(theirs, axis=-1)
    first_gaps = {name: first_divergence_gap(side["routing"], ref["routing"], router_gap)
                  for name, side in (("llama", llama), ("ours", ours))}
    not_at_tie = sum(int(((g >= CLEAR_ROUTER_GAP) & np.isfinite(g)).sum()) for g in first_gaps.values())
    return {"n": int(same.size), "agree": int(same.sum()), "n_clear": int(clear.sum()),
            "agree_clear": int((same & clear).sum()), "n_alike": int(alike.sum()),
            "divergences_not_at_tie": not_at_tie,
            "first_divergence_gap_max": {k: float(g[np.isfinite(g)].max(initial=0)) for k, g in first_gaps.items()},
            "routing_agree": float((ours["routing"] == llama["routing"]).all(axis=-1).mean()),
            "rel_diff": float(rel.mean()), "rel_diff_alike": float(rel[alike].mean()),
            "margin_moved_sd": float(moved[alike].std()), "margin_moved_max": float(np.abs(moved[alike]).max()),
            "disagree_clear": [{"prompt": int(p), "position": int(t), "margin_std": float(margin[p, t]),
                                "llama": int(theirs[p, t].argmax()), "hybrid": int(mine[p, t].argmax())}
                               for p, t in zip(*np.nonzero(clear & ~same))]}


def first_divergence_gap(routing: np.ndarray, ref: np.ndarray, router_gap: np.ndarray) -> np.ndarray:
    """[P]: the reference's router gap at the first (position, layer) where `routing` differs from `ref`
    (inf where it never does): a divergence must start at a near-tie."""
    differs = (routing != ref).any(axis=-1).reshape(len(ref), -1)  # [P, T * L], positions outer
    first = differs.argmax(axis=1)
    gaps = router_gap.reshape(len(ref), -1)[np.arange(len(ref)), first]
    return np.where(differs.any(axis=1), gaps, np.inf)


def run_mix(name, experts, rest, f32: Path, args, prompts, prompts_file: Path) -> dict:
    folder = args.work / re.sub(r"[^A-Za-z0-9_]+", "-", name)
    t_quant = run_child(args.llama_python, "quantize", f32, folder, json.dumps([*experts.items(),
                                                                               (REST_MATRICES, rest)]))
    out = folder / "llama_logits.npy"
    extra = "0" if args.no_extra_bufts or has_amx() else "1"
    t_llama = run_child(args.llama_python, "logits", sorted(folder.glob("*.gguf"))[0], prompts_file, out,
                        args.threads, extra)
    llama = {"logits": np.load(out), "routing": np.load(out.with_suffix(".routing.npy"))}
    result, t0 = {"mix": name, "experts": experts, "rest": rest}, time.perf_counter()
    try:
        ours = hybrid_side(folder, prompts)
    except Exception as e:  # a file llama.cpp runs and hybrid cannot: this mix's failure, shown in the table
        return result | {"error": f"{type(e).__name__}: {e}",
                         "seconds": {"quantize": t_quant, "llama": t_llama, "hybrid": time.perf_counter() - t0}}
    seconds = {"quantize": t_quant, "llama": t_llama, "hybrid": time.perf_counter() - t0}
    for key in ("hybrid", "reference"):
        np.save(folder / f"{key}_logits.npy", ours[key]["logits"])
    gap = ours["router_gap"]
    return result | {"kernels": ours["kernels"], "seconds": seconds,
                     "hybrid": compare(llama, ours["hybrid"], ours["reference"], gap),
                     "reference": compare(llama, ours["reference"], ours["reference"], gap)}


def passed(r: dict) -> bool:
    h = r.get("hybrid")
    return h is not None and h["agree_clear"] == h["n_clear"] and h["divergences_not_at_tie"] == 0


def show(results: list, prompts: list, console):
    from rich.table import Table

    table = Table(title=f"hybrid's greedy choices vs llama.cpp's: {len(prompts)} prompts x {len(prompts[0])} "
                        f"positions; clear = llama's top1 - top2 > {CLEAR_MARGIN_STD} std of its logits, the prefix "
                        f"routed alike by llama.cpp, hybrid and the fp32 reference. divergence gap: the largest router "
                        f"score gap at which llama.cpp / hybrid first routed unlike the reference (< {CLEAR_ROUTER_GAP}"
                        f" passes). margin moved: by hybrid, in std of llama's logits, where routed alike")
    for col in ("mix: gate,up / down", "rest", "= llama", "= llama, clear", "routed alike", "experts = llama",
                "divergence gap llama / hybrid", "rel diff, alike", "margin moved sd / max", "ref = llama", "s"):
        table.add_column(col, justify="left" if col.startswith("mix") or col == "rest" else "right")
    for r in results:
        seconds = f"{sum(r['seconds'].values()):.0f}"
        if "error" in r:
            table.add_row(r["mix"], r["rest"], "[red]hybrid failed[/]", *[""] * 7, seconds)
            continue
        h, ref = r["hybrid"], r["reference"]
        style = "green" if passed(r) else "red"
        table.add_row(r["mix"], r["rest"], f"{h['agree']}/{h['n']}", f"[{style}]{h['agree_clear']}/{h['n_clear']}[/]",
                      f"{h['n_alike']}/{h['n']}", f"{100 * h['routing_agree']:.1f}%",
                      "{llama:.4f} / {ours:.4f}".format(**h["first_divergence_gap_max"]), f"{h['rel_diff_alike']:.4f}",
                      f"{h['margin_moved_sd']:.3f} / {h['margin_moved_max']:.3f}", f"{ref['agree']}/{ref['n']}",
                      seconds)
    console.print(table)
    for r in results:
        if "error" in r:
            console.print(f"[red]{r['mix']}: hybrid failed: {r['error']}[/]")
            continue
        for d in r["hybrid"]["disagree_clear"]:
            console.print(f"[red]{r['mix']}: prompt {d['prompt']} position {d['position']}: llama {d['llama']}, "
                          f"hybrid {d['hybrid']} (margin {d['margin_std']:.3f} std)[/]")
        if r["hybrid"]["divergences_not_at_tie"]:
            console.print(f"[red]{r['mix']}: {r['hybrid']['divergences_not_at_tie']} routing divergence(s) from the "
                          f"reference began at a router gap >= {CLEAR_ROUTER_GAP}[/]")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama-python", help="interpreter with llama-cpp-python (built from source), gguf, numpy")
    p.add_argument("--work", type=Path, default=Path("/tmp/hybrid-llamacpp"))
    p.add_argument("--mix", action="append", help="run only these mixes (by name; repeatable)")
    p.add_argument("--prompts", type=int, default=N_PROMPTS, help="random prompts of token ids")
    p.add_argument("--length", type=int, default=PROMPT_LEN, help="tokens per prompt: one greedy choice each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-extra-bufts", action="store_true", help="llama.cpp without its repacked CPU layouts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "quantize":
            return child_quantize(Path(rest[0]), Path(rest[1]), json.loads(rest[2]))
        return child_logits(Path(rest[0]), json.loads(Path(rest[1]).read_text()), Path(rest[2]), int(rest[3]),
                            rest[4] == "1")
    if not args.llama_python:
        p.error("--llama-python is required")
    from rich.console import Console

    console, t0 = Console(width=None if Console().is_terminal else 170), time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    f32 = export_f32(args.work)
    from hybrid.read.open import open_checkpoint

    vocab = open_checkpoint(f32).config.vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(0, vocab, args.length).tolist() for _ in range(args.prompts)]
    prompts_file = args.work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    results = [run_mix(name, experts, rest, f32, args, prompts, prompts_file)
               for name, experts, rest in MIXES if not args.mix or name in args.mix]
    show(results, prompts, console)
    ran = [r["hybrid"] for r in results if "error" not in r]
    console.print(f"summary: hybrid's greedy choice equals llama.cpp's at {sum(h['agree_clear'] for h in ran)}/"
                  f"{sum(h['n_clear'] for h in ran)} clear positions ({sum(h['agree'] for h in ran)}/"
                  f"{sum(h['n'] for h in ran)} overall) in {len(ran)} mixes; {len(results) - len(ran)} failed to "
                  f"run; {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"clear_margin_std": CLEAR_MARGIN_STD, "clear_router_gap": CLEAR_ROUTER_GAP,
                                         "prompts": prompts, "results": results}, indent=2))
    return 0 if all(passed(r) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
