"""Build the model on the meta device and materialise every tensor where the plan puts it, by name.

Without a plan every tensor goes to one device in one dtype (the plain torch model, used by tests as the
reference path). With a plan (placement.plan.Plan), per tensor: the first matching rule's device and format;
routed experts whose kernel is `cpu_moe` become cpu_kernels.MoEExperts (from a converted expert store when
given, else quantized from the checkpoint at load), wrapped in HybridExperts with any experts the plan puts
on the GPU; `fp8` projections stay block-FP8 (Fp8Linear); weight matrices whose kernel is `cpu_linear` become
BlockLinear modules on the CPU kernels (kv_b_proj: AbsorbedKvB, MLA's per-head products), quantized here or a
GGUF's blocks as stored. A plan device "cuda:N" falls back to the CPU when
this machine has no such GPU, so every plan runs here the way it would run there. A plan with `expert_backing:
disk` needs the store: its memory map lets the page cache hold what fits, where quantizing at load would not.
The router's weight and correction bias stay float32 whatever the dtype, as the reference keeps them.
"""

import numpy as np
import torch
from torch import nn

from hybrid.read import names
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.gguf import GGUFCheckpoint
from hybrid.read.open import open_checkpoint
from hybrid.errors import CheckpointError, PlanError
from hybrid.run.blocks import AbsorbedKvB, BlockEmbedding, BlockLinear
from hybrid.run.experts import HybridExperts
from hybrid.run.layers import MLP, Fp8Linear, MoE
from hybrid.run.model import DeepseekV3ForCausalLM
from placement.hardware import device_here
from placement.memory import GGUF, STAGING_SLOT_BYTES, absorbed_shapes, is_kv_b, linear_format
from placement.plan import ATTENTION_TENSOR, LINEAR_KERNELS, cpu_threads

FP32_ALWAYS = ("mlp.gate.weight", "e_score_correction_bias")
# Experts smaller than this (test checkpoints) skip the GEMM crossover measurement: per-call overheads, not the
# arithmetic, decide there, and a model that small prefills in milliseconds either way.
GEMM_MEASURE_MIN_BYTES = 1 << 20
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def torch_device(name: str) -> torch.device:
    """The torch device for a plan device name, by placement's rule (hardware.device_here): a GPU this machine
    does not have runs on the CPU. load_checked_plan applies the same rule and notes it for the front end."""
    return torch.device(device_here(name, torch.cuda.device_count() if torch.cuda.is_available() else 0))


def cache_device(plan) -> torch.device:
    """Where the MLA cache belongs: the plan's cache_device (the attention's device); the CPU without a plan."""
    return torch_device(plan.cache_device) if plan is not None else torch.device("cpu")


def _check_backing(plan, store, cfg):
    """Disk-backed experts are the store's memory map, paged in as used; quantizing at load would hold every
    expert in RAM, which the plan says does not fit. A GGUF checkpoint is its own memory map."""
    if (plan.settings.expert_backing == "disk" and store is None and not cfg.gguf
            and any(r.kernel == "cpu_moe" for r in plan.rules)):
        raise PlanError(f"{plan.source}: expert_backing disk keeps routed experts memory-mapped from an expert "
                        f"store: give one (--store, from hybrid convert); quantizing at load would hold them in RAM")


def compute_dtype(plan, cfg) -> torch.dtype:
    """fp32 only when the plan keeps the attention in fp32; bf16 otherwise (fp8 computes in bf16). Attention on the
    CPU kernels (cpu_linear, computed in float32 whatever the activations) follows the final norm's rule."""
    rule = plan.rule_for(ATTENTION_TENSOR)
    if rule is not None and rule.kernel in LINEAR_KERNELS:
        rule = plan.rule_for("model.norm.weight")
    return torch.float32 if rule is not None and rule.format == "fp32" else torch.bfloat16


