"""A plan made readable: a rich table of what goes where, totals per device, the projection and the reasons;
and the same as a JSON-ready dict for scripts. Returns renderables; the CLI prints them."""

from rich.console import Group
from rich.table import Table
from rich.text import Text

from placement.hardware import hardware_to_dict
from placement.planner import GIB, PlanResult


def _gib(n) -> str:
    return f"{n / GIB:,.2f}"


def plan_table(result: PlanResult) -> Group:
    plan, budget = result.plan, result.budget
    table = Table(title=f"placement plan for {plan.model}", show_lines=False)
    for col in ("device", "group", "GiB"):
        table.add_column(col, justify="right" if col == "GiB" else "left")
    for device in sorted(budget.by_device):
        groups = budget.by_device[device]
        for group, nbytes in sorted(groups.items(), key=lambda kv: -kv[1]):
            if nbytes:
                table.add_row(device, group.replace("_", " "), _gib(nbytes))
        cap = result.capacity.get(device)
        total = budget.total(device)
        label = f"total (of {_gib(cap)})" if cap else "total"
        table.add_row(Text(device, style="bold"), Text(label, style="bold"), Text(_gib(total), style="bold"),
                      end_section=True)
    rules = Table(title="rules (first match wins)")
    for col in ("match", "device", "format", "kernel"):
        rules.add_column(col)
    for r in plan.rules:
        rules.add_row(r.match, r.device, r.format, r.kernel)
    p = result.projection
    s = plan.settings
    summary = Text.assemble(
        ("projected: ", "bold"), f"decode {p.decode_tps:.1f} tok/s, prefill {p.prefill_tps:.1f} tok/s ",
        f"(context {s.context_length}, batch {s.batch}, prefill chunk {s.prefill_chunk}; bound by {p.bound})\n",
        *((("prefill of one prompt: ", "bold"), ", ".join(f"{n // 1024}K tokens {tps:.1f} tok/s"
                                                         for n, tps in p.prompt_prefill_tps.items()), "\n")
          if p.prompt_prefill_tps else ()),
        ("decode ms/token: ", "bold"), ", ".join(f"{k} {v:.2f}" for k, v in p.decode_ms.items()), "\n",
        ("why:\n", "bold"), "\n".join(f"  - {r}" for r in result.reasons))
    return Group(table, rules, summary)


def plan_dict(result: PlanResult) -> dict:
    p = result.projection
    return {
        "model": result.plan.model,
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(result.plan.settings).items()}
                    | {"cache_device": result.plan.cache_device},
        "devices": {d: {g: b for g, b in groups.items()} | {"total": result.budget.total(d),
                                                            "capacity": result.capacity.get(d)}
                    for d, groups in result.budget.by_device.items()},
        "rules": [{"match": r.match, "device": r.device, "format": r.format, "kernel": r.kernel}
                  for r in result.plan.rules],
        "projection": {"decode_tokens_per_s": p.decode_tps, "prefill_tokens_per_s": p.prefill_tps,
                       "decode_ms": p.decode_ms, "prefill_ms": p.prefill_ms, "bound": p.bound,
                       "prompt_prefill_tokens_per_s": {str(n): tps for n, tps in p.prompt_prefill_tps.items()}},
        "hardware": hardware_to_dict(result.hardware),
        "reasons": list(result.reasons),
    }


