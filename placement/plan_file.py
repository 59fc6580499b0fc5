"""The placement plan file: YAML that people edit and share.

    # hybrid placement plan
    model: kimi-k2-instruct-0905        # preset name or checkpoint folder it was planned for
    architecture:                       # config.json's facts the rules and sizes refer to: a checkpoint that
      num_hidden_layers: 61             # differs in any is another model, and the plan is refused for it
      first_k_dense_replace: 1          # (the folder's name is not compared). Files without this key: the
      hidden_size: 7168                 # preset or folder `model` names is compared, when it is here
      moe_intermediate_size: 2048
      n_routed_experts: 384
    settings:
      context_length: 131072            # tokens of MLA cache reserved per sequence
      batch: 1                          # sequences decoded together
      cache_device: cuda:0              # where the MLA cache lives: the attention's device (default: that)
      cpu_threads: 32                   # CPU-kernel threads (default: physical cores; --threads overrides)
      expert_format: int4               # CPU expert store format: bf16, int8, int4 (+ -g32/-g64/-g128)
      gpu_expert_layers: [3, 4]         # MoE layers whose routed experts live on the GPU
      prefill_chunk: 64                 # prompt tokens per forward (bounds the attention workspace)
      expert_backing: ram               # ram, or disk: experts beyond RAM stay memory-mapped from the
                                        # expert store (needs --store; quantizing at load holds them in RAM)
      defer_experts: 0                  # each token's N weakest routed experts join one layer late (0: off)
      gpu_prefill_tokens: 1024          # prefill chunks of this many tokens or more stream each MoE layer's
                                        # experts to the GPU and compute them there (0: off; planned from PCIe
                                        # and CPU speed, with its staging memory reserved)
      expert_store: /fast-disk/k2-int4  # optional: the store from hybrid convert (relative: to this file);
                                        # generate/chat/serve/profile then need no --store
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
      - match: '^lm_head\\.'             # weight matrices on the CPU kernels (a plan without a GPU puts every
        device: cpu                     # one there): a store format quantized at load, or gguf (a GGUF's
        format: int8                    # blocks); not routers, norms or experts. cpu_gguf, the earlier name
        kernel: cpu_linear              # of cpu_linear with format gguf, still loads
        options: {threads: 32}
      - match: '.*'                     # everything else: attention, norms, routers, shared experts
        device: cuda:0
        format: bf16
        kernel: torch

Every error names the file and the line. Writing goes to a temporary name, then rename. Settings that were
removed are refused with the reason (RETIRED_SETTINGS), as every other unknown key is: a plan says only what
the runtime does. One exception keeps shared plan files working: a removed setting left at the value that
asked for nothing (numa_split: false, which every plan file written before its removal holds) is skipped.
"""

import os
import tempfile
from dataclasses import asdict, fields, replace
from pathlib import Path

import yaml

from hybrid.errors import PlanError
from placement.hardware import detect
from placement.memory import check_expert_format
from placement.plan import (BACKINGS, Architecture, Plan, Rule, Settings, check_cache, check_rule, is_device,
                            with_threads)
from placement.planner import evaluate

RULE_KEYS = {"match", "device", "format", "kernel", "options"}
SETTING_TYPES = {f.name: f.type for f in fields(Settings)}
ZERO_MEANS_OFF = ("defer_experts", "gpu_prefill_tokens")  # the integer settings where 0 is allowed: off
ARCHITECTURE_KEYS = tuple(f.name for f in fields(Architecture))
# setting -> why it is gone; plan files written before still hold these keys
# key -> (the value that asked for nothing: still accepted, so plan files written before stay valid; why)
RETIRED_SETTINGS = {
    "numa_split": (False, "nothing read it: the CPU expert kernels do not split experts across NUMA nodes; "
                          "delete the line"),
}


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
    top = _mapping(root, path, {"model", "architecture", "settings", "rules"})
    if "rules" not in top:
        raise PlanError(f"{path}: key 'rules' is missing")
    settings = _settings(top["settings"][1], path) if "settings" in top else Settings()
    rules_node = top["rules"][1]
    if not isinstance(rules_node, yaml.SequenceNode) or not rules_node.value:
        raise PlanError(f"{path}:{_line(rules_node)}: 'rules' must be a non-empty list")
    rules = tuple(_rule(node, path) for node in rules_node.value)
    model = _scalar(top["model"][1], path) if "model" in top else "?"
    architecture = _architecture(top["architecture"][1], path) if "architecture" in top else None
    plan = Plan(model=str(model), settings=settings, rules=rules, source=str(path), architecture=architecture)
    if settings.cache_device is not None:
        key = next(k for k, _ in top["settings"][1].value if k.value == "cache_device")
        check_cache(plan, f"{path}:{_line(key)}")
    return plan