def load_model(checkpoint, plan=None, store=None, dtype=torch.float32, progress=None) -> DeepseekV3ForCausalLM:
    """checkpoint: a Checkpoint or a folder; plan: a placement Plan or None; store: a converted expert-store
    folder for the cpu_moe experts (else they are quantized from the checkpoint). progress(done, total)."""
    ckpt = checkpoint if isinstance(checkpoint, (Checkpoint, GGUFCheckpoint)) else open_checkpoint(checkpoint)
    cfg = ckpt.config
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    if plan is not None:
        _check_backing(plan, store, cfg)
        dtype = compute_dtype(plan, cfg)
        worker = kernel_worker(plan)
        _install_cpu_experts(model, ckpt, plan, store, dtype, worker)
        _install_prefill_paths(model, plan)
        _install_cpu_linears(model, ckpt, plan, dtype, worker)
    params = dict(model.named_parameters())
    unknown = set(params) - set(names.expected_tensors(cfg))
    if unknown:  # the model and names.py disagree: a bug here, not in the user's files
        raise RuntimeError(f"model parameters missing from names.expected_tensors: {sorted(unknown)[:5]}")
    for i, name in enumerate(params):
        rule = plan.rule_for(name) if plan is not None else None
        device = torch_device(rule.device) if rule is not None else torch.device("cpu")
        if rule is not None and rule.format == "fp8" and ckpt.is_fp8(name):
            _install_fp8(model, ckpt, name, device)
        else:
            want = torch.float32 if name.endswith(FP32_ALWAYS) else dtype
            _set_param(model, name, _checked(ckpt, name, ckpt.weight(name, want)).to(device))
        if progress is not None:
            progress(i + 1, len(params))
    if plan is not None:
        model.set_deferral(plan.settings.defer_experts)
    return model.eval()


def _checked(ckpt, name, tensor):
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        info = ckpt.tensors.get(name)  # a pack-quantized expert's weight is computed from its stored parts
        raise CheckpointError(f"{info.path if info else ckpt.folder}: tensor {name} holds NaN or inf values")
    return tensor


def _set_param(model, name, tensor):
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)


def _install_fp8(model, ckpt, name, device):
    module_name = name.rpartition(".")[0]
    parent_name, _, leaf = module_name.rpartition(".")
    w = ckpt.raw(name).to(device)
    s = ckpt.raw(names.scale_name(name)).float().to(device)
    setattr(model.get_submodule(parent_name), leaf, Fp8Linear(w, s, ckpt.config.fp8_block))


def kernel_worker(plan):
    """The model's one CPU-kernel worker (None without CPU-kernel rules), shared by its routed experts and its
    weight matrices on the kernels: cpu_threads(plan) threads. Its calls run while the model's thread goes on
    only when torch computes on a GPU meanwhile; on a CPU-only plan torch would compute on the same cores, so the
    two take turns (cpu_kernels/threads.py; hybrid/generation/threads.py gives torch its share)."""
    from cpu_kernels import KernelThreads

    n_threads = cpu_threads(plan)
    return KernelThreads(n_threads, overlap=overlaps_torch(plan)) if n_threads else None


def overlaps_torch(plan) -> bool:
    """Whether the CPU kernels compute while torch does (the plan's attention is on a GPU)."""
    return cache_device(plan).type != "cpu"


