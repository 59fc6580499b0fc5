"""Past one workstation: whether a model fits a cluster of identical GPU nodes under vLLM or SGLang, and how.

`hybrid plan MODEL --cluster 2x8xH200` hands a model that one machine cannot serve well to the engines that run it
across GPUs and nodes. The engines keep the checkpoint's weights as it stores them (block-FP8 stays FP8, K2-Thinking's
pack-quantized INT4 experts stay INT4), so a GPU holds its share of the checkpoint's real bytes (`memory.
checkpoint_bytes`), and what is left of its memory after the engine's own reserve is MLA cache.

Layouts (vLLM and SGLang, as Moonshot's deployment guide runs K2):
  TP n     tensor parallel over all n GPUs (vLLM over Ray past one node; SGLang with --nnodes): attention heads,
           MLP widths, each routed expert's width, the embedding and head are split n ways; the MLA down-projections
           (q_a_proj, kv_a_proj_with_mqa), the norms and the router are whole on every GPU, and so is the MLA
           latent cache: every rank holds every token's 576 values per layer.
  DPn+EP   vLLM's data parallel attention with expert parallelism: each GPU holds all non-expert weights and
           1/n of the routed experts, and a cache of its own requests only, so the cluster's cache is n times a
           GPU's.
  TPg+kt   one node, SGLang with kt-kernel: the routed experts stay in system RAM on the CPU (kt-kernel's
           operator), the rest is TP over the node's g GPUs, and spare GPU memory takes some experts per layer.

A layout fits when every GPU holds its weights and at least one sequence of the requested context. Splitting
needs whole pieces: heads and widths divisible by TP, and for block-FP8 each split a whole number of 128-wide
blocks (K2 FP8: expert width 2048 / 128 = 16, so TP16 at most).

Cluster YAML (`--cluster cluster.yaml`), every node alike:
  nodes: 2                 # how many
  gpus_per_node: 8
  gpu: H200                # a GPU_TABLE name, or a mapping {name, memory_gib}
  gpu_memory_gib: 141      # optional: overrides the table
  ram_gib: 2048            # optional: system RAM per node (enables the kt-kernel layout on one node)
  cores: 112               # optional: physical cores per node (kt-kernel's CPU threads)
  numa_nodes: 2            # optional
  head_ip: 10.0.0.1        # optional: node 0's address, written into the multi-node commands
"""

import math
import re
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from hybrid.errors import PlanError
from hybrid.read.config import ModelConfig
from placement.hardware import (GPU, GPU_TABLE, RAM_RESERVE_GIB, match_gpu, checked_number, gpu_from_name,
                                parse_size_gib, read_yaml_keys)
from placement.memory import GIB, checkpoint_bytes, tensors

# What each engine leaves to weights and cache. vLLM: --gpu-memory-utilization of the card (0.92 by default in
# vLLM 0.33, vllm/config/cache.py; 0.85 in the DP+EP command Moonshot's guide gives), less activations, CUDA graphs
# and NCCL buffers: VLLM_RESERVE_GIB, calibrated on the K2-Thinking recipe's TP8 log on 8 H200 (vllm-project/recipes
# PR 115: "Available KV cache memory: 46.80 GiB", 715,072 tokens, at the then-default 0.9); this arithmetic gives
# 47.6 GiB there (tests/test_cluster.py). SGLang: the card less its own reserve rule (`sglang_reserve_gib`).
VLLM_UTILIZATION = 0.92
VLLM_DP_EP_UTILIZATION = 0.85
VLLM_RESERVE_GIB = 8.0
FP8_BLOCK = 128

VLLM, SGLANG, SGLANG_KT = "vllm", "sglang", "sglang+kt-kernel"
ENGINE_NAMES = {VLLM: "vLLM", SGLANG: "SGLang", SGLANG_KT: "SGLang + kt-kernel"}

# Split whole by tensor parallelism (vLLM's DeepseekV2 / SGLang's DeepseekV2 modules: ReplicatedLinear, norms).
_REPLICATED = re.compile(r"(q_a_proj|kv_a_proj_with_mqa|norm)\.weight$|\.mlp\.gate\.(weight|e_score_correction_bias)$")
_EXPERT = re.compile(r"\.mlp\.experts\.")


@dataclass(frozen=True)
class Node:
    gpus: int
    gpu: GPU
    ram_gib: float | None = None
    cores: int | None = None
    numa_nodes: int = 1


@dataclass(frozen=True)
class Cluster:
    nodes: int
    node: Node
    head_ip: str | None = None
    source: str = "--cluster"

    @property
    def gpus(self) -> int:
        return self.nodes * self.node.gpus

    def label(self) -> str:
        return f"{self.nodes}x{self.node.gpus} {self.node.gpu.name}"

    def spec(self) -> str:
        """The --cluster text for this cluster (its GPU by name)."""
        return f"{self.nodes}x{self.node.gpus}x{self.node.gpu.name.replace(' ', '')}"


