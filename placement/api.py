"""What `hybrid plan` does, callable without a terminal: make, check or translate a plan, and save it."""

from dataclasses import replace

from hybrid.errors import PlanError
from placement.hardware import Hardware
from placement.ktransformers import translate
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
