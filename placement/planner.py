"""The planner: from a config and a Hardware to a Plan, its memory budget, a projection and its reasons.

Default policy: embeddings, MLA attention, norms, routers, shared experts, dense layers and lm_head on the GPU
in bf16; routed experts in RAM for the CPU kernels; then, while GPU memory is left after cache and workspace,
routed experts move to the GPU: the most-used (layer, expert) pairs when routing counts are given, else whole
layers. No GPU: everything on the CPU, the weight matrices on the CPU kernels too (cpu_linear: int8 quantized at
load, a GGUF's in their blocks), norms, routers and the attention over the cache in CPU torch. A plan that does not fit is refused here, before anything loads, with
the numbers and the options that would fit, each with its projected speed.
"""

import json
from dataclasses import dataclass, replace
from pathlib import Path

from cpu_kernels.formats import WRITABLE_NAMES, parse_format
from hybrid.errors import HybridError, PlanError
from hybrid.read.config import ModelConfig, load_config
from placement import memory, presets
from placement.hardware import Hardware, device_here
from placement.plan import Architecture, Budget, Plan, Rule, Settings, check_model, cpu_threads, place_all
from placement.projection import NUMA_UNSPLIT_FACTOR, Projection, Traffic, gpu_prefill_threshold, project

GIB = memory.GIB
EXPERTS_RE = r"\.mlp\.experts\."
EMBED_RE = r"^model\.embed_tokens\."
# The block-FP8 projections outside the routed experts: attention, shared experts, dense MLPs.
FP8_RE = (r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
          r"|mlp\.shared_experts\.\w+|mlp\.(gate|up|down)_proj)\.weight$")
# The weight matrices the CPU kernels compute (cpu_linear) when no GPU takes them: the projections above and the head.
CPU_LINEAR_RE = r"^lm_head\.|" + FP8_RE
DEFAULT_CPU_LINEAR_FORMAT = "int8"  # 1.03 bytes per weight against bf16's 2, within 1 % of it per matvec
TORCH = "torch"  # PlanRequest.linear_format that keeps CPU weight matrices in CPU torch bf16 instead
# A GGUF checkpoint's weight matrices the CPU kernels compute from their blocks (cpu_linear) when no GPU takes them.
GGUF_BLOCKS_RE = (r"^model\.embed_tokens\.|^lm_head\.|\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|o_proj)"
                  r"|mlp\.shared_experts\.\w+|mlp\.(gate|up|down)_proj)\.weight$")
# What a GGUF plan keeps on the CPU in its blocks when the rest in bf16 would not fit the GPU: the head, the
# shared experts and the dense layer (K2: 4.2 B parameters, 8.4 GB in bf16, ~2.5 GB as a 4-5 bit quant).
GGUF_CPU_PART_RE = r"^lm_head\.|\.mlp\.shared_experts\.\w+\.weight$|\.mlp\.(gate|up|down)_proj\.weight$"
GPU_EXPERT_FORMAT = "bf16"
# The GGUF block kernels decode with float32 activations and are bound by arithmetic, not RAM: 5-9 G weights/s
# per core across the types (AMD EPYC Zen 3, AVX2, 2.45 GHz; docs/performance.md). 6e9 is their middle.
GGUF_WEIGHTS_PER_CORE_S = 6e9
WORKSPACE_SHARE = 0.08  # of GPU memory the prefill workspace may take (it sets the prefill chunk)
MAX_STREAM_CHUNK = 8192  # a GPU prefill plan's chunk grows up to this (the copy is then a small share of a chunk)
MIN_RAM_EXPERT_SHARE = 0.05  # disk-backed experts need at least this share of them resident to be usable
DEFAULT_CONTEXT = 32768


