"""Measure where a token's time goes: real prefill and decode through the runtime, with a TimelineRecorder.

Dimension legend: B batch (sequences decoded together), T prompt tokens, K top-k, E experts.

`profile_run` returns, for one prompt length and batch: time to first token, prompt tokens/s, decode
tokens/s (median, and min and max over repeats), a decode step's seconds (fastest and slowest repeat), and per
decoded token the seconds of each component
(embedding, attention, router, shared_expert, routed_submit, routed_wait (the main thread waiting for the CPU
experts), transfers (host <-> device copies), dense_mlp, lm_head, sampling, other = Python between sections),
per layer as well. The components add up to the timeline; `coverage` compares that sum with a wall clock
read independently around the loop. Routing is counted per (layer, expert) for the planner, and the expert
bytes each decoded token streams are counted for the bandwidth view.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch

from hybrid.generation.generate import decode_step, new_cache, prefill_rows
from hybrid.generation.sampling import SamplingParams, sample
from hybrid.run.timing import NULL_RECORDER, CudaClock, TimelineRecorder, WallClock

COMPONENTS = ("embedding", "attention", "router", "shared_expert", "routed_submit", "routed_wait", "transfers",
              "dense_mlp", "lm_head", "sampling", "other")


@dataclass
class RoutingCounter:
    """Counts expert choices per MoE layer through forward hooks on the routers; also the distinct experts of
    each step (what a decode step streams)."""

    counts: dict = field(default_factory=dict)  # layer -> [count per expert]
    step_unique: list = field(default_factory=list)  # per forward: {layer: distinct experts}
    hooks: list = field(default_factory=list)

    def attach(self, model):
        n = model.config.n_routed_experts
        for i, layer in enumerate(model.model.layers):
            if model.config.is_moe_layer(i):
                self.counts.setdefault(i, [0] * n)
                self.hooks.append(layer.mlp.gate.register_forward_hook(self._hook(i)))
        return self

    def _hook(self, layer):
        def record(module, inputs, output):
            ids = output[1].flatten().tolist()
            for e in ids:
                self.counts[layer][e] += 1
            if self.step_unique is not None:
                self.step_unique.append((layer, len(set(ids))))
        return record

    def detach(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def to_json(self, model_name: str) -> dict:
        return {"model": model_name, "tokens": sum(self.counts[min(self.counts)]) if self.counts else 0,
                "counts": {str(k): v for k, v in sorted(self.counts.items())}}


def make_recorder(model) -> TimelineRecorder:
    device = model.model.norm.weight.device
    return TimelineRecorder(CudaClock(torch) if device.type == "cuda" else WallClock())


def prompt_ids(vocab: int, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, min(vocab, 256), (batch, length), generator=torch.Generator().manual_seed(seed))


def cpu_kernels_of(model) -> list:
    """The cpu_kernels.MoEExperts objects of the model's layers (their `busy_s` counts kernel time)."""
    return [layer.mlp.experts.cpu for layer in model.model.layers if hasattr(getattr(layer.mlp, "experts", None), "cpu")]


def one_repeat(model, ids: torch.Tensor, n_gen: int, counter: RoutingCounter | None, chunk: int | None = None):
    """Prefill then n_gen greedy decode steps; returns (prefill_s, decode wall s, timeline s, recorder, busy s)."""
    B, T = ids.shape
    cache = new_cache(model, T + n_gen, batch=B)
    t0 = time.perf_counter()
    logits = prefill_rows(model, cache, ids, chunk)
    prefill_s = time.perf_counter() - t0
    rec = make_recorder(model)
    model.set_recorder(rec)
    params = SamplingParams()
    tokens = [sample(row, params) for row in logits]
    if counter is not None:
        counter.step_unique = []
    kernels = cpu_kernels_of(model)
    busy0 = sum(k.busy_s for k in kernels)
    rec.start()
    t0 = time.perf_counter()
    try:
        for _ in range(n_gen):
            logits = decode_step(model, cache, tokens)
            with rec.section("sampling"):
                tokens = [sample(row, params) for row in logits]
        timeline = rec.stop()
    finally:
        model.set_recorder(NULL_RECORDER)
    wall = time.perf_counter() - t0
    return prefill_s, wall, timeline, rec, sum(k.busy_s for k in kernels) - busy0


