"""Plan: where every tensor goes, in which format, computed by which kernel. Data, validated before any load.

A plan is global settings plus an ordered list of rules; each rule is a regex over checkpoint tensor names
(`model.layers.5.mlp.experts.17.up_proj.weight`), first match wins. Kernels and formats come from closed
registries: a plan file names them, it never names code. `plan_file.py` holds the YAML form.
"""

import re
from dataclasses import dataclass, field, fields, replace
from functools import cached_property

from cpu_kernels.formats import parse_format
from hybrid.read.config import ModelConfig
from hybrid.errors import PlanError
from hybrid.read.names import layer_prefix, quantizable
from placement import memory
from placement.hardware import gpu_index

TORCH_FORMATS = ("bf16", "fp32", "fp8")  # fp8: the checkpoint's block-FP8, dequantized per use
# kernel -> (what it may compute, devices, formats)
KERNELS = {
    "torch": "any tensor, on cpu or cuda:N, in bf16 or fp32 (or fp8 for the checkpoint's block-FP8 projections)",
    "cpu_moe": "routed experts only, on cpu, in an expert-store format (bf16, int8, int4, with -g32/-g64/-g128), "
               "or gguf: a GGUF checkpoint's experts in their stored blocks",
    "cpu_linear": "weight matrices outside the routed experts and routers (attention projections with MLA's "
                  "absorbed per-head products, shared experts, dense MLPs, head), on cpu, computed by the CPU "
                  "kernels: in an expert-store format (bf16, int8, int4, with -g32/-g64/-g128), quantized at load, "
                  "or gguf: a GGUF checkpoint's matrices (and embedding) in their stored blocks, never expanded",
    "cpu_gguf": "the earlier name of cpu_linear with format gguf (plan files that use it keep working)",
}
OPTIONS = {"torch": set(), "cpu_moe": {"threads"}, "cpu_linear": {"threads"}, "cpu_gguf": {"threads"}}
LINEAR_KERNELS = ("cpu_linear", "cpu_gguf")  # the CPU kernels on single weight matrices
BACKINGS = ("ram", "disk")
# The tensor whose rule says where attention runs: the MLA cache and the attention workspace live there.
ATTENTION_TENSOR = f"{layer_prefix(0)}.self_attn.kv_a_proj_with_mqa.weight"


def is_device(name: str) -> bool:
    """A device a plan may name: cpu, or a GPU by its number."""
    return name == "cpu" or gpu_index(name) is not None


@dataclass(frozen=True)
class Rule:
    match: str
    device: str
    format: str
    kernel: str
    options: dict = field(default_factory=dict)
    line: int | None = None  # where the rule stands in its plan file, for error messages

    def where(self, source: str) -> str:
        return f"{source}:{self.line}" if self.line else source


@dataclass(frozen=True)
class Settings:
    context_length: int = 32768
    batch: int = 1
    cache_device: str | None = None  # the MLA cache's device, which must be the attention's; None: the attention's
    cpu_threads: int = 1
    expert_format: str = "int4"
    gpu_expert_layers: tuple[int, ...] = ()
    prefill_chunk: int = 512
    expert_backing: str = "ram"  # disk: routed experts beyond RAM stay memory-mapped from the expert store
    defer_experts: int = 0  # each token's weakest routed experts computed one layer late (0: off)
    expert_store: str | None = None  # the converted expert store (hybrid convert) the runtime loads experts from
    # prefill chunks of at least this many tokens stream each MoE layer's routed experts to the GPU and compute
    # them there (hybrid/run/expert_streaming.py; the planner sets it from PCIe and CPU speed); 0: never
    gpu_prefill_tokens: int = 0


@dataclass(frozen=True)
class Architecture:
    """The model facts a plan's rules and settings refer to, by config.json's names: layer numbers (and which
    are MoE), expert numbers, and the widths every size in it comes from. A plan file records them, so a
    checkpoint is matched by what it is, not by its folder's name."""

    num_hidden_layers: int
    first_k_dense_replace: int
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> "Architecture":
        return cls(**{f.name: getattr(cfg, f.name) for f in fields(cls)})

    def differences(self, cfg: ModelConfig) -> list[tuple[str, int, int]]:
        """(key, this value, the config's) for every fact where `cfg` differs."""
        return [(f.name, getattr(self, f.name), getattr(cfg, f.name)) for f in fields(self)
                if getattr(self, f.name) != getattr(cfg, f.name)]