def load_checked_plan(path, cfg, hw=None, threads: int | None = None) -> Plan:
    """A plan file, checked as `hybrid plan --check` checks it (planner.evaluate) against the checkpoint's config
    and this machine (`hw`, default: detected): written for this model, every tensor placed by a rule whose
    kernel can compute it, within this machine's memory. What the runtime front ends call before any weight
    is read; the returned plan's `notes` are the check's warnings, for the front end to show. `threads`: the
    run's thread budget (`--threads`), in place of the file's cpu_threads (with_threads) before the check."""
    plan = load_plan(path)
    plan = plan if threads is None else with_threads(plan, threads)
    check_expert_format(cfg, plan.settings.expert_format, f"plan {path}", cfg.source)
    return replace(plan, notes=evaluate(plan, cfg, hw or detect()).notes)


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
    if isinstance(node, yaml.MappingNode):
        kept = []
        for key_node, value_node in node.value:
            if key_node.value not in RETIRED_SETTINGS:
                kept.append((key_node, value_node))
                continue
            harmless, why = RETIRED_SETTINGS[key_node.value]
            if _value(value_node) != harmless:
                raise PlanError(f"{path}:{_line(key_node)}: setting '{key_node.value}' was removed ({why})")
        node = yaml.MappingNode(node.tag, kept, flow_style=node.flow_style)
    raw = _mapping(node, path, set(SETTING_TYPES))
    values = {}
    for key, (key_node, value_node) in raw.items():
        v = _value(value_node)
        at = f"{path}:{_line(key_node)}"
        if key == "gpu_expert_layers":
            if not isinstance(v, list) or not all(isinstance(i, int) and i >= 0 for i in v):
                raise PlanError(f"{at}: gpu_expert_layers must be a list of layer numbers, got {v!r}")
            v = tuple(v)
        elif key == "expert_store":
            if not isinstance(v, str) or not v:
                raise PlanError(f"{at}: expert_store must be a folder path, got {v!r}")
            v = str(Path(path).parent / Path(v).expanduser())  # a relative path is the plan file's neighbour
        elif key in ("expert_format", "expert_backing", "cache_device"):
            if not isinstance(v, str):
                raise PlanError(f"{at}: {key} must be a name, got {v!r}")
            if key == "expert_backing" and v not in BACKINGS:
                raise PlanError(f"{at}: expert_backing must be one of {', '.join(BACKINGS)}, got {v!r}")
            if key == "cache_device" and not is_device(v):
                raise PlanError(f"{at}: unknown cache_device {v!r} (cpu or cuda:N)")
        elif isinstance(v, bool) or not isinstance(v, int) or v < (0 if key in ZERO_MEANS_OFF else 1):
            raise PlanError(f"{at}: {key} must be a {'non-negative' if key in ZERO_MEANS_OFF else 'positive'} "
                            f"integer, got {v!r}")
        values[key] = v
    return Settings(**values)


def _architecture(node, path) -> Architecture:
    raw = _mapping(node, path, ARCHITECTURE_KEYS)
    values = {}
    for key in ARCHITECTURE_KEYS:
        if key not in raw:
            raise PlanError(f"{path}:{_line(node)}: architecture is missing key '{key}'")
        v = _value(raw[key][1])
        least = 0 if key == "first_k_dense_replace" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise PlanError(f"{path}:{_line(raw[key][0])}: {key} must be a whole number, {least} or more, got {v!r}")
        values[key] = v
    return Architecture(**values)


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
    settings["cache_device"] = plan.cache_device  # written out, so a file names where its cache lives
    if settings["expert_store"] is None:
        del settings["expert_store"]
    rules = []
    for r in plan.rules:
        d = {"match": r.match, "device": r.device, "format": r.format, "kernel": r.kernel}
        if r.options:
            d["options"] = dict(r.options)
        rules.append(d)
    top = {"model": plan.model}
    if plan.architecture is not None:
        top["architecture"] = asdict(plan.architecture)
    body = yaml.safe_dump(top | {"settings": settings, "rules": rules}, sort_keys=False, width=120)
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
