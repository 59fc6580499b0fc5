"""Projected decode and prefill tokens/s: a roofline of each part of a token's work.

Decode (one token per sequence, `batch` sequences, context c):
    t_gpu    = (GPU weight bytes read + batch x c x cache bytes/token) / GPU bandwidth
    t_cpu    = batch-deduplicated expert bytes streamed from RAM / (RAM bandwidth x kernel efficiency x NUMA factor),
               at least their weights / (cores x GGUF_WEIGHTS_PER_CORE_S) for GGUF block types (compute-bound)
               (NUMA factor: NUMA_UNSPLIT_FACTOR with several nodes, as the kernels do not split experts by node)
               + expert bytes that miss the page cache / disk bandwidth            (disk-backed experts only)
               + non-expert weights CPU torch computes / (RAM bandwidth x torch efficiency)   (no-GPU plans)
               + weight matrices the CPU kernels compute (cpu_linear) / (RAM bandwidth x kernel efficiency x NUMA
                 factor), at least their weights / (cores x GGUF_WEIGHTS_PER_CORE_S) for GGUF block types
    t_shared = shared-expert bytes / GPU bandwidth      (runs while the CPU computes the routed experts)
    t_xfer   = MoE layers x 2 x (batch x H x 2 bytes / PCIe + PCIE_LATENCY_S)   (hidden states down, results up)
    t_token  = (t_gpu - t_shared) + max(t_cpu, t_shared) + t_xfer + layers x layer overhead
    decode tokens/s = batch / t_token
Prefill (a chunk of C prompt tokens):
    t_gpu    = 2 x C x GPU-resident active params / (GPU FLOP/s x GPU_MATMUL_EFFICIENCY) + attention FLOPs likewise
    t_cpu    = MoE layers x [C x K x 6 H I / CPU FLOP/s + min(E, C x K) x expert bytes / RAM bandwidth]
    t_stream = MoE layers x max(E x expert bytes / PCIe, C x K x 6 H I / GPU FLOP/s)   in place of t_cpu's experts
               when C >= gpu_prefill_tokens (GPU prefill: experts streamed to the GPU, copy overlapping compute)
    prefill tokens/s = C / (t_gpu + t_cpu + t_stream + t_xfer + layers x overhead)
A prompt of P tokens is ceil(P / C) such chunks, each attending to the positions before it (prompt_prefill_tps,
given for 2K, 8K and 32K prompts).
With no GPU every part runs on the CPU: bytes / RAM bandwidth and FLOPs / CPU FLOP/s.
Experts the plan puts on the GPU take their share of routed traffic (`gpu_expert_share`) off the CPU.
"""

from dataclasses import dataclass, field

from hybrid.read.config import ModelConfig
from placement.hardware import Hardware

PCIE_LATENCY_S = 10e-6
GPU_MATMUL_EFFICIENCY = 0.6
NUMA_UNSPLIT_FACTOR = 0.6  # threads on every node reading one node's pages: measured elsewhere at 55-65 %
PROMPT_LENGTHS = (2048, 8192, 32768)  # the prompts a projection gives prefill tok/s for (a coding agent's range)


@dataclass(frozen=True)
class Traffic:
    """What the plan moves per token, in bytes (from the planner's placement)."""

    gpu_weight_bytes: int  # non-expert weights on the GPU read per decoded token
    gpu_shared_bytes: int  # of which the shared experts
    cpu_weight_bytes: int  # non-expert weights on the CPU read per decoded token, torch's and the kernels'
    expert_bytes: int  # one routed expert in its CPU format
    gpu_expert_share: float  # share of routed-expert traffic served by GPU-resident experts
    ram_hit_rate: float = 1.0  # share of CPU expert reads served from RAM (below 1 only for disk-backed experts)
    gpu_active_params: int = 0  # params used per token on the GPU (for prefill FLOPs)
    cpu_active_params: int = 0
    # weights per second one core's expert kernels decode when they, not RAM, set the pace (GGUF block types);
    # 0: the kernels keep up with RAM (bf16/int8/int4, measured at 62-85 % of the probe)
    kernel_weights_per_core_s: float = 0.0
    cpu_linear_bytes: int = 0  # of cpu_weight_bytes, the matrices the CPU kernels compute (cpu_linear)
    cpu_linear_block_weights: int = 0  # weights of those kept in GGUF blocks (compute-bound like GGUF experts)
    gpu_prefill_tokens: int = 0  # the plan's: prefill chunks of at least this many tokens stream experts to the GPU


