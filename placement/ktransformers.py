"""Translate a KTransformers optimize-rule file into our plan rules, naming what has no equivalent.

Their format (first-generation framework): a YAML list of entries, each
    - match: {name: REGEX over module paths, class: python.path.Class}
      replace: {class: python.path.Class, kwargs: {generate_device, prefill_device, generate_op, prefill_op,
                                                    out_device, ...}}
      recursive: False          # optional: stop descending into matched modules
applied first match wins. Their regexes name modules (`model.layers.3.mlp.experts`); ours name tensors
(`model.layers.3.mlp.experts.17.up_proj.weight`), so a module regex becomes "that module and anything under
it". Operators (Marlin, llamafile, AMX kernels, GGUF formats) map to our kernels and formats where one exists.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from hybrid.errors import PlanError
from placement.hardware import gpu_device, gpu_index
from placement.plan import Rule

GPU = gpu_device(0)  # their "cuda" and every cuda:N: one GPU here, the first

KNOWN_ENTRY_KEYS = {"match", "replace", "recursive"}
# replace.class suffixes we understand, and what they mean here
EXPERT_CLASSES = ("KTransformersExperts", "KExpertsCPU", "KDeepseekV3MoE", "KExpertsTorch", "KExpertsMarlin")
NO_EQUIVALENT_KWARGS = {"out_device", "prefill_device", "prefill_op", "transfer_map",
                        "per_layer_prefill_intput_threshold", "absorb_for_prefill", "backend"}


@dataclass(frozen=True)
class Translation:
    rules: tuple[Rule, ...]
    notes: tuple[str, ...]  # what had no equivalent, one line each


def _module_to_tensor_regex(pattern: str) -> str:
    """A module-path regex -> a tensor-name regex matching that module's tensors."""
    body = pattern[:-1] if pattern.endswith("$") else pattern
    return body + r"\." if pattern.endswith("$") else body


def translate(path, expert_format: str = "int4") -> Translation:
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{path}: cannot read KTransformers rules ({e})".replace("\n", " ")) from None
    if not isinstance(entries, list):
        raise PlanError(f"{path}: a KTransformers rule file is a YAML list of match/replace entries")
    rules, notes = [], []
    for i, entry in enumerate(entries, 1):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict) or "match" not in entry:
            raise PlanError(f"{where}: needs a 'match' mapping")
        unknown = set(entry) - KNOWN_ENTRY_KEYS
        if unknown:
            notes.append(f"{where}: key {sorted(unknown)[0]!r} has no equivalent; ignored")
        rule, entry_notes = _entry(entry, where, expert_format)
        notes += entry_notes
        if rule is not None:
            rules.append(rule)
    # Their walk visits a parent module before its children, so an experts module is caught by its own entry
    # before any Linear entry reaches the experts' projections; tensor rules get that by going first.
    experts_first = [r for r in rules if "experts" in r.match] + [r for r in rules if "experts" not in r.match]
    experts_first.append(Rule(".*", GPU, "bf16", "torch"))  # their default: unmatched modules stay on the GPU
    return Translation(tuple(experts_first), tuple(notes))


def _entry(entry: dict, where: str, expert_format: str):
    match, replace = entry.get("match") or {}, entry.get("replace") or {}
    notes = []
    name = match.get("name")
    cls = str(replace.get("class", ""))
    kwargs = replace.get("kwargs") or {}
    if name is None:
        notes.append(f"{where}: matches by class only ({match.get('class')}); our rules match names, entry skipped")
        return None, notes
    try:
        re.compile(name)
    except re.error as e:
        raise PlanError(f"{where}: bad regex {name!r} ({e})") from None
    for k in sorted(set(kwargs) & NO_EQUIVALENT_KWARGS):
        notes.append(f"{where}: kwarg {k}={kwargs[k]!r} has no equivalent (one GPU, one prefill path); ignored")
    if cls == "default" and "generate_device" not in kwargs:
        return None, notes  # "keep the module as it is": our catch-all rule does the same
    device = str(kwargs.get("generate_device", GPU))
    device = GPU if device == "cuda" else device
    if gpu_index(device) is not None and device != GPU:
        notes.append(f"{where}: device {device}: one GPU here, placed on {GPU}")
        device = GPU
    op = str(kwargs.get("generate_op", ""))
    tensor_re = _module_to_tensor_regex(name)
    if cls.endswith(EXPERT_CLASSES) or "experts" in name:
        if device == "cpu":
            if op and op != "KExpertsCPU":
                notes.append(f"{where}: expert op {op} -> our cpu_moe kernel")
            return Rule(tensor_re, "cpu", expert_format, "cpu_moe"), notes
        if op:
            notes.append(f"{where}: GPU expert op {op} has no equivalent; experts on {device} use torch in bf16")
        return Rule(tensor_re, device, "bf16", "torch"), notes
    if cls == "default":
        return Rule(tensor_re, device, "bf16", "torch"), notes
    if op and op not in ("KLinearTorch",):
        notes.append(f"{where}: op {op} has no equivalent; torch in bf16 on {device}")
    if entry.get("recursive") is False:
        notes.append(f"{where}: recursive: False has no equivalent (our rules match tensors); applied to the "
                     f"whole module")
    return Rule(tensor_re, device, "bf16", "torch"), notes