def parse_cluster(text: str, ram=None, cores: int | None = None, numa_nodes: int | None = None) -> Cluster:
    """NODESxGPUSxTYPE (`2x8xH200`), GPUSxTYPE (one node: `8xH100`), or a cluster YAML file; --ram, --cores and
    --numa-nodes describe each node."""
    path = Path(text)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        cluster = load_cluster(path)
    else:
        m = re.fullmatch(r"\s*(?:(\d+)\s*[xX]\s*)?(\d+)\s*[xX]\s*(.+?)\s*", text)
        if not m:
            raise PlanError(f"--cluster {text!r}: expected NODESxGPUSxTYPE (2x8xH200), GPUSxTYPE (8xH100) "
                            "or a cluster YAML file")
        nodes = checked_number("--cluster nodes", "cores", int(m[1] or 1))
        gpus = checked_number("--cluster GPUs per node", "cores", int(m[2]))
        if match_gpu(m[3]) is None:
            raise PlanError(f"--cluster {text!r}: GPU {m[3]!r} is not in the table ({', '.join(GPU_TABLE)}); give its "
                            "memory in a cluster YAML (gpu: {name: ..., memory_gib: ...})")
        cluster = Cluster(nodes, Node(gpus, gpu_from_name(m[3])))
    each = {}
    if ram is not None:
        each["ram_gib"] = parse_size_gib(ram, "--ram")
    if cores is not None:
        each["cores"] = checked_number("--cores", "cores", cores)
    if numa_nodes is not None:
        each["numa_nodes"] = checked_number("--numa-nodes", "numa_nodes", numa_nodes)
    return replace(cluster, node=replace(cluster.node, **each))


CLUSTER_KEYS = {"nodes", "gpus_per_node", "gpu", "gpu_memory_gib", "ram_gib", "cores", "numa_nodes", "head_ip"}


def load_cluster(path: Path) -> Cluster:
    raw = read_yaml_keys(path, "cluster", CLUSTER_KEYS)
    for key in ("gpus_per_node", "gpu"):
        if key not in raw:
            raise PlanError(f"{path}: key '{key}' is missing")
    gpu = raw["gpu"]
    if isinstance(gpu, dict):
        if "name" not in gpu or "memory_gib" not in gpu:
            raise PlanError(f"{path}: gpu as a mapping needs name and memory_gib, got {sorted(gpu)}")
        memory = checked_number(f"{path}: gpu memory_gib", "memory_gib", gpu["memory_gib"])
        gpu = GPU(str(gpu["name"]), float(memory), 0.0, 0.0)
    else:
        gpu = gpu_from_name(str(gpu))
    if "gpu_memory_gib" in raw:
        memory = checked_number(f"{path}: gpu_memory_gib", "memory_gib", raw["gpu_memory_gib"])
        gpu = GPU(gpu.name, float(memory), gpu.bandwidth_gbps, gpu.bf16_tflops, gpu.pcie_gbps)
    whole = {k: checked_number(f"{path}: {k}", "cores", raw[k]) for k in ("nodes", "gpus_per_node", "cores")
             if k in raw}
    ram = parse_size_gib(raw["ram_gib"], f"{path}: ram_gib") if "ram_gib" in raw else None
    numa = checked_number(f"{path}: numa_nodes", "numa_nodes", raw.get("numa_nodes", 1))
    node = Node(whole["gpus_per_node"], gpu, ram, whole.get("cores"), numa)
    head = raw.get("head_ip")
    return Cluster(whole.get("nodes", 1), node, None if head is None else str(head), str(path))


@dataclass(frozen=True)
class Weights:
    """A model's checkpoint bytes in the classes tensor parallelism treats alike."""
    replicated: int  # whole on every TP rank
    split: int  # split n ways by TP (attention heads, MLP widths, embedding and head rows)
    experts: int  # routed experts
    expert_bytes: int  # one routed expert (all three projections)
    moe_layers: int

    @property
    def total(self) -> int:
        return self.replicated + self.split + self.experts


