"""The placement plan file: YAML that people edit and share.

    # hybrid placement plan
    model: kimi-k2-instruct-0905        # preset name or checkpoint folder it was planned for
    settings:
      context_length: 131072            # tokens of MLA cache reserved per sequence
      batch: 1                          # sequences decoded together
      cpu_threads: 32                   # CPU expert kernel threads (default: physical cores)
      expert_format: int4               # CPU expert store format: bf16, int8, int4 (+ -g32/-g64/-g128)
      gpu_expert_layers: [3, 4]         # MoE layers whose routed experts live on the GPU
      prefill_chunk: 64                 # prompt tokens per forward (bounds the attention workspace)
      numa_split: false                 # split each expert's width across NUMA nodes
      expert_backing: ram               # ram, or disk: experts beyond RAM stay memory-mapped on disk
      defer_experts: 0                  # each token's N weakest routed experts join one layer late (0: off)
    rules:                              # first match wins; regex over checkpoint tensor names
      - match: '^model\\.layers\\.(3|4)\\.mlp\\.experts\\.'
        device: cuda:0
        format: bf16
        kernel: torch
      - match: '\\.mlp\\.experts\\.'
        device: cpu
        format: int4
        kernel: cpu_moe
        options: {threads: 32}
      - match: '.*'                     # everything else: attention, norms, routers, shared experts, head
        device: cuda:0
        format: bf16
        kernel: torch

Every error names the file and the line. Writing goes to a temporary name, then rename.
"""

import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from hybrid.errors import PlanError
from placement.plan import BACKINGS, Plan, Rule, Settings, check_rule, place_all

RULE_KEYS = {"match", "device", "format", "kernel", "options"}
SETTING_TYPES = {f.name: f.type for f in fields(Settings)}


def load_plan(path) -> Plan:
    path = Path(path)
    try:
        root = yaml.compose(path.read_text())
    except OSError as e:
        raise PlanError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise PlanError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(root, yaml.MappingNode):
        raise PlanError(f"{path}:1: a plan is a mapping with keys model, settings, rules")
    top = _mapping(root, path, {"model", "settings", "rules"})
    if "rules" not in top:
        raise PlanError(f"{path}: key 'rules' is missing")
    settings = _settings(top["settings"][1], path) if "settings" in top else Settings()
    rules_node = top["rules"][1]
    if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
        raise PlanError(f"{path}:{_line(rules_node)}: 'rules' must be a non-empty list")
    rules = tuple(_rule(node, path) for node in rules_node.value)
    model = _scalar(top["model"][1], path) if "model" in top else "?"
    return Plan(model=str(model), settings=settings, rules=rules, source=str(path))


def load_checked_plan(path, cfg) -> Plan:
    """A plan file, checked against the model it will run: every tensor placed by a rule whose kernel can
    compute it. What the runtime front ends call before any weight is read."""
    plan = load_plan(path)
    place_all(plan, cfg)
    return plan


def _line(node) -> int:
    return node.start_mark.line + 1


def _mapping(node, path, allowed) -> dict:
    if not isinstance(node, yaml.MappingNode):
        raise PlanError(f"{path}:{_line(node)}: expected a mapping")
    out = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key not in allowed:
            raise PlanError(f"{path}:{_line(key_node)}: unknown key '{key}' (known: {', '.join(sorted(allowed))})")
        out[key] = (key_node, value_node)
    return out


def _scalar(node, path):
    if not isinstance(node, yaml.ScalarNode):
        raise PlanError(f"{path}:{_line(node)}: expected a single value")
    return yaml.safe_load(yaml.serialize(node))


def _value(node):
    return yaml.safe_load(yaml.serialize(node))


def _settings(node, path) -> Settings:
    raw = _mapping(node, path, set(SETTING_TYPES))
    values = {}
    for key, (key_node, value_node) in raw.items():
        v = _value(value_node)
        at = f"{path}:{_line(key_node)}"
        if key == "gpu_expert_layers":
            if not isinstance(v, list) or not all(isinstance(i, int) and i >= 0 for i in v):
                raise PlanError(f"{at}: gpu_expert_layers must be a list of layer numbers, got {v!r}")
            v = tuple(v)
        elif key in ("numa_split",):
            if not isinstance(v, bool):
                raise PlanError(f"{at}: {key} must be true or false, got {v!r}")
        elif key in ("expert_format", "expert_backing"):
            if not isinstance(v, str):
                raise PlanError(f"{at}: {key} must be a name, got {v!r}")
            if key == "expert_backing" and v not in BACKINGS:
                raise PlanError(f"{at}: expert_backing must be one of {', '.join(BACKINGS)}, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "defer_experts" else 1):
            raise PlanError(f"{at}: {key} must be a {'non-negative' if key == 'defer_experts' else 'positive'} "
                            f"integer, got {v!r}")
        values[key] = v
    return Settings(**values)


def _rule(node, path) -> Rule:
    raw = _mapping(node, path, RULE_KEYS)
    for key in ("match", "device", "format", "kernel"):
        if key not in raw:
            raise PlanError(f"{path}:{_line(node)}: rule is missing key '{key}'")
    values = {k: _value(v) for k, (_, v) in raw.items()}
    for key in ("match", "device", "format", "kernel"):
        if not isinstance(values[key], str):
            raise PlanError(f"{path}:{_line(raw[key][1])}: '{key}' must be a string, got {values[key]!r}")
    if not isinstance(values.get("options", {}), dict):
        raise PlanError(f"{path}:{_line(raw['options'][1])}: 'options' must be a mapping")
    rule = Rule(values["match"], values["device"], values["format"], values["kernel"], values.get("options", {}),
                line=_line(node))
    check_rule(rule, str(path))
    return rule


def dump_plan(plan: Plan, header: str = "") -> str:
    settings = asdict(plan.settings)
    settings["gpu_expert_layers"] = list(plan.settings.gpu_expert_layers)
    rules = []
    for r in plan.rules:
        d = {"match": r.match, "device": r.device, "format": r.format, "kernel": r.kernel}
        if r.options:
            d["options"] = dict(r.options)
        rules.append(d)
    body = yaml.safe_dump({"model": plan.model, "settings": settings, "rules": rules}, sort_keys=False, width=120)
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return "# hybrid placement plan: first matching rule wins; regexes over checkpoint tensor names\n" + comments + body


def save_plan(plan: Plan, path, header: str = "") -> Path:
    path = Path(path)
    text = dump_plan(plan, header)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
