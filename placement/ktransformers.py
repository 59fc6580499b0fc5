"""Translate a KTransformers optimize-rule file into our plan rules, naming what has no equivalent.

Their format (first-generation framework): a YAML list of entries, each
    - match: {name: REGEX over module paths, class: python.path.Class}
      replace: {class: python.path.Class, kwargs: {generate_device, prefill_device, generate_op, prefill_op,
                                                    out_device, ...}}
      recursive: False          # optional: stop descending into matched modules
Their walk (optimize.gen_optimize_config) visits every module from the root down and gives it the first entry,
in file order, whose regex searches its path (`model.layers.3.mlp.experts`); a module no entry matches stays
on the GPU; an entry with recursive: False (expert operators) takes the module's whole subtree, whose modules
are then never matched. Our regexes name tensors (`model.layers.3.mlp.experts.17.up_proj.weight`), first
match wins, so the translation keeps the file's order and says which tensors each entry takes:
- an entry anchored with `$` takes its modules' own tensors (`...self_attn$` takes none of the projections
  under it: their own entries decide those, as in their walk);
- an entry without `$` matches by search, as theirs does, so it also takes the modules beneath;
- a subtree entry (recursive: False, or an expert operator, which holds the experts' weights itself) takes
  everything beneath, and goes before every other entry: their walk reaches it before any entry can match
  a module under it.
Operators (Marlin, llamafile, AMX kernels, GGUF formats) map to our kernels and formats where one exists.
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
# replace.class suffixes of their expert operators: they hold the experts module's whole subtree
EXPERT_CLASSES = ("KTransformersExperts", "KExpertsCPU", "KExpertsTorch", "KExpertsMarlin")
NO_EQUIVALENT_KWARGS = {"out_device", "prefill_device", "prefill_op", "transfer_map",
                        "per_layer_prefill_intput_threshold", "absorb_for_prefill", "backend"}
OWN_TENSORS = r"\.[^.]+$"  # after a module's path: one of its own tensors (a dot, then a name without dots)


@dataclass(frozen=True)
class Translation:
    rules: tuple[Rule, ...]
    notes: tuple[str, ...]  # what had no equivalent, one line each


def _tensor_regex(pattern: str, subtree: bool) -> str:
    """A module-path regex -> a regex over the tensor names the entry takes (see the module docstring)."""
    if not pattern.endswith("$") or pattern.endswith("\\$"):
        return pattern
    body = pattern[:-1]
    body = f"(?:{body})" if "|" in body else body
    return body + (r"\." if subtree else OWN_TENSORS)


def translate(path, expert_format: str = "int4") -> Translation:
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"{path}: cannot read KTransformers rules ({e})".replace("\n", " ")) from None
    if not isinstance(entries, list):
        raise PlanError(f"{path}: a KTransformers rule file is a YAML list of match/replace entries")
    subtrees, rules, notes = [], [], []
    for i, entry in enumerate(entries, 1):
        where = f"{path} entry {i}"
        if not isinstance(entry, dict) or "match" not in entry:
            raise PlanError(f"{where}: needs a 'match' mapping")
        unknown = set(entry) - KNOWN_ENTRY_KEYS
        if unknown:
            notes.append(f"{where}: key {sorted(unknown)[0]!r} has no equivalent; ignored")
        rule, subtree, entry_notes = _entry(entry, where, expert_format)
        notes += entry_notes
        if rule is not None:
            (subtrees if subtree else rules).append(rule)
    default = Rule(".*", GPU, "bf16", "torch")  # their walk's default: a module no entry matches stays on the GPU
    return Translation(tuple(subtrees + rules + [default]), tuple(notes))


def _entry(entry: dict, where: str, expert_format: str):
    """-> (our rule or None, whether it takes a whole subtree, notes)."""
    match, replace = entry.get("match") or {}, entry.get("replace") or {}
    notes = []
    name = match.get("name")
    cls = str(replace.get("class", ""))
    kwargs = replace.get("kwargs") or {}
    if name is None:
        notes.append(f"{where}: matches by class only ({match.get('class')}); our rules match names, entry skipped")
        return None, False, notes
    try:
        re.compile(name)
    except re.error as e:
        raise PlanError(f"{where}: bad regex {name!r} ({e})") from None
    if match.get("class"):
        notes.append(f"{where}: the condition class {match['class']} has no equivalent (our rules match tensor "
                     f"names); the entry takes every module its name matches")
    for k in sorted(set(kwargs) & NO_EQUIVALENT_KWARGS):
        notes.append(f"{where}: kwarg {k}={kwargs[k]!r} has no equivalent (one GPU, one prefill path); ignored")
    device = str(kwargs.get("generate_device", GPU))
    device = GPU if device == "cuda" else device
    if gpu_index(device) is not None and device != GPU:
        notes.append(f"{where}: device {device}: one GPU here, placed on {GPU}")
        device = GPU
    op = str(kwargs.get("generate_op", ""))
    experts = cls.endswith(EXPERT_CLASSES)
    subtree = experts or entry.get("recursive") is False
    tensor_re = _tensor_regex(name, subtree)
    if experts or (subtree and "experts" in name):
        if device == "cpu":
            if op and op != "KExpertsCPU":
                notes.append(f"{where}: expert op {op} -> our cpu_moe kernel")
            return Rule(tensor_re, "cpu", expert_format, "cpu_moe"), subtree, notes
        if op:
            notes.append(f"{where}: GPU expert op {op} has no equivalent; experts on {device} use torch in bf16")
        return Rule(tensor_re, device, "bf16", "torch"), subtree, notes
    if op and op not in ("KLinearTorch",):
        notes.append(f"{where}: op {op} has no equivalent; torch in bf16 on {device}")
    return Rule(tensor_re, device, "bf16", "torch"), subtree, notes