def _install_cpu_experts(model, ckpt, plan, store, dtype, worker):
    """Replace each MoE layer's TorchExperts by HybridExperts where the plan runs its experts on cpu_moe."""
    from cpu_kernels import MoEExperts, parse_format

    cfg = ckpt.config
    store_layers = _store_layers(store, ckpt) if store is not None else {}
    for layer in cfg.moe_layers:
        rules = {e: plan.rule_for(names.expert_key(layer, e, "up_proj")) for e in range(cfg.n_routed_experts)}
        cpu_rules = [r for r in rules.values() if r is not None and r.kernel == "cpu_moe"]
        if not cpu_rules:
            continue
        if len({r.format for r in cpu_rules}) > 1:
            raise PlanError(f"{plan.source}: layer {layer} puts its CPU experts in several formats; one per layer")
        rule = cpu_rules[0]
        if rule.format == GGUF:
            cpu = MoEExperts(_gguf_layer(ckpt, layer), threads=worker)
        elif layer in store_layers:
            cpu = MoEExperts.from_store(store_layers[layer], threads=worker)
            if cpu.fmt != parse_format(rule.format):
                raise PlanError(f"{store_layers[layer]}: expert store holds {cpu.fmt}, the plan asks for "
                                f"{parse_format(rule.format)}")
        else:
            cpu = MoEExperts(_quantized_layer(ckpt, layer, parse_format(rule.format)), threads=worker)
        with torch.device("meta"):
            gpu = {e: MLP(cfg.hidden_size, cfg.moe_intermediate_size)
                   for e, r in rules.items() if r is not None and r.kernel != "cpu_moe"}
        moe: MoE = model.model.layers[layer].mlp
        moe.experts = HybridExperts(cpu, cfg.n_routed_experts, gpu)


def _install_prefill_paths(model, plan):
    """The CPU experts' paths for long prefill chunks: streaming to the GPU from the plan's gpu_prefill_tokens, and
    dense GEMMs in CPU torch from the token count this machine's measurement says they win at (none: off)."""
    from hybrid.run.expert_gemm import DenseScratch, ExpertGemm, measure_crossover
    from hybrid.run.expert_streaming import ExpertStreamer, group_size

    layers = {i: layer.mlp.experts for i, layer in enumerate(model.model.layers)
              if isinstance(getattr(layer.mlp, "experts", None), HybridExperts)}
    if not layers:
        return
    first = next(iter(layers.values())).cpu
    if plan.settings.gpu_prefill_tokens:
        stores = {i: experts.cpu.store for i, experts in layers.items()}
        try:
            streamer = ExpertStreamer(stores, cache_device(plan), plan.settings.gpu_prefill_tokens,
                                      group_size(first.store, STAGING_SLOT_BYTES))
        except ValueError as e:
            raise PlanError(f"{plan.source}: gpu_prefill_tokens {plan.settings.gpu_prefill_tokens}: {e}") from None
        for i, experts in layers.items():
            experts.streamer, experts.layer = streamer, i
    if first.expert_nbytes < GEMM_MEASURE_MIN_BYTES:
        return
    scratch = DenseScratch()
    min_tokens = measure_crossover(first, scratch)
    if min_tokens is not None:
        for experts in layers.values():
            experts.gemm = ExpertGemm(experts.cpu, min_tokens, scratch)


def _quantized_layer(ckpt, layer, fmt):
    """One layer's experts quantized into an in-memory expert store, one expert at a time (memory: the store
    itself, never the layer in float): the no-conversion path, through the converter's quantize_layer."""
    from cpu_kernels.store import MemoryLayerWriter
    from hybrid.read.convert import quantize_layer

    cfg = ckpt.config
    writer = MemoryLayerWriter(fmt, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    return quantize_layer(ckpt, layer, writer)


def _gguf_layer(ckpt, layer):
    """One layer's routed experts of a GGUF checkpoint for the CPU kernels: its blocks as the file stores them
    (zero-copy views of the memory map) when the kernels read their types, else (float experts, or a type
    without kernels such as TQ2_0 or IQ4_NL) dequantized into an in-memory bf16 store, one expert at a time."""
    from cpu_kernels.formats import GGUF_NAMES, Format
    from cpu_kernels.store import ExpertStore

    cfg, blocks = ckpt.config, ckpt.expert_blocks(layer)
    if all(type_name in GGUF_NAMES for type_name, _ in blocks.values()):
        formats = {proj: Format(type_name) for proj, (type_name, _) in blocks.items()}
        try:
            return ExpertStore.from_blocks(formats, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                           {proj: view for proj, (_, view) in blocks.items()})
        except ValueError:  # a shape the block kernels' tiles do not divide: the copy below
            pass
    return _quantized_layer(ckpt, layer, Format("bf16"))


def _install_cpu_linears(model, ckpt, plan, dtype, worker):
    """Weight matrices the plan computes on the CPU kernels (kernel cpu_linear, or cpu_gguf, its earlier name)
    become BlockLinear modules (kv_b_proj: AbsorbedKvB; a GGUF's embedding: BlockEmbedding): a GGUF's over its
    memory-mapped blocks, others quantized here from the checkpoint. A matrix the kernels cannot take stays an
    ordinary parameter and is loaded with the rest (_linear_source says which)."""
    for name, _ in list(model.named_parameters()):
        rule = plan.rule_for(name)
        if rule is None or rule.kernel not in LINEAR_KERNELS:
            continue
        if name == "model.embed_tokens.weight" and ckpt.config.tie_word_embeddings:
            continue  # the head multiplies by the table itself
        source = _linear_source(ckpt, name, rule.format)
        if source is None:
            continue
        module_name = name.rpartition(".")[0]
        parent, _, leaf = module_name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, _linear_module(ckpt, name, source, dtype, worker))