@lru_cache(maxsize=16)
def weights(cfg: ModelConfig) -> Weights:
    totals = {"replicated": 0, "split": 0, "experts": 0}
    for name, shape in tensors(cfg):
        kind = "experts" if _EXPERT.search(name) else "replicated" if _REPLICATED.search(name) else "split"
        totals[kind] += checkpoint_bytes(cfg, name, shape)
    n_experts = max(len(cfg.moe_layers) * cfg.n_routed_experts, 1)
    return Weights(**totals, expert_bytes=totals["experts"] // n_experts, moe_layers=len(cfg.moe_layers))


def tp_refusal(cfg: ModelConfig, tp: int, experts_split: bool = True) -> str | None:
    """Why `tp` ranks cannot split this model (None when they can): heads and every split width must divide, and
    a block-FP8 split must be whole blocks; a pack-quantized INT4 expert split must be whole groups."""
    if cfg.num_attention_heads % tp:
        return f"{cfg.num_attention_heads} attention heads do not split {tp} ways"
    widths = {"attention heads' values (o_proj input)": cfg.num_attention_heads * cfg.v_head_dim,
              "q_b_proj rows": cfg.num_attention_heads * cfg.qk_head_dim}
    if cfg.first_k_dense_replace:
        widths["dense MLP width"] = cfg.intermediate_size
    if cfg.n_shared_experts:
        widths["shared expert width"] = cfg.moe_intermediate_size * cfg.n_shared_experts
    if experts_split:
        widths["expert width"] = cfg.moe_intermediate_size
    for what, width in widths.items():
        block = FP8_BLOCK if cfg.fp8_block else 1
        if what == "expert width" and cfg.int4_group:
            block = cfg.int4_group
        if width % (tp * block):
            unit = f" into whole {block}-wide {'FP8 blocks' if cfg.fp8_block else 'INT4 groups'}" if block > 1 else ""
            return f"{what} {width} does not split {tp} ways{unit}"
    return None


# SGLang's defaults by card size (sglang/srt/arg_groups/memory_hook.py, handle_gpu_memory_settings, 0.5.23): below
# each MiB bound, (chunked prefill tokens, CUDA-graph decode batch at TP under 4, at TP 4 or more).
_SGLANG_CARDS = ((20 * 1024, 2048, 8, 8), (35 * 1024, 4096, 48, 160), (60 * 1024, 4096, 32, 160),
                 (160 * 1024, 8192, 256, 512), (math.inf, 16384, 512, 512))


def sglang_reserve_gib(gpu_gib: float, tp: int) -> float:
    """What SGLang keeps off weights and cache when --mem-fraction-static is not given (the same function): 512 MiB
    of metadata, 1.5 MiB per token of the prefill chunk, 1 GiB per 8 TP ranks, 2 MiB per CUDA-graph batch slot and
    1.5 GiB for MLA's prefill graphs; at least 10 GiB on a card over 60 GiB."""
    mib = gpu_gib * 1024
    _, chunk, small_tp, large_tp = next(row for row in _SGLANG_CARDS if mib < row[0])
    graph_batch = small_tp if tp < 4 else large_tp
    reserve = 512 + 1.5 * max(chunk, 2048) + tp / 8 * 1024 + 2 * graph_batch + 1.5 * 1024
    return max(reserve, 10 * 1024 if mib > 60 * 1024 else 0) / 1024


@dataclass(frozen=True)
class Layout:
    engine: str
    name: str  # TP16, DP16+EP, TP4+kt
    tp: int
    dp: int = 1
    expert_parallel: bool = False
    weights_gib: float = 0.0  # per GPU
    usable_gib: float = 0.0  # what the engine gives weights and cache on a GPU
    cache_tokens: int = 0  # per GPU (a TP rank's cache holds every sequence; a DP rank's only its own)
    sequences: int = 0  # sequences of the requested context the whole cluster holds at once
    refusal: str | None = None
    utilization: float | None = None  # vLLM's --gpu-memory-utilization when not its default
    gpu_experts: int = 0  # kt-kernel: routed experts per MoE layer kept on the GPUs
    ram_gib: float = 0.0  # kt-kernel: system RAM the experts take
    kt_method: str | None = None  # kt-kernel: its CPU format for the experts (--kt-method)

    @property
    def fits(self) -> bool:
        return self.refusal is None

    @property
    def cluster_tokens(self) -> int:
        return self.cache_tokens * self.dp


def _gib(n: float) -> float:
    return n / GIB


def layouts(cfg: ModelConfig, cluster: Cluster, context: int) -> list[Layout]:
    """Every layout the engines offer for this cluster, fitting or not, in the order they are worth trying."""
    w = weights(cfg)
    per_token = cfg.kv_cache_bytes_per_token
    n, gpu_gib = cluster.gpus, cluster.node.gpu.memory_gib
    out = []
    tp_bytes = w.replicated + (w.split + w.experts) / n
    vllm_usable = VLLM_UTILIZATION * gpu_gib - VLLM_RESERVE_GIB
    out.append(_fill(Layout(VLLM, f"TP{n}", tp=n), cfg, tp_bytes, vllm_usable, per_token, context,
                     tp_refusal(cfg, n)))
    if n > 1 and cfg.n_routed_experts % n == 0:
        dp_bytes = w.replicated + w.split + w.experts / n
        usable = VLLM_DP_EP_UTILIZATION * gpu_gib - VLLM_RESERVE_GIB
        out.append(_fill(Layout(VLLM, f"DP{n}+EP", tp=1, dp=n, expert_parallel=True,
                                utilization=VLLM_DP_EP_UTILIZATION), cfg, dp_bytes, usable, per_token, context, None))
    sglang_usable = gpu_gib - sglang_reserve_gib(gpu_gib, n)
    out.append(_fill(Layout(SGLANG, f"TP{n}", tp=n), cfg, tp_bytes, sglang_usable, per_token, context,
                     tp_refusal(cfg, n)))
    # kt-kernel's CPU experts are the way for a node whose GPUs cannot hold the model: offered when nothing above fits.
    if cluster.nodes == 1 and cluster.node.ram_gib is not None and not any(layout.fits for layout in out):
        out.append(_kt_layout(cfg, cluster, context))
    return out


def _fill(layout: Layout, cfg, weight_bytes: float, usable_gib: float, per_token: int, context: int,
          refusal: str | None) -> Layout:
    weights_gib = _gib(weight_bytes)
    cache_tokens = max(int((usable_gib - weights_gib) * GIB // per_token), 0)
    sequences = cache_tokens // context * layout.dp
    if refusal is None and weights_gib > usable_gib:
        refusal = (f"{weights_gib:,.1f} GiB of weights per GPU exceed the {usable_gib:,.1f} GiB "
                   f"{ENGINE_NAMES[layout.engine]} leaves")
    elif refusal is None and cache_tokens < context:
        refusal = (f"{weights_gib:,.1f} GiB of weights per GPU leave {usable_gib - weights_gib:,.1f} GiB of "
                   f"{usable_gib:,.1f}: cache for {cache_tokens:,} tokens, under the context of {context:,}")
    return replace(layout, weights_gib=weights_gib, usable_gib=usable_gib, cache_tokens=cache_tokens,
                   sequences=sequences, refusal=refusal)


def _kt_layout(cfg, cluster: Cluster, context: int) -> Layout:
    """Routed experts in RAM for kt-kernel (kt-method FP8 or RAWINT4: the checkpoint's own blocks or groups), the
    rest TP over the node's GPUs; what GPU memory is left after one sequence of cache takes whole experts per MoE
    layer (--kt-num-gpu-experts), split over the TP ranks."""
    w, node = weights(cfg), cluster.node
    tp, gpu_gib = node.gpus, node.gpu.memory_gib
    method = "FP8" if cfg.fp8_block else "RAWINT4" if cfg.int4_group else None
    layout = Layout(SGLANG_KT, f"TP{tp}+kt", tp=tp, ram_gib=_gib(w.experts), kt_method=method)
    ram_free = node.ram_gib - RAM_RESERVE_GIB
    refusal = tp_refusal(cfg, tp, experts_split=False)
    if method is None:
        refusal = "kt-kernel runs a block-FP8 or pack-quantized INT4 checkpoint's experts as stored; this one is bf16"
    elif refusal is None and _gib(w.experts) > ram_free:
        refusal = (f"the routed experts take {_gib(w.experts):,.1f} GiB of RAM, {node.ram_gib:,.0f} GiB less "
                   f"{RAM_RESERVE_GIB:.0f} GiB for the system leave {ram_free:,.1f}")
    usable = gpu_gib - sglang_reserve_gib(gpu_gib, tp)
    base = w.replicated + w.split / tp
    spare = usable * GIB - base - context * cfg.kv_cache_bytes_per_token
    per_expert = w.moe_layers * w.expert_bytes / tp  # one more expert in every MoE layer, on each rank
    gpu_experts = min(max(int(spare // per_expert), 0), cfg.n_routed_experts) if refusal is None else 0
    layout = _fill(layout, cfg, base + gpu_experts * per_expert, usable, cfg.kv_cache_bytes_per_token, context,
                   refusal)
    return replace(layout, gpu_experts=gpu_experts)


def smallest_fit(cfg: ModelConfig, cluster: Cluster, context: int, max_nodes: int = 16) -> Cluster | None:
    """The fewest nodes like this cluster's that some layout fits (None within max_nodes)."""
    for nodes in range(1, max_nodes + 1):
        bigger = replace(cluster, nodes=nodes, node=Node(cluster.node.gpus, cluster.node.gpu))
        if any(layout.fits for layout in layouts(cfg, bigger, context)):
            return bigger
    return None


def checkpoint_gib(cfg: ModelConfig) -> float:
    return _gib(weights(cfg).total)

