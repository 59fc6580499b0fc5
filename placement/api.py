"""What `hybrid plan` does, callable without a terminal: make, check or translate a plan, and save it."""

from placement.ktransformers import translate
from placement.memory import GIB, largest_chunk
from placement.plan import Plan, Settings
from placement.plan_file import load_plan, save_plan
from placement.planner import (DEFAULT_CONTEXT, WORKSPACE_SHARE, PlanRequest, evaluate, load_routing_counts,
                               make_plan)
from placement.resolve import resolve_hardware, resolve_model

HW_FLAGS = ("gpu", "gpu_memory", "ram", "memory", "ram_bandwidth", "cores", "numa_nodes", "disk_bandwidth")


def plan_command(model, hardware_file, check_file, ktransformers_file, output, flags: dict):
    """-> (PlanResult, notes). Raises PlanError/ConfigError with the file and the numbers."""
    name, cfg = resolve_model(model)
    hw = resolve_hardware(hardware_file, **{k: flags.get(k) for k in HW_FLAGS})
    counts = load_routing_counts(flags["routing_stats"]) if flags.get("routing_stats") else None
    notes = list(hw.notes)
    if check_file:
        result = evaluate(load_plan(check_file), cfg, hw, counts)
    elif ktransformers_file:
        t = translate(ktransformers_file, flags.get("expert_format") or "int4")
        ctx = flags.get("context") or min(cfg.max_position_embeddings, DEFAULT_CONTEXT)
        budget = int(WORKSPACE_SHARE * (hw.gpu.memory_gib if hw.gpu else hw.ram_available_gib) * GIB)
        settings = Settings(context_length=ctx, batch=flags.get("batch") or 1, cpu_threads=hw.cores,
                            expert_format=flags.get("expert_format") or "int4",
                            prefill_chunk=largest_chunk(cfg, ctx, budget, flags.get("batch") or 1))
        result = evaluate(Plan(name, settings, t.rules, source=str(ktransformers_file)), cfg, hw, counts)
        notes += t.notes
    else:
        req = PlanRequest(context_length=flags.get("context"), batch=flags.get("batch") or 1,
                          expert_format=flags.get("expert_format") or "int4",
                          gpu_expert_layers=flags.get("gpu_expert_layers"), routing_counts=counts,
                          allow_disk=bool(flags.get("allow_disk")))
        result = make_plan(cfg, name, hw, req)
    if output:
        p = result.projection
        header = (f"planned for {hw.gpu.name if hw.gpu else 'no GPU'}, {hw.ram_gib:.0f} GiB RAM, {hw.cores} cores; "
                  f"projected decode {p.decode_tps:.1f} tok/s, prefill {p.prefill_tps:.1f} tok/s")
        save_plan(result.plan, output, header)
    return result, notes
