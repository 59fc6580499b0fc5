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