@dataclass(frozen=True)
class PlanRequest:
    """What `hybrid plan`'s flags ask for, checked once here: a bad value is one PlanError naming its flag."""

    context_length: int | None = None  # --context; None: the model's, at most DEFAULT_CONTEXT
    batch: int = 1  # --batch
    expert_format: str | None = None  # --experts; None: memory.default_expert_format (int4, gguf, int4-g32)
    gpu_expert_layers: int | None = None  # --gpu-expert-layers; None: as many as fit; 0: none
    routing_counts: dict | None = None  # {layer: [count per expert]}
    allow_disk: bool = False
    cpu_threads: int | None = None  # None: one per physical core
    # How a plan without a GPU keeps its weight matrices: a store format for cpu_linear (bf16, int8, int4, -gG),
    # gguf (a GGUF's blocks), or torch (CPU torch bf16); None: int8, gguf for a GGUF checkpoint
    linear_format: str | None = None

    def __post_init__(self):
        for flag, value, least, optional in (("--context", self.context_length, 1, True),
                                             ("--batch", self.batch, 1, False),
                                             ("--gpu-expert-layers", self.gpu_expert_layers, 0, True),
                                             ("cpu_threads", self.cpu_threads, 1, True)):
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PlanError(f"{flag} must be a whole number, {least} or more, got {value!r}")
        if not _store_format(self.expert_format):
            raise PlanError(f"--experts {self.expert_format}: not one of {', '.join(WRITABLE_NAMES)} (with -g32, "
                            f"-g64 or -g128) or {memory.GGUF} (a GGUF checkpoint's experts as stored)")
        if self.linear_format != TORCH and not _store_format(self.linear_format):
            raise PlanError(f"--linears {self.linear_format}: not one of {', '.join(WRITABLE_NAMES)} (with -g32, "
                            f"-g64 or -g128), {memory.GGUF} (a GGUF checkpoint's matrices as stored) or {TORCH}")


def _store_format(name: str | None) -> bool:
    """None, gguf, or a format hybrid writes (GGUF types are a file's, not a choice: gguf keeps them)."""
    if name in (None, memory.GGUF):
        return True
    try:
        return parse_format(name).spec.quantize is not None
    except ValueError:
        return False


@dataclass(frozen=True)
class PlanResult:
    plan: Plan
    budget: Budget
    projection: Projection
    traffic: Traffic
    hardware: Hardware
    capacity: dict  # device -> bytes available
    reasons: tuple[str, ...]
    notes: tuple[str, ...] = ()  # what checking a given plan found that does not stop it (evaluate)


