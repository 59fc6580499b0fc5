"""What `hybrid plan` does, callable without a terminal: make, check or translate a plan, and save it."""

from dataclasses import dataclass, replace

from hybrid.errors import PlanError
from placement import presets
from placement.cluster import (ENGINE_NAMES, SGLANG_KT, Cluster, Layout, checkpoint_gib, layouts, parse_cluster,
                               smallest_fit)
from placement.hardware import Hardware
from placement.ktransformers import translate
from placement.launch import HEAD_IP, MODEL_DIR, Command, Target, commands as launch_commands, target
from placement.memory import GIB, default_expert_format, largest_chunk
from placement.plan import Architecture, Plan, Settings
from placement.plan_file import load_plan, save_plan
from placement.planner import (DEFAULT_CONTEXT, WORKSPACE_SHARE, PlanRequest, PlanResult, evaluate,
                               load_routing_counts, make_plan)
from placement.resolve import resolve_hardware, resolve_model

HW_FLAGS = ("gpu", "gpu_memory", "ram", "memory", "ram_bandwidth", "cores", "numa_nodes", "disk_bandwidth")


def plan_command(model, hardware_file, check_file, ktransformers_file, output, flags: dict):
    """-> (PlanResult, notes). Raises PlanError/ConfigError with the file and the numbers. Every flag is checked
    (PlanRequest, hardware.describe) before anything is planned."""
    name, cfg = resolve_model(model)
    counts = load_routing_counts(flags["routing_stats"]) if flags.get("routing_stats") else None
    req = PlanRequest(context_length=flags.get("context"), batch=flags.get("batch", 1),
                      expert_format=flags.get("expert_format"),
                      gpu_expert_layers=flags.get("gpu_expert_layers"), routing_counts=counts,
                      allow_disk=bool(flags.get("allow_disk")))
    hw = resolve_hardware(hardware_file, **{k: flags.get(k) for k in HW_FLAGS})
    if ktransformers_file:
        result, notes = from_ktransformers(ktransformers_file, name, cfg, hw, req, output)
        return result, list(hw.notes) + notes
    if check_file:
        plan = load_plan(check_file)
        result = evaluate(plan, cfg, hw, counts)
    else:
        result = make_plan(cfg, name, hw, req)
        plan = result.plan
    if output:
        save_plan(plan, output, _header(result, hw))
    return result, list(hw.notes) + list(result.notes)


def from_ktransformers(path, name, cfg, hw: Hardware, req: PlanRequest, output) -> tuple[PlanResult, list[str]]:
    """Their rule file translated, with the request's settings, and checked against this machine. The
    translation is written to `output` even when it does not fit, with its notes and the refusal as comments,
    so it can be edited; the refusal is then still raised, saying so."""
    req = replace(req, expert_format=req.expert_format or default_expert_format(cfg))
    t = translate(path, req.expert_format)
    ctx = req.context_length or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
    budget = int(WORKSPACE_SHARE * (hw.gpu.memory_gib if hw.gpu else hw.ram_available_gib) * GIB)
    settings = Settings(context_length=ctx, batch=req.batch, cpu_threads=hw.cores, expert_format=req.expert_format,
                        prefill_chunk=largest_chunk(cfg, ctx, budget, req.batch))
    plan = Plan(name, settings, t.rules, source=str(path), architecture=Architecture.of(cfg))
    translated = f"translated from {path} by hybrid plan --from-ktransformers"
    try:
        result = evaluate(plan, cfg, hw, req.routing_counts)
    except PlanError as e:
        if not output:
            raise PlanError(f"{e} (-o FILE writes the translation, to edit)") from None
        save_plan(plan, output, "\n".join([translated, f"refused here: {e}", *t.notes]))
        raise PlanError(f"{e} (the translation is written to {output}: edit it, then check it with "
                        f"`hybrid plan MODEL --check {output}`)") from None
    if output:
        save_plan(plan, output, "\n".join([_header(result, hw), translated, *t.notes]))
    return result, list(t.notes) + list(result.notes)