@dataclass(frozen=True)
class Plan:
    model: str
    settings: Settings
    rules: tuple[Rule, ...]
    source: str = "<plan>"
    architecture: Architecture | None = None  # None: a plan file written before plans recorded it
    # What checking the plan against a checkpoint and a machine found that does not stop it, one line each,
    # for the front end to show (evaluate / load_checked_plan fill it).
    notes: tuple[str, ...] = field(default=(), compare=False)

    @cached_property
    def _compiled(self):
        return [(re.compile(r.match), r) for r in self.rules]

    def rule_for(self, name: str) -> Rule | None:
        for pattern, rule in self._compiled:
            if pattern.search(name):
                return rule
        return None

    @property
    def devices(self) -> set[str]:
        return {r.device for r in self.rules}

    @property
    def gpu_device(self) -> str | None:
        """The lowest-numbered GPU the plan uses (one GPU today), or None."""
        gpus = sorted((gpu_index(d), d) for d in self.devices if gpu_index(d) is not None)
        return gpus[0][1] if gpus else None

    @property
    def attention_device(self) -> str:
        """The device of the attention's weights, by the rule that places them."""
        rule = self.rule_for(ATTENTION_TENSOR)
        return rule.device if rule is not None else "cpu"

    @property
    def cache_device(self) -> str:
        """Where the runtime builds the MLA cache (and the planner counts it with the attention workspace):
        the settings' cache_device, else the attention's device."""
        return self.settings.cache_device or self.attention_device


def check_rule(rule: Rule, source: str):
    """One rule on its own: regex compiles, device/format/kernel/options are known and go together."""
    at = rule.where(source)
    try:
        re.compile(rule.match)
    except re.error as e:
        raise PlanError(f"{at}: bad regex {rule.match!r} ({e})") from None
    if not is_device(rule.device):
        raise PlanError(f"{at}: unknown device {rule.device!r} (cpu or cuda:N)")
    if rule.kernel not in KERNELS:
        raise PlanError(f"{at}: unknown kernel {rule.kernel!r}; known: {', '.join(KERNELS)}")
    if rule.kernel == "torch" and rule.format not in TORCH_FORMATS:
        raise PlanError(f"{at}: kernel torch takes format {' or '.join(TORCH_FORMATS)}, not {rule.format!r}")
    if rule.kernel != "torch" and rule.device != "cpu":
        raise PlanError(f"{at}: kernel {rule.kernel} runs on cpu, not {rule.device}")
    if rule.kernel == "cpu_gguf" and rule.format != memory.GGUF:
        raise PlanError(f"{at}: kernel cpu_gguf takes format {memory.GGUF}, not {rule.format!r}")
    if rule.kernel in ("cpu_moe", "cpu_linear") and rule.format != memory.GGUF:
        try:
            fmt = parse_format(rule.format)
        except ValueError as e:
            raise PlanError(f"{at}: unknown format {rule.format!r} for {rule.kernel} ({e})") from None
        if fmt.spec.quantize is None:  # a GGUF type is a file's, not a choice: format gguf keeps it as stored
            raise PlanError(f"{at}: format {rule.format} is a GGUF type; {rule.kernel} takes {memory.GGUF} for a GGUF "
                            f"checkpoint's tensors as stored")
    unknown = set(rule.options) - OPTIONS[rule.kernel]
    if unknown:
        raise PlanError(f"{at}: unknown option '{sorted(unknown)[0]}' for kernel {rule.kernel}")
    threads = rule.options.get("threads", 1)
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise PlanError(f"{at}: option threads must be a whole number, 1 or more, got {threads!r}")


def cpu_threads(plan: Plan) -> int:
    """The threads of the plan's CPU-kernel worker: the most any of its CPU-kernel rules (cpu_moe, cpu_linear) asks
    for (0 without such rules). The runtime runs one worker for all of them (cpu_kernels/threads.py)."""
    return max((r.options.get("threads", plan.settings.cpu_threads) for r in plan.rules
                if r.kernel == "cpu_moe" or r.kernel in LINEAR_KERNELS), default=0)


def with_threads(plan: Plan, n_threads: int) -> Plan:
    """The plan with cpu_threads and every rule's threads option set to n_threads (`--threads`: one budget for
    the whole run)."""
    rules = tuple(replace(r, options=r.options | {"threads": n_threads}) if "threads" in r.options else r
                  for r in plan.rules)
    return replace(plan, settings=replace(plan.settings, cpu_threads=n_threads), rules=rules)


def check_model(plan: Plan, cfg: ModelConfig, planned_for: Architecture | None) -> None:
    """The plan against the checkpoint it will run: written for the same architecture (`planned_for`: the plan's
    own record, else what its model names; None: nothing to compare), MoE layers that exist, a context the
    model has."""
    wrong = planned_for.differences(cfg) if planned_for is not None else []
    if wrong:
        planned = ", ".join(f"{key} {value}" for key, value, _ in wrong)
        actual = ", ".join(f"{key} {value}" for key, _, value in wrong)
        raise PlanError(f"{plan.source}: written for another model ({plan.model}: {planned}), not for "
                        f"{cfg.source} ({actual}); make a plan for it with `hybrid plan MODEL -o FILE`")
    s = plan.settings
    if s.context_length > cfg.max_position_embeddings:
        raise PlanError(f"{plan.source}: context_length {s.context_length} exceeds the model's "
                        f"max_position_embeddings ({cfg.max_position_embeddings})")
    stray = sorted(set(s.gpu_expert_layers) - set(cfg.moe_layers))
    if stray:
        raise PlanError(f"{plan.source}: gpu_expert_layers {stray} are not MoE layers of this model "
                        f"({cfg.first_k_dense_replace} to {cfg.num_hidden_layers - 1})")