@dataclass(frozen=True)
class Projection:
    decode_tps: float
    prefill_tps: float
    decode_ms: dict  # component -> ms per decode step
    prefill_ms: dict  # component -> ms per prefill chunk
    bound: str  # the part that dominates decode
    prompt_prefill_tps: dict = field(default_factory=dict)  # prompt tokens -> prefill tok/s of one such prompt


def unique_experts(n_experts: int, k: int, tokens: int) -> float:
    """Expected distinct experts touched by `tokens` independent top-k choices (uniform routing)."""
    return n_experts * (1 - (1 - k / n_experts) ** tokens)


def cpu_bandwidth(hw: Hardware) -> float:
    bw = hw.ram_bandwidth_gbps * 1e9 * hw.cpu_kernel_efficiency
    if hw.numa_nodes > 1:  # the expert kernels' threads read every expert from whichever node holds its pages
        bw *= NUMA_UNSPLIT_FACTOR
    return bw


def project(cfg: ModelConfig, hw: Hardware, tr: Traffic, context: int, batch: int = 1, chunk: int = 512) -> Projection:
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    E, K, H, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    cpu_bw = cpu_bandwidth(hw)
    overhead = cfg.num_hidden_layers * hw.layer_overhead_us * 1e-6
    cpu_share = 1 - tr.gpu_expert_share
    # decode
    experts_read = n_moe * unique_experts(E, K, batch) * cpu_share * tr.expert_bytes
    t_cpu = experts_read * tr.ram_hit_rate / cpu_bw + experts_read * (1 - tr.ram_hit_rate) / (hw.disk_read_gbps * 1e9)
    if tr.kernel_weights_per_core_s:  # decoding the blocks may take longer than reading them
        weights = n_moe * unique_experts(E, K, batch) * cpu_share * 3 * H * I
        t_cpu = max(t_cpu, weights / (hw.cores * tr.kernel_weights_per_core_s))
    t_cpu += (tr.cpu_weight_bytes - tr.cpu_linear_bytes) / (hw.ram_bandwidth_gbps * 1e9 * hw.cpu_torch_efficiency)
    t_linear = tr.cpu_linear_bytes / cpu_bw
    if tr.cpu_linear_block_weights and tr.kernel_weights_per_core_s:
        t_linear = max(t_linear, tr.cpu_linear_block_weights / (hw.cores * tr.kernel_weights_per_core_s))
    t_cpu += t_linear
    cache_read = batch * context * cfg.kv_cache_bytes_per_token
    if hw.gpu is not None:
        gpu_bw = hw.gpu.bandwidth_gbps * 1e9
        t_gpu = (tr.gpu_weight_bytes + cache_read) / gpu_bw
        t_shared = tr.gpu_shared_bytes / gpu_bw
        t_xfer = n_moe * 2 * (batch * H * 2 / (hw.gpu.pcie_gbps * 1e9) + PCIE_LATENCY_S)
    else:
        t_gpu, t_shared, t_xfer = 0.0, 0.0, 0.0
        t_cpu += cache_read / cpu_bw
    t_decode = (t_gpu - t_shared) + max(t_cpu, t_shared) + t_xfer + overhead
    decode_ms = {"gpu": 1e3 * (t_gpu - t_shared), "cpu_experts": 1e3 * t_cpu, "shared_overlapped": 1e3 * t_shared,
                 "transfers": 1e3 * t_xfer, "overhead": 1e3 * overhead}
    bound = max(("gpu", t_gpu), ("cpu_experts", t_cpu), ("transfers", t_xfer), ("overhead", overhead),
                key=lambda kv: kv[1])[0]
    # prefill: one chunk of C tokens at half the context on average
    prefill_ms = prefill_chunk_ms(cfg, hw, tr, chunk, context / 2, batch)
    prompts = {n: prompt_prefill_tps(cfg, hw, tr, n, chunk) for n in PROMPT_LENGTHS if n <= context}
    return Projection(batch / t_decode, chunk * batch / (sum(prefill_ms.values()) / 1e3), decode_ms, prefill_ms,
                      bound, prompts)


