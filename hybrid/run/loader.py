"""Build the model on the meta device and materialise every tensor where the plan puts it, by name.

Without a plan every tensor goes to one device in one dtype (the plain torch model, used by tests as the
reference path). With a plan (placement.plan.Plan), per tensor: the first matching rule's device and format;
routed experts whose kernel is `cpu_moe` become cpu_kernels.MoEExperts (from a converted expert store when
given, else quantized from the checkpoint at load), wrapped in HybridExperts with any experts the plan puts
on the GPU; `fp8` projections stay block-FP8 (Fp8Linear). A plan device "cuda:N" falls back to the CPU when
this machine has no such GPU, so every plan runs here the way it would run there. A plan with `expert_backing:
disk` needs the store: its memory map lets the page cache hold what fits, where quantizing at load would not.
The router's weight and correction bias stay float32 whatever the dtype, as the reference keeps them.
"""

import torch
from torch import nn

from hybrid.read import names
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.gguf import GGUFCheckpoint
from hybrid.read.open import open_checkpoint
from hybrid.errors import CheckpointError, PlanError
from hybrid.run.blocks import BlockEmbedding, BlockLinear
from hybrid.run.experts import HybridExperts
from hybrid.run.layers import MLP, Fp8Linear, MoE
from hybrid.run.model import DeepseekV3ForCausalLM
from placement.hardware import device_here
from placement.memory import GGUF
from placement.plan import ATTENTION_TENSOR

FP32_ALWAYS = ("mlp.gate.weight", "e_score_correction_bias")
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
    """fp32 only when the plan keeps the attention in fp32; bf16 otherwise (fp8 computes in bf16). Attention kept
    in GGUF blocks (cpu_gguf, computed in float32 whatever the activations) follows the final norm's rule."""
    rule = plan.rule_for(ATTENTION_TENSOR)
    if rule is not None and rule.kernel == "cpu_gguf":
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
        _install_cpu_experts(model, ckpt, plan, store, dtype)
        _install_gguf_blocks(model, ckpt, plan, dtype)
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
    if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
        raise CheckpointError(f"{ckpt.tensors[name].path}: tensor {name} holds NaN or inf values")
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


def _install_cpu_experts(model, ckpt, plan, store, dtype):
    """Replace each MoE layer's TorchExperts by HybridExperts where the plan runs its experts on cpu_moe."""
    from cpu_kernels import KernelThreads, MoEExperts, parse_format

    cfg = ckpt.config
    store_layers = _store_layers(store, ckpt) if store is not None else {}
    workers = {}  # one kernel worker (threads + scratch) per thread count, shared by the layers that run in turn
    for layer in cfg.moe_layers:
        rules = {e: plan.rule_for(names.expert_key(layer, e, "up_proj")) for e in range(cfg.n_routed_experts)}
        cpu_rules = [r for r in rules.values() if r is not None and r.kernel == "cpu_moe"]
        if not cpu_rules:
            continue
        if len({r.format for r in cpu_rules}) > 1:
            raise PlanError(f"{plan.source}: layer {layer} puts its CPU experts in several formats; one per layer")
        rule = cpu_rules[0]
        threads = int(rule.options.get("threads", plan.settings.cpu_threads))
        worker = workers.setdefault(threads, KernelThreads(threads))
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


def _install_gguf_blocks(model, ckpt, plan, dtype):
    """Weight matrices the plan computes from their GGUF blocks (kernel cpu_gguf) become BlockLinear or
    BlockEmbedding modules over the memory-mapped blocks. One stored as floats, or in a type or shape the kernels
    do not read, stays an ordinary parameter and is loaded (dequantized) with the rest."""
    from cpu_kernels import KernelThreads
    from cpu_kernels.dense import DenseMatrix
    from cpu_kernels.formats import Format, check_matrix

    worker = None  # its own threads: the shared expert runs while the routed experts' worker is busy
    for name, _ in list(model.named_parameters()):
        rule = plan.rule_for(name)
        if rule is None or rule.kernel != "cpu_gguf":
            continue
        if name == "model.embed_tokens.weight" and ckpt.config.tie_word_embeddings:
            continue  # the head multiplies by the table itself
        n_out, n_in = ckpt.tensors[name].shape
        try:  # a type without kernels (F32, BF16, Q4_0, ...) or kv_b_proj (rebuilt from two tensors): loaded below
            type_name, blocks = ckpt.blocks(name)
            check_matrix(Format(type_name), n_out, n_in)
        except ValueError:
            continue
        if worker is None:
            worker = KernelThreads(int(rule.options.get("threads", plan.settings.cpu_threads)))
        matrix = DenseMatrix.from_blocks(Format(type_name), blocks, n_in, worker)
        module_name = name.rpartition(".")[0]
        parent, _, leaf = module_name.rpartition(".")
        block = BlockEmbedding(matrix, dtype) if name == "model.embed_tokens.weight" else BlockLinear(matrix)
        setattr(model.get_submodule(parent), leaf, block)


def _store_layers(store, ckpt) -> dict:
    from hybrid.read.expert_store import open_store_layers

    return open_store_layers(store, ckpt)  # refuses a store converted from another checkpoint