def _header(result: PlanResult, hw: Hardware) -> str:
    p = result.projection
    return (f"planned for {hw.gpu.name if hw.gpu else 'no GPU'}, {hw.ram_gib:.0f} GiB RAM, {hw.cores} cores; "
            f"projected decode {p.decode_tps:.1f} tok/s, prefill {p.prefill_tps:.1f} tok/s")


# A cluster is planned for 128K tokens unless told otherwise: the context Moonshot's deployment guide sizes K2 for.
CLUSTER_CONTEXT = 131072


@dataclass(frozen=True)
class ClusterPlan:
    """`hybrid plan MODEL --cluster ...`: every engine layout for the cluster, fitting or not, and the commands that
    start the ones that fit."""
    model: str
    cluster: Cluster
    context: int
    target: Target
    checkpoint_gib: float
    cache_kib_per_token: float
    layouts: tuple[Layout, ...]
    commands: tuple[Command, ...]
    notes: tuple[str, ...]
    suggestion: Cluster | None  # the fewest such nodes that fit, when nothing fits this cluster

    @property
    def fits(self) -> bool:
        return any(layout.fits for layout in self.layouts)

    def refusal(self) -> str:
        """One line with the numbers of the closest layout, and what would fit."""
        best = max(self.layouts, key=lambda layout: (layout.weights_gib <= layout.usable_gib, layout.cache_tokens))
        what = f"{self.model} at {self.context:,} tokens of context does not fit {self.cluster.label()}"
        line = f"{what}: closest is {ENGINE_NAMES[best.engine]} {best.name}, {best.refusal}"
        if self.suggestion is not None:
            line += (f"; {self.suggestion.label()} ({self.suggestion.gpus} GPUs) fits: "
                     f"hybrid plan {self.model} --cluster {self.suggestion.spec()}")
        return line


def cluster_command(model: str, cluster: str, context: int | None = None, served_model_name: str | None = None,
                    ram=None, cores: int | None = None, numa_nodes: int | None = None) -> ClusterPlan:
    """How vLLM and SGLang serve MODEL on CLUSTER (NODESxGPUSxTYPE or a cluster YAML), with the commands."""
    name, cfg = resolve_model(model)
    if cfg.gguf:
        raise PlanError(f"{model}: --cluster plans the safetensors checkpoint vLLM and SGLang load; a GGUF runs "
                        "here (hybrid plan without --cluster) or under llama.cpp")
    if context is not None and context < 1:
        raise PlanError(f"--context must be a whole number, 1 or more, got {context}")
    ctx = context or min(cfg.max_position_embeddings, CLUSTER_CONTEXT)
    if ctx > cfg.max_position_embeddings:
        raise PlanError(f"--context {ctx:,} is beyond {name}'s {cfg.max_position_embeddings:,} positions "
                        "(max_position_embeddings)")
    where = parse_cluster(cluster, ram, cores, numa_nodes)
    t = target(model, presets.hub_id(model), cfg, ctx, served_model_name)
    found = layouts(cfg, where, ctx)
    commands = tuple(c for layout in found if layout.fits for c in launch_commands(layout, where, t))
    notes = []
    if t.tool_parser is None:
        notes.append(f"{cfg.model_type}: no tool-call parser is set (the commands name K2's kimi_k2 only)")
    if any(HEAD_IP in a for c in commands for a in c.argv):
        notes.append("set HEAD_IP to node 0's address on every node (or give head_ip in a cluster YAML)")
    if any(MODEL_DIR in a for c in commands for a in c.argv):
        notes.append(f"set MODEL_DIR to a local download of {t.model}: kt-kernel reads the experts from a folder")
    if any(layout.engine == SGLANG_KT and layout.fits for layout in found) and where.node.cores is None:
        notes.append("give --cores (physical cores per node) to set kt-kernel's CPU threads (--kt-cpuinfer)")
    suggestion = None if any(layout.fits for layout in found) else smallest_fit(cfg, where, ctx)
    return ClusterPlan(name, where, ctx, t, checkpoint_gib(cfg), cfg.kv_cache_bytes_per_token / 1024, tuple(found),
                       commands, tuple(notes), suggestion)