def check_cache(plan: Plan, at: str):
    """The settings may name the cache's device, and it must be the attention's: the cache lives where attention
    runs (one device per plan today)."""
    if plan.cache_device != plan.attention_device:
        raise PlanError(f"{at}: cache_device {plan.cache_device} is not the attention's device "
                        f"{plan.attention_device}, where the cache must live")


@dataclass(frozen=True)
class Budget:
    """Bytes per device and group the plan's placement costs, with cache and workspace on the cache device."""

    by_device: dict  # device -> {group: bytes}
    expert_device_bytes: dict  # device -> routed-expert bytes
    linear_bytes: int = 0  # of the CPU's, weight matrices the CPU kernels stream per token (cpu_linear)
    linear_block_weights: int = 0  # weights of those kept in GGUF blocks (their kernels are compute-bound)

    def total(self, device: str) -> int:
        return sum(self.by_device.get(device, {}).values())


def place_all(plan: Plan, cfg: ModelConfig) -> Budget:
    """Place every tensor; error on one no rule matches or a kernel that cannot compute it."""
    by_device, experts, linears, block_weights = {}, {}, 0, 0
    for name, shape in memory.tensors(cfg):
        rule = plan.rule_for(name)
        if rule is None:
            raise PlanError(f"{plan.source}: tensor {name} matches no rule (add a catch-all rule such as match: '.*')")
        is_expert = memory.is_routed_expert(name)
        if rule.kernel == "cpu_moe" and not is_expert:
            raise PlanError(f"{rule.where(plan.source)}: kernel cpu_moe computes routed experts only, but "
                            f"rule {rule.match!r} also matches {name}")
        if rule.format == "fp8" and not quantizable(name):
            raise PlanError(f"{rule.where(plan.source)}: format fp8 is only for block-FP8 projection weights, but "
                            f"rule {rule.match!r} also matches {name}")
        group = memory.group_of(name)
        if rule.kernel in LINEAR_KERNELS:
            _check_linear(plan, rule, name, shape, group)
        if rule.format == memory.GGUF and not cfg.gguf:
            raise PlanError(f"{rule.where(plan.source)}: format {memory.GGUF} is for GGUF checkpoints, and this "
                            f"model ({cfg.source}) is not one")
        if rule.kernel == "cpu_linear" and rule.format != memory.GGUF:
            nbytes = memory.linear_bytes(name, shape, rule.format, cfg)
        else:
            nbytes = memory.tensor_bytes(name, shape, rule.format, cfg)
        dev = by_device.setdefault(rule.device, {})
        dev[group] = dev.get(group, 0) + nbytes
        if is_expert:
            experts[rule.device] = experts.get(rule.device, 0) + nbytes
        if rule.kernel in LINEAR_KERNELS and group != "embed":  # an embedding is looked up, not streamed
            linears += nbytes
            block_weights += memory.numel(shape) if rule.format == memory.GGUF else 0
    check_cache(plan, plan.source)
    main = plan.cache_device
    s = plan.settings
    dev = by_device.setdefault(main, {})
    dev["kv_cache"] = memory.kv_cache_bytes(cfg, s.context_length, s.batch)
    dev["workspace"] = memory.workspace_bytes(cfg, s.context_length, s.prefill_chunk, s.batch)
    if main != "cpu":
        dev["cuda_context"] = memory.CUDA_CONTEXT_BYTES
        if s.gpu_prefill_tokens:  # GPU prefill's two slots, on the GPU and pinned in RAM
            dev["staging"] = by_device.setdefault("cpu", {})["staging"] = memory.staging_bytes(s)
    return Budget(by_device, experts, linears, block_weights)


def _check_linear(plan: Plan, rule: Rule, name: str, shape, group: str):
    """What cpu_linear (and cpu_gguf) computes: weight matrices, not routed experts or routers (those stay float32
    for a stable top-k), and an embedding only as GGUF blocks (a lookup of stored rows; a table quantized here
    would be read a row at a time, which torch already does)."""
    at = rule.where(plan.source)
    if group in ("routed_experts", "router") or len(shape) != 2:
        raise PlanError(f"{at}: kernel {rule.kernel} computes weight matrices outside the routed experts and "
                        f"routers, but rule {rule.match!r} also matches {name}")
    if group == "embed" and rule.format != memory.GGUF:
        raise PlanError(f"{at}: the embedding is a lookup: torch, or kernel {rule.kernel} with format {memory.GGUF} "
                        f"(a GGUF's rows as stored), not {rule.format}; rule {rule.match!r} matches {name}")