def _linear_source(ckpt, name, fmt_name):
    """What a cpu_linear matrix is built from, or None to load it as a torch parameter: ("blocks", Format, blocks)
    for a GGUF type with kernels; ("quantize", formats) to quantize it, kv_b_proj's two per-head halves each in its
    own format (placement.memory.linear_format: the format's group its inputs divide). None for a GGUF type without
    kernels (F32, BF16, Q4_0, ...) or a GGUF kv_b_proj rebuilt from two tensors, and for inputs no group divides."""
    from cpu_kernels.formats import Format, check_matrix, parse_format

    n_out, n_in = ckpt.tensors[name].shape
    if fmt_name == GGUF:
        try:
            type_name, blocks = ckpt.blocks(name)
            check_matrix(Format(type_name), n_out, n_in)
        except ValueError:
            return None
        return "blocks", Format(type_name), blocks
    fmt = parse_format(fmt_name)
    shapes = absorbed_shapes(ckpt.config) if is_kv_b(name) else ((n_out, n_in),)
    formats = tuple(linear_format(fmt, shape_in) for _, shape_in in shapes)
    return None if None in formats else ("quantize", formats)


def _linear_module(ckpt, name, source, dtype, worker) -> nn.Module:
    from cpu_kernels.dense import DenseMatrix, DenseStack

    n_in = ckpt.tensors[name].shape[1]
    if source[0] == "blocks":
        matrix = DenseMatrix.from_blocks(source[1], source[2], n_in, worker)
        return BlockEmbedding(matrix, dtype) if name == "model.embed_tokens.weight" else BlockLinear(matrix)
    w = _linear_weight(ckpt, name)
    formats = source[1]
    if not is_kv_b(name):
        return BlockLinear(DenseMatrix.quantized(formats[0], w, worker))
    cfg = ckpt.config
    N = cfg.qk_nope_head_dim
    heads = w.reshape(cfg.num_attention_heads, N + cfg.v_head_dim, cfg.kv_lora_rank)
    key_half = np.ascontiguousarray(heads[:, :N].transpose(0, 2, 1))  # [Hh, R, N]
    return AbsorbedKvB(DenseStack.quantized(formats[0], key_half, worker),
                       DenseStack.quantized(formats[1], heads[:, N:], worker))


def _linear_weight(ckpt, name) -> np.ndarray:
    """The weights a cpu_linear matrix is quantized from, as the reference model reads them: bf16 bits (uint16) for
    bf16 and block-FP8 tensors (Checkpoint.weight dequantizes FP8 per 128x128 block to bf16), else float32."""
    t = ckpt.weight(name, torch.bfloat16) if ckpt.is_fp8(name) else ckpt.raw(name)
    _checked(ckpt, name, t)
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    return t.float().contiguous().numpy()


def _store_layers(store, ckpt) -> dict:
    from hybrid.read.expert_store import open_store_layers

    return open_store_layers(store, ckpt)  # refuses a store converted from another checkpoint