def cluster_table(plan) -> Group:
    """A ClusterPlan's layouts: one row per engine layout (per-GPU weights, what the engine leaves them and the
    cache, cache tokens, sequences of the context the cluster holds at once), then why each refused one is."""
    from placement.cluster import ENGINE_NAMES

    c = plan.cluster
    table = Table(title=f"{plan.model} on {c.label()} ({c.node.gpu.memory_gib:g} GiB each), context "
                        f"{plan.context:,}: checkpoint {plan.checkpoint_gib:,.1f} GiB, cache "
                        f"{plan.cache_kib_per_token:.1f} KiB/token")
    for col in ("engine", "layout", "weights GiB/GPU", "usable GiB/GPU", "cache tokens/GPU", "sequences", "fits"):
        table.add_column(col, justify="left" if col in ("engine", "layout", "fits") else "right")
    for layout in plan.layouts:
        verdict = Text("yes", style="green") if layout.fits else Text("no", style="red")
        table.add_row(ENGINE_NAMES[layout.engine], layout.name, f"{layout.weights_gib:,.1f}",
                      f"{layout.usable_gib:,.1f}", f"{layout.cache_tokens:,}", str(layout.sequences), verdict)
    why = [Text.assemble((f"{ENGINE_NAMES[layout.engine]} {layout.name}: ", "bold"), layout.refusal)
           for layout in plan.layouts if not layout.fits]
    why += [Text.assemble((f"{ENGINE_NAMES[layout.engine]} {layout.name}: ", "bold"),
                          f"{layout.gpu_experts} of each MoE layer's experts on the GPUs, all {layout.ram_gib:,.1f} "
                          f"GiB of routed experts in RAM for the CPU (kt-method {layout.kt_method})")
            for layout in plan.layouts if layout.kt_method and layout.fits]
    return Group(table, *why)


def cluster_commands(plan) -> str:
    """Each fitting layout's commands, node by node, as plain lines to paste (no wrapping, no colour), then what a
    client points at."""
    from placement.cluster import ENGINE_NAMES
    from placement.launch import ENGINE_VERSIONS, PORT, ROUTES

    lines = []
    for layout in (layout for layout in plan.layouts if layout.fits):
        lines.append(f"\n# {ENGINE_NAMES[layout.engine]} {ENGINE_VERSIONS[layout.engine]}, {layout.name}")
        for cmd in plan.commands:
            if cmd.layout == layout.name and _same_engine(cmd, layout.engine):
                lines += ([] if cmd.node is None else [f"# node {cmd.node}"]) + [cmd.shell]
    if lines:
        c = plan.cluster
        host = c.head_ip or ("HEAD_IP" if c.nodes > 1 else "localhost")
        lines.append(f"\n# clients: base URL http://{host}:{PORT}/v1, model \"{plan.target.served_name}\"; "
                     f"routes {', '.join(ROUTES)}, as hybrid serve")
    return "\n".join(lines)


def _same_engine(cmd, engine: str) -> bool:
    # Ray's start commands belong to vLLM's multi-node tensor parallel layout.
    return cmd.engine == engine or (cmd.engine == "ray" and engine == "vllm")


def cluster_dict(plan) -> dict:
    from placement.launch import ENGINE_VERSIONS, ROUTES

    c = plan.cluster
    return {
        "model": plan.model, "served_model_name": plan.target.served_name, "engine_model": plan.target.model,
        "context": plan.context, "fits": plan.fits,
        "cluster": {"nodes": c.nodes, "gpus_per_node": c.node.gpus, "gpu": c.node.gpu.name,
                    "gpu_memory_gib": c.node.gpu.memory_gib, "ram_gib": c.node.ram_gib, "cores": c.node.cores,
                    "numa_nodes": c.node.numa_nodes, "head_ip": c.head_ip},
        "checkpoint_gib": plan.checkpoint_gib, "cache_kib_per_token": plan.cache_kib_per_token,
        "layouts": [vars(layout) | {"fits": layout.fits, "cluster_tokens": layout.cluster_tokens,
                                    "engine_version": ENGINE_VERSIONS[layout.engine]} for layout in plan.layouts],
        "commands": [{"engine": cmd.engine, "layout": cmd.layout, "node": cmd.node, "argv": list(cmd.argv),
                      "shell": cmd.shell} for cmd in plan.commands],
        "routes": list(ROUTES),
        "refusal": None if plan.fits else plan.refusal(),
        "suggestion": plan.suggestion.spec() if plan.suggestion else None,
        "notes": list(plan.notes),
    }