def profile_run(model, prompt_len: int, n_gen: int, batch: int = 1, repeat: int = 3,
                counter: RoutingCounter | None = None, expert_bytes: int = 0, chunk: int | None = None,
                step=None) -> dict:
    """Warm-up once, then `repeat` measured runs (prefill `chunk` tokens per forward: the runtime's);
    see the module docstring for what comes back. step(k, what) is called before each: k = 0 for the
    warm-up, then 1..repeat."""
    step = step or (lambda k, what: None)
    ids = prompt_ids(model.config.vocab_size, batch, prompt_len)
    step(0, "warm-up")
    one_repeat(model, ids, min(n_gen, 2), None, chunk)  # warm-up: kernels compiled, caches touched
    runs = []
    for i in range(repeat):
        step(i + 1, f"repeat {i + 1}/{repeat}")
        prefill_s, wall, timeline, rec, busy = one_repeat(model, ids, n_gen, counter, chunk)
        streamed = 0
        if counter is not None:  # the decode steps' distinct experts (prefill hooks ran before reset)
            streamed = sum(u for _, u in counter.step_unique) * expert_bytes
        runs.append((prefill_s, wall, timeline, rec, streamed, busy))
    best = min(runs, key=lambda r: r[1])
    prefill_s, wall, timeline, rec, streamed, busy = best
    per_token = {k: v / n_gen for k, v in rec.by_component().items()}
    decode = [batch * n_gen / r[1] for r in runs]
    prompt = [batch * prompt_len / r[0] for r in runs]
    return {
        "prompt_len": prompt_len, "batch": batch, "generated": n_gen, "repeat": repeat,
        "ttft_s": statistics.median(r[0] for r in runs),
        "prompt_tps": statistics.median(prompt), "prompt_tps_spread": max(prompt) - min(prompt),
        "decode_tps": statistics.median(decode), "decode_tps_spread": max(decode) - min(decode),
        "decode_tps_min": min(decode), "decode_tps_max": max(decode),
        "token_s": wall / n_gen, "token_s_max": max(r[1] for r in runs) / n_gen,  # token_s: the fastest repeat
        "components_s": {c: per_token.get(c, 0.0) for c in COMPONENTS},
        "per_layer_s": {str(k): {c: v / n_gen for c, v in d.items()} for k, d in rec.by_layer().items()},
        "coverage": timeline / wall,
        "expert_bytes_per_token": streamed / n_gen / batch if n_gen else 0,
        "cpu_experts_busy_s": busy / n_gen,  # kernel time per step, concurrent with the components above
    }


TORCH_PARTS = ("attention", "dense_mlp", "shared_expert", "lm_head")


def calibrated_hardware(hw, probe_gbps: float, result: dict, n_layers: int, kernel_gbps: float | None,
                        cpu_torch_bytes: int = 0):
    """This machine as measured: read bandwidth from the probe, the expert kernels' share of it, CPU torch's
    share of it on the non-expert weights (when they live on the CPU), and the fixed per-layer cost (Python
    and launches: what the timeline calls `other`, plus routing and hand-off)."""
    from dataclasses import replace

    c = result["components_s"]
    fixed = c["other"] + c["router"] + c["routed_submit"] + c["transfers"] + c["sampling"] + c["embedding"]
    changes = {"ram_bandwidth_gbps": round(probe_gbps, 2), "layer_overhead_us": round(1e6 * fixed / n_layers, 1),
               "source": f"measured by hybrid profile ({hw.source})", "notes": ()}
    if kernel_gbps:
        changes["cpu_kernel_efficiency"] = _share(kernel_gbps / probe_gbps)
    torch_s = sum(c[k] for k in TORCH_PARTS)
    if cpu_torch_bytes and torch_s:
        changes["cpu_torch_efficiency"] = _share(cpu_torch_bytes / torch_s / 1e9 / probe_gbps)
    return replace(hw, **changes)


def _share(x: float) -> float:
    """A measured share of the probe, at most 1, to 3 significant digits: rounding to decimals turned a tiny
    model's 0.0004 into 0, which the projection then divides by."""
    return float(f"{min(x, 1.0):.3g}")


def full_size_projection(cfg_small, cfg_full, result: dict) -> dict:
    """Decode and prefill time of the full model from a measured few-layer model of the same widths: each
    per-layer component measured on the small model, times the full model's count of such layers; the
    embedding, lm_head and sampling scaled by the vocabulary."""
    per_layer = result["per_layer_s"]
    moe = [v for k, v in per_layer.items() if cfg_small.is_moe_layer(int(k))]
    dense = [v for k, v in per_layer.items() if not cfg_small.is_moe_layer(int(k))]

    def mean(rows, key):
        return sum(r.get(key, 0.0) for r in rows) / max(len(rows), 1)

    n_moe_full = cfg_full.num_hidden_layers - cfg_full.first_k_dense_replace
    attn = mean(moe + dense, "attention")
    moe_parts = sum(mean(moe, k) for k in ("router", "routed_submit", "shared_expert", "routed_wait", "transfers"))
    c = result["components_s"]
    vocab = cfg_full.vocab_size / cfg_small.vocab_size
    other_per_layer = c["other"] / cfg_small.num_hidden_layers
    decode_s = (cfg_full.num_hidden_layers * (attn + other_per_layer) + n_moe_full * moe_parts
                + cfg_full.first_k_dense_replace * mean(dense, "dense_mlp")
                + (c["lm_head"] + c["sampling"]) * vocab + c["embedding"])
    prefill_scale = decode_s / result["token_s"]
    return {"decode_tps": 1 / decode_s, "prefill_tps": result["prompt_tps"] / prefill_scale,
            "decode_s_per_token": decode_s, "layers": cfg_full.num_hidden_layers, "moe_layers": n_moe_full}