def load_routing_counts(path) -> dict[int, list[int]]:
    """Routing statistics JSON (written by `hybrid profile --routing-stats`): {"counts": {"3": [n, ...], ...}}."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())["counts"]
        return {int(layer): [int(c) for c in counts] for layer, counts in raw.items()}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise PlanError(f"{path}: not a routing-statistics file with 'counts' per layer ({e})") from None


def make_plan(cfg: ModelConfig, model: str, hw: Hardware, req: PlanRequest = PlanRequest()) -> PlanResult:
    req = replace(req, expert_format=req.expert_format or memory.default_expert_format(cfg))
    memory.check_expert_format(cfg, req.expert_format, "the plan", model)
    ctx = req.context_length or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
    if ctx > cfg.max_position_embeddings:
        raise PlanError(f"context {ctx} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings})")
    main = hw.gpu_device or "cpu"  # one GPU today: the first; attention, cache and GPU weights on it
    settings = Settings(context_length=ctx, batch=req.batch, cache_device=main,
                        cpu_threads=req.cpu_threads or hw.cores, expert_format=req.expert_format)
    reasons = [f"routed experts ({_gib(memory.expert_bytes(cfg, req.expert_format) * cfg.n_routed_experts * _n_moe(cfg))}"
               f" GiB in {req.expert_format}) in RAM for the CPU kernels: {hw.cores} threads"]
    if hw.gpu is None:
        settings = replace(settings, prefill_chunk=512)
        linears = _linear_format(cfg, model, req)
        plan = _base_plan(model, settings, "cpu", req.expert_format, "bf16", cfg, linears)
        reasons.append("no GPU: attention, shared experts and head run on CPU torch in bf16" if linears == TORCH else
                       "no GPU: attention, shared experts, dense layer and head run on the CPU kernels in their GGUF "
                       "blocks" if linears == memory.GGUF else
                       f"no GPU: attention (MLA's absorbed products too), shared experts, dense layer and head run on "
                       f"the CPU kernels in {linears}, quantized at load; norms, routers and attention over the cache "
                       f"in CPU torch")
        capacity = {}
    else:
        cap = int(hw.gpu.memory_gib * GIB)
        plan, need, weight_format, prefill_why = _gpu_base(cfg, model, settings, cap, hw)
        if need > cap:
            raise PlanError(_gpu_refusal(cfg, model, hw, req, plan, cap))
        chunk = plan.settings.prefill_chunk
        plan, share, why = _gpu_experts(cfg, plan, cap - need, req)
        reasons.append(f"attention, routers, shared experts, dense layers and head on {main} "
                       + ("in bf16" if weight_format == "bf16" else
                          "keeping the checkpoint's block-FP8 projections (bf16 would not fit), head in bf16"
                          if weight_format == "fp8" else
                          "in bf16, except the head, shared experts and dense layer: on the CPU kernels in their "
                          "GGUF blocks (all in bf16 would not fit)")
                       + "; embedding lookups on the CPU (one row per token)")
        reasons.append(f"prefill chunk {chunk}: the attention workspace stays under {WORKSPACE_SHARE:.0%} of the GPU")
        reasons.append(prefill_why)
        reasons.append(why)
        capacity = {main: cap}
    budget = place_all(plan, cfg)
    plan, hit_rate, ram_reason = _fit_ram(cfg, model, hw, req, plan, budget)
    reasons.append(ram_reason)
    capacity["cpu"] = int(hw.ram_available_gib * GIB)
    if hw.numa_nodes > 1:
        reasons.append(f"{hw.numa_nodes} NUMA nodes: the CPU kernels do not split experts across nodes, so remote "
                       f"reads cost (projected at {NUMA_UNSPLIT_FACTOR:.0%} of the RAM bandwidth)")
    share = _gpu_share(cfg, plan, req.routing_counts) if hw.gpu is not None else 0.0
    traffic = traffic_of(cfg, plan, budget, share, hit_rate)
    proj = project(cfg, hw, traffic, ctx, req.batch, plan.settings.prefill_chunk)
    if traffic.kernel_weights_per_core_s:
        reasons.append(f"the GGUF block kernels decode ~{traffic.kernel_weights_per_core_s / 1e9:.0f} G weights/s "
                       f"per core (float32 activations): projected at {hw.cores} cores as the slower of that and RAM")
    reasons.append(f"decode is bound by {proj.bound}")
    plan = replace(plan, architecture=Architecture.of(cfg))  # what a plan file records, to match checkpoints by
    return PlanResult(plan, budget, proj, traffic, hw, capacity, tuple(reasons))


def evaluate(plan: Plan, cfg: ModelConfig, hw: Hardware, routing_counts=None) -> PlanResult:
    """Check a given plan (a file a user edited, a translated one) against a model and a machine, as the runtime
    will run it there: written for this model, every tensor placed, every device within its memory; and
    project its speed. What does not stop it (a GPU this machine lacks, more threads than cores) comes back
    in PlanResult.notes."""
    planned_for, notes = planned_architecture(plan)
    check_model(plan, cfg, planned_for)
    plan, here = runs_here(plan, hw)
    notes += here
    budget = place_all(plan, cfg)
    capacity = {"cpu": int(hw.ram_available_gib * GIB)}
    if hw.gpu is not None:
        capacity[hw.gpu_device] = int(hw.gpu.memory_gib * GIB)
    for device in budget.by_device:
        if device not in capacity:  # a GPU this machine has, but not the one planned for: one GPU runs today
            raise PlanError(f"{plan.source}: places tensors on {device}, but plans use one GPU ({hw.gpu_device}) "
                            f"today")
        need = budget.total(device)
        backed = plan.settings.expert_backing == "disk" and device == "cpu"
        if need > capacity[device] and not backed:
            parts = ", ".join(f"{g.replace('_', ' ')} {_gib(v)}" for g, v in
                              sorted(budget.by_device[device].items(), key=lambda kv: -kv[1]) if v >= 0.05 * GIB)
            raise PlanError(f"{plan.source}: needs {_gib(need)} GiB on {device} ({parts}), has {_gib(capacity[device])}")
    hit = 1.0
    if plan.settings.expert_backing == "disk":
        experts = budget.expert_device_bytes.get("cpu", 0)
        resident = capacity["cpu"] - (budget.total("cpu") - experts)
        hit = ram_hit_rate(cfg, max(resident, 0) / max(experts, 1), routing_counts)
    share = _gpu_share(cfg, plan, routing_counts)
    traffic = traffic_of(cfg, plan, budget, share, hit)
    s = plan.settings
    proj = project(cfg, hw, traffic, s.context_length, s.batch, s.prefill_chunk)
    reasons = (f"checked {plan.source}", f"decode is bound by {proj.bound}")
    return PlanResult(plan, budget, proj, traffic, hw, capacity, reasons, tuple(notes))


def planned_architecture(plan: Plan) -> tuple[Architecture | None, list[str]]:
    """The architecture a plan was written for: its own record, else (files written before plans recorded it)
    the preset or checkpoint folder its `model:` names, when that is here; else None, with a note saying the
    model was not compared."""
    if plan.architecture is not None:
        return plan.architecture, []
    folder = Path(plan.model) / "config.json"
    try:
        cfg = load_config(folder) if folder.is_file() else presets.load(plan.model)
    except HybridError:  # a config that no longer reads: nothing to compare with
        cfg = None
    if cfg is not None:
        return Architecture.of(cfg), []
    return None, [f"{plan.source}: names no architecture (written before plan files recorded it) and its model "
                  f"{plan.model!r} is no preset or folder here, so it was not compared with this checkpoint; "
                  f"`hybrid plan CHECKPOINT -o FILE` writes a plan that records it"]


def runs_here(plan: Plan, hw: Hardware) -> tuple[Plan, list[str]]:
    """The plan as `hw` runs it, and what differs, one line each. A device on a GPU the machine lacks runs on
    the CPU (hardware.device_here: the loader applies the same rule), so the plan is checked and projected
    that way; more expert-kernel threads than cores share the cores (slower, not wrong: plan files are shared
    between machines, so this is a note, not a refusal)."""
    notes = []
    n_gpus = len(hw.gpus)
    lacking = sorted({r.device for r in plan.rules if device_here(r.device, n_gpus) != r.device})
    if lacking:
        rules = tuple(replace(r, device=device_here(r.device, n_gpus)) for r in plan.rules)
        cache = plan.settings.cache_device and device_here(plan.settings.cache_device, n_gpus)
        plan = replace(plan, rules=rules, settings=replace(plan.settings, cache_device=cache))
        has = f"{n_gpus} GPU{'s' if n_gpus != 1 else ''}" if n_gpus else "no GPU"
        notes.append(f"{plan.source}: places tensors on {', '.join(lacking)}, but this machine has {has}: those "
                     f"parts run on the CPU here (checked and projected that way)")
    threads = cpu_threads(plan)
    if threads > hw.cores:
        notes.append(f"{plan.source}: {threads} CPU expert threads on {hw.cores} cores: they will share cores and "
                     f"run slower; set cpu_threads (and any threads option) to {hw.cores} for this machine")
    return plan, notes


def _n_moe(cfg):
    return cfg.num_hidden_layers - cfg.first_k_dense_replace


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _gpu_base(cfg, model, settings: Settings, cap: int, hw: Hardware):
    """The GPU-side base plan at this context, on settings.cache_device: prefill chunk sized to the workspace
    share, GPU prefill when it pays (_gpu_prefill), bf16 weights if they fit, else the checkpoint's block-FP8.
    -> (plan, bytes needed there, weight format, GPU prefill's reason)."""
    chunk = memory.largest_chunk(cfg, settings.context_length, int(WORKSPACE_SHARE * cap), settings.batch)
    settings, why = _gpu_prefill(cfg, hw, replace(settings, prefill_chunk=chunk), cap)
    fallbacks = ("bf16", "fp8") if cfg.fp8_block else ("bf16", memory.GGUF) if cfg.gguf else ("bf16",)
    options = [(settings, why)]
    if settings.gpu_prefill_tokens:  # without GPU prefill, when its staging is what does not fit
        options.append((replace(settings, gpu_prefill_tokens=0, prefill_chunk=chunk),
                        "GPU prefill off: its staging memory would not fit beside the rest"))
    for candidate, why in options:
        for weight_format in fallbacks:
            plan = _base_plan(model, candidate, candidate.cache_device, candidate.expert_format, weight_format, cfg)
            need = place_all(plan, cfg).total(candidate.cache_device)
            if need <= cap:
                return plan, need, weight_format, why
    return plan, need, weight_format, why


def _gpu_prefill(cfg, hw: Hardware, settings: Settings, cap: int) -> tuple[Settings, str]:
    """GPU prefill (hybrid/run/expert_streaming.py) from the chunk size where streaming a layer's experts over PCIe
    beats the CPU computing them, when the workspace share allows a chunk that large; the prefill chunk then grows
    to the largest the share allows (a power of two, up to MAX_STREAM_CHUNK). -> (settings, the reason in one
    line)."""
    if settings.expert_format == memory.GGUF:
        return settings, "GPU prefill off: a GGUF's expert blocks are computed on the CPU only"
    probe = Traffic(0, 0, 0, memory.expert_bytes(cfg, settings.expert_format), 0.0)
    tokens = gpu_prefill_threshold(cfg, hw, probe)
    chunk = settings.prefill_chunk
    # The copy is paid once per chunk, so a streaming plan takes the largest chunk the workspace share allows.
    while chunk < MAX_STREAM_CHUNK and memory.workspace_bytes(
            cfg, settings.context_length, 2 * chunk, settings.batch) <= WORKSPACE_SHARE * cap:
        chunk *= 2
    how = (f"streaming a MoE layer's experts ({_gib(cfg.n_routed_experts * probe.expert_bytes)} GiB) at "
           f"{hw.gpu.pcie_gbps:g} GB/s beats {hw.cpu_flops / 1e9:.0f} CPU GFLOP/s from {tokens}-token chunks")
    if chunk < tokens:
        return settings, f"GPU prefill off: {how}, and the workspace allows {chunk}"
    return (replace(settings, gpu_prefill_tokens=tokens, prefill_chunk=chunk),
            f"GPU prefill: {how}; prefill chunk {chunk}, {_gib(2 * memory.STAGING_SLOT_BYTES)} GiB of staging reserved")


def _linear_format(cfg, model, req: PlanRequest) -> str:
    """How a plan without a GPU keeps its weight matrices: the request's, else gguf (a GGUF checkpoint's blocks) or
    int8 quantized at load."""
    fmt = req.linear_format or (memory.GGUF if cfg.gguf else DEFAULT_CPU_LINEAR_FORMAT)
    if fmt not in (TORCH, memory.GGUF) and cfg.gguf:
        raise PlanError(f"--linears {fmt}: {model} is a GGUF checkpoint, whose matrices run as stored "
                        f"({memory.GGUF}) or in CPU {TORCH}")
    if fmt == memory.GGUF and not cfg.gguf:
        raise PlanError(f"--linears {fmt}: keeps a GGUF checkpoint's matrices as stored; {model} is not one")
    return fmt


def _base_plan(model, settings, main_device, expert_format, weight_format, cfg, linears=TORCH) -> Plan:
    """The rules before any expert goes to the GPU. `linears`: how a plan without a GPU keeps its weight matrices
    (_linear_format)."""
    threads = {"threads": settings.cpu_threads}
    rules = [Rule(EXPERTS_RE, "cpu", expert_format, "cpu_moe", threads)]
    if cfg.gguf:
        # Kept in their blocks on the CPU, never expanded: the embedding (one row per token) everywhere, and with no
        # GPU every weight matrix the CPU kernels read (kv_b_proj is rebuilt from attn_k_b/attn_v_b, so torch).
        blocks = GGUF_BLOCKS_RE if main_device == "cpu" and linears == memory.GGUF else EMBED_RE
        rules.append(Rule(blocks, "cpu", memory.GGUF, "cpu_linear", threads))
    elif main_device != "cpu":
        rules.append(Rule(EMBED_RE, "cpu", "bf16", "torch"))
    elif linears != TORCH:
        rules.append(Rule(CPU_LINEAR_RE, "cpu", linears, "cpu_linear", threads))
    if weight_format == "fp8":
        rules.append(Rule(FP8_RE, main_device, "fp8", "torch"))
    if weight_format == memory.GGUF:  # bf16 would not fit: the parts read once per token stay in their blocks
        rules.append(Rule(GGUF_CPU_PART_RE, "cpu", memory.GGUF, "cpu_linear", threads))
    rules.append(Rule(".*", main_device, "bf16", "torch"))
    return Plan(model=model, settings=settings, rules=tuple(rules))


def _gpu_experts(cfg, plan: Plan, spare: int, req: PlanRequest):
    """Fill spare GPU memory with routed experts: hottest pairs given routing counts, else whole layers."""
    one = memory.expert_bytes(cfg, GPU_EXPERT_FORMAT)
    gpu = plan.cache_device
    if req.gpu_expert_layers == 0 or spare < one:
        return plan, 0.0, f"no routed experts on the GPU ({_gib(spare)} GiB spare after cache and workspace)"
    if req.routing_counts:
        pairs = sorted(((c, layer, e) for layer, counts in req.routing_counts.items() for e, c in enumerate(counts)),
                       reverse=True)[: spare // one]
        by_layer = {}
        for _, layer, e in pairs:
            by_layer.setdefault(layer, []).append(e)
        rules = tuple(Rule(rf"^model\.layers\.{layer}\.mlp\.experts\.({'|'.join(map(str, sorted(es)))})\.",
                           gpu, GPU_EXPERT_FORMAT, "torch") for layer, es in sorted(by_layer.items()))
        plan = replace(plan, rules=rules + plan.rules)
        return plan, 0.0, (f"{len(pairs)} most-used experts from the routing counts on {gpu} "
                           f"({_gib(len(pairs) * one)} GiB of {_gib(spare)} spare)")
    per_layer = one * cfg.n_routed_experts
    n = min(spare // per_layer, _n_moe(cfg), req.gpu_expert_layers if req.gpu_expert_layers else 10**9)
    if n == 0:
        return plan, 0.0, (f"no whole expert layer fits the {_gib(spare)} GiB spare on the GPU "
                           f"(one takes {_gib(per_layer)} GiB in bf16)")
    layers = tuple(range(cfg.first_k_dense_replace, cfg.first_k_dense_replace + n))
    rule = Rule(rf"^model\.layers\.({'|'.join(map(str, layers))})\.mlp\.experts\.", gpu, GPU_EXPERT_FORMAT, "torch")
    plan = replace(plan, rules=(rule,) + plan.rules, settings=replace(plan.settings, gpu_expert_layers=layers))
    return plan, 0.0, f"routed experts of {n} layer(s) {list(layers)} on {gpu} ({_gib(n * per_layer)} GiB of {_gib(spare)} spare)"


def _gpu_share(cfg, plan: Plan, routing_counts) -> float:
    """Share of routed-expert traffic served on the GPU: by routing counts when known, else uniform."""
    gpu = plan.gpu_device
    if gpu is None:
        return 0.0
    total = hit = 0.0
    for layer in cfg.moe_layers:
        counts = (routing_counts or {}).get(layer) or [1] * cfg.n_routed_experts
        for e, c in enumerate(counts):
            total += c
            rule = plan.rule_for(f"model.layers.{layer}.mlp.experts.{e}.up_proj.weight")
            if rule is not None and rule.device == gpu:
                hit += c
    return hit / total if total else 0.0


def _fit_ram(cfg, model, hw: Hardware, req: PlanRequest, plan: Plan, budget: Budget):
    avail = int(hw.ram_available_gib * GIB)
    need = budget.total("cpu")
    experts = budget.expert_device_bytes.get("cpu", 0)
    if need <= avail:
        return plan, 1.0, f"RAM: {_gib(need)} of {_gib(avail)} GiB available"
    resident = avail - (need - experts)
    if req.allow_disk and resident >= MIN_RAM_EXPERT_SHARE * experts:
        hit = ram_hit_rate(cfg, resident / experts, req.routing_counts)
        plan = replace(plan, settings=replace(plan.settings, expert_backing="disk"))
        return plan, hit, (f"RAM holds {resident / experts:.0%} of the routed experts; the rest stay memory-mapped "
                           f"on disk ({hw.disk_read_gbps} GB/s), expected page-cache hit rate {hit:.0%}")
    raise PlanError(_ram_refusal(cfg, model, hw, req, need, avail, experts))


def ram_hit_rate(cfg, resident_share: float, counts) -> float:
    """Share of expert reads the page cache serves when it holds `resident_share` of the expert bytes: the hot
    set by routing counts when known, else uniform."""
    if not counts:
        return min(resident_share, 1.0)
    flat = sorted((c for layer in cfg.moe_layers for c in counts.get(layer, [1] * cfg.n_routed_experts)), reverse=True)
    keep = int(resident_share * len(flat))
    return sum(flat[:keep]) / max(sum(flat), 1)


def traffic_of(cfg, plan: Plan, budget: Budget, gpu_share: float, hit_rate: float) -> Traffic:
    gpu = plan.gpu_device
    counts = memory.param_counts(cfg)
    dense_active = counts["attention"] + counts["shared_experts"] + counts["dense_mlp"] + counts["lm_head"]
    # non-expert weights on the CPU: all of them without a GPU; with one, a GGUF's head and shared experts kept in
    # their blocks. Of them, what the CPU kernels compute (cpu_linear) streams at their rate, not torch's.
    cpu_dev = budget.by_device.get("cpu", {})
    on_cpu = sum(v for g, v in cpu_dev.items() if g not in ("routed_experts", "kv_cache", "workspace", "embed",
                                                            "staging"))
    expert_bytes = memory.expert_bytes(cfg, plan.settings.expert_format)
    linears = {"cpu_linear_bytes": budget.linear_bytes, "cpu_linear_block_weights": budget.linear_block_weights}
    if gpu is None:
        return Traffic(0, 0, on_cpu, expert_bytes, 0.0, hit_rate, 0, dense_active, kernel_rate(plan), **linears)
    dev = budget.by_device.get(gpu, {})
    weights = sum(v for g, v in dev.items() if g not in ("routed_experts", "kv_cache", "workspace", "cuda_context",
                                                         "embed", "staging"))
    return Traffic(weights, dev.get("shared_experts", 0), on_cpu, expert_bytes, gpu_share, hit_rate, dense_active, 0,
                   kernel_rate(plan), **linears, gpu_prefill_tokens=plan.settings.gpu_prefill_tokens)


def kernel_rate(plan: Plan) -> float:
    """Weights per second per core the plan's CPU expert kernels decode when that, not RAM, bounds them."""
    return GGUF_WEIGHTS_PER_CORE_S if plan.settings.expert_format == memory.GGUF else 0.0


def _try(cfg, model, hw, req) -> PlanResult | None:
    try:
        return make_plan(cfg, model, hw, req)
    except PlanError:
        return None


def _gpu_refusal(cfg, model, hw, req, plan: Plan, cap: int) -> str:
    gpu = plan.cache_device
    dev = place_all(plan, cfg).by_device[gpu]
    ctx = plan.settings.context_length
    parts = ", ".join(f"{g.replace('_', ' ')} {_gib(v)}" + (f" at {ctx} tokens" if g == "kv_cache" else "")
                      for g, v in sorted(dev.items(), key=lambda kv: -kv[1]) if v >= 0.05 * GIB)
    msg = f"needs {_gib(sum(dev.values()))} GiB on {gpu} ({parts}), has {_gib(cap)}"
    options = []
    lo, hi = 0, ctx
    while hi - lo > 1024:  # the longest context that fits, to 1K tokens
        mid = (lo + hi) // 2
        fits = _gpu_base(cfg, model, replace(plan.settings, context_length=mid), cap, hw)[1] <= cap
        lo, hi = (mid, hi) if fits else (lo, mid)
    fit = _try(cfg, model, hw, replace(req, context_length=lo)) if lo >= 1024 else None
    if fit is not None:
        options.append(f"--context {lo} ({fit.projection.decode_tps:.1f} tok/s decode)")
    options.append("a GPU with more memory")
    return msg + "; would fit: " + "; ".join(options)


def _ram_refusal(cfg, model, hw, req, need, avail, experts) -> str:
    msg = (f"needs {_gib(need)} GiB of RAM (routed experts {_gib(experts)} in {req.expert_format}, other "
           f"{_gib(need - experts)}), has {_gib(avail)} available: short by {_gib(need - avail)} GiB")
    options = []
    for fmt in () if cfg.gguf else ("int4-g128", "int4-g64"):  # a GGUF runs as stored: a smaller quant is a download
        if memory.expert_bytes(cfg, fmt) < memory.expert_bytes(cfg, req.expert_format):
            fit = _try(cfg, model, hw, replace(req, expert_format=fmt))
            if fit is not None:
                options.append(f"--experts {fmt} ({fit.projection.decode_tps:.1f} tok/s decode)")
    if not req.allow_disk:
        fit = _try(cfg, model, hw, replace(req, allow_disk=True))
        if fit is not None:
            options.append(f"--allow-disk: experts beyond RAM memory-mapped from disk "
                           f"({fit.projection.decode_tps:.2f} tok/s decode at {hw.disk_read_gbps} GB/s)")
    return msg + ("; options: " + "; ".join(options) if options else "; no format or disk backing makes it fit")