def stream_seconds(cfg: ModelConfig, hw: Hardware, tr: Traffic) -> float:
    """Seconds to stream one MoE layer's routed experts over PCIe (GPU prefill)."""
    return cfg.n_routed_experts * tr.expert_bytes / (hw.gpu.pcie_gbps * 1e9)


def gpu_prefill_threshold(cfg: ModelConfig, hw: Hardware, tr: Traffic) -> int:
    """The fewest tokens per prefill chunk from which streaming a MoE layer's experts to the GPU takes less time than
    the CPU computing them: stream_seconds <= C K 6 H I / CPU FLOP/s + the expert bytes read from RAM (all of them at
    such chunk sizes), rounded up to a multiple of 64."""
    K, H, I = cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    read_s = cfg.n_routed_experts * tr.expert_bytes * (1 - tr.gpu_expert_share) / cpu_bandwidth(hw)
    tokens = max(stream_seconds(cfg, hw, tr) - read_s, 0.0) * hw.cpu_flops / (K * 6 * H * I)
    return max(64, -(-int(tokens) // 64) * 64)


def prefill_chunk_ms(cfg: ModelConfig, hw: Hardware, tr: Traffic, C: int, context: float, batch: int = 1) -> dict:
    """Milliseconds per component of one prefill chunk of C tokens (per sequence) attending to `context` positions
    on average. A chunk of at least tr.gpu_prefill_tokens streams the experts to the GPU: per MoE layer the slower
    of the copy and the GPU's GEMMs (the next layer's copy overlaps this layer's compute)."""
    n_moe = cfg.num_hidden_layers - cfg.first_k_dense_replace
    E, K, H, I = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    overhead = cfg.num_hidden_layers * hw.layer_overhead_us * 1e-6
    cpu_share = 1 - tr.gpu_expert_share
    expert_flops = n_moe * C * batch * K * 6 * H * I * cpu_share
    attn_flops = cfg.num_hidden_layers * 2 * C * batch * context * cfg.num_attention_heads * (
        2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    gpu_flops = hw.gpu.bf16_tflops * 1e12 * GPU_MATMUL_EFFICIENCY if hw.gpu is not None else 0.0
    streamed = hw.gpu is not None and tr.gpu_prefill_tokens and C >= tr.gpu_prefill_tokens
    t_cpu_p, t_stream = 2 * C * batch * tr.cpu_active_params / hw.cpu_flops, 0.0
    if streamed:
        t_stream = n_moe * max(stream_seconds(cfg, hw, tr), expert_flops / n_moe / gpu_flops)
    else:
        touched = n_moe * unique_experts(E, K, C * batch) * cpu_share * tr.expert_bytes
        t_cpu_p += expert_flops / hw.cpu_flops + touched / cpu_bandwidth(hw)
    if hw.gpu is not None:
        t_gpu_p = (2 * C * batch * tr.gpu_active_params + attn_flops) / gpu_flops
        t_xfer_p = 0.0 if streamed else n_moe * 2 * (C * batch * H * 2 / (hw.gpu.pcie_gbps * 1e9) + PCIE_LATENCY_S)
    else:
        t_gpu_p, t_xfer_p = 0.0, 0.0
        t_cpu_p += attn_flops / hw.cpu_flops
    return {"gpu": 1e3 * t_gpu_p, "cpu_experts": 1e3 * t_cpu_p, "streamed_experts": 1e3 * t_stream,
            "transfers": 1e3 * t_xfer_p, "overhead": 1e3 * overhead}


def prompt_prefill_tps(cfg: ModelConfig, hw: Hardware, tr: Traffic, prompt: int, chunk: int) -> float:
    """Prefill tokens/s of one prompt of `prompt` tokens, fed `chunk` tokens per forward (the last chunk shorter),
    each chunk attending to the positions before it."""
    total_s, start = 0.0, 0
    while start < prompt:
        C = min(chunk, prompt - start)
        total_s += sum(prefill_chunk_ms(cfg, hw, tr, C, start + C / 2).values()) / 1e3
        start += C
    return prompt / total_s
