"""Exact bytes of a model config's tensor groups in each storage format, plus cache and workspace.

Groups: embed, lm_head, attention (MLA projections + their norms), norms (per-layer and final), router
(gate.weight + correction bias, kept in fp32), shared_experts, dense_mlp (the first_k_dense_replace layers),
routed_experts. Formats: bf16 and fp32 for GPU/CPU torch tensors; block-FP8 as stored in the checkpoint (one
byte per value plus an fp32 scale per 128x128 block); the CPU expert store's bf16/int8/int4 (tile padding and
group scales included, sizes from cpu_kernels.formats); gguf, a GGUF checkpoint's tensors in the types its file
stores them in (ModelConfig.stored_types, block sizes from gguf's own table). A weight matrix the CPU kernels
compute (plan kernel cpu_linear) takes the same store formats, with the group its input width divides
(`linear_format`), and kv_b_proj is kept as MLA's per-head absorbed products (`absorbed_shapes`).
"""

import re
from functools import lru_cache

from cpu_kernels.formats import WRITABLE_NAMES, Format, matrix_bytes, parse_format
from cpu_kernels.formats.gguf import block_geometry
from hybrid.errors import PlanError
from hybrid.read.config import ModelConfig
from hybrid.read.names import expected_tensors, expert_key, int4_stored, parse_expert_key, quantizable, stored_key

GIB = 2**30
GGUF = "gguf"  # the plan format of a GGUF checkpoint's tensors kept as stored
FLOAT_TYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}  # GGUF's unblocked types
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + torch allocator slack, seen on 24-80 GB cards
TORCH_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
GROUPS = ("embed", "lm_head", "attention", "norms", "router", "shared_experts", "dense_mlp", "routed_experts")

_GROUP_RULES = (
    ("routed_experts", re.compile(r"\.mlp\.experts\.")),
    ("shared_experts", re.compile(r"\.mlp\.shared_experts\.")),
    ("router", re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")),
    ("dense_mlp", re.compile(r"\.mlp\.(gate|up|down)_proj\.")),
    ("attention", re.compile(r"\.self_attn\.")),
    ("embed", re.compile(r"^model\.embed_tokens\.")),
    ("lm_head", re.compile(r"^lm_head\.")),
    ("norms", re.compile(r"norm\.weight$")),
)


def group_of(name: str) -> str:
    for group, pattern in _GROUP_RULES:
        if pattern.search(name):
            return group
    raise ValueError(f"tensor {name} belongs to no group")


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_bytes(name: str, shape, fmt: str, cfg: ModelConfig | None = None) -> int:
    """Bytes of one tensor stored in `fmt` (bf16, fp32, fp8, an expert-store format like int4 / int8-g64, or
    gguf: as a GGUF checkpoint stores it, which needs that checkpoint's `cfg`)."""
    if group_of(name) == "router":
        return 4 * numel(shape)  # routers stay fp32 whatever the plan says
    if fmt == GGUF:
        return stored_bytes(cfg, name, shape)
    if fmt in TORCH_BYTES:
        return TORCH_BYTES[fmt] * numel(shape)
    if fmt == "fp8":
        if len(shape) == 1:
            return 2 * numel(shape)
        return numel(shape) + 4 * (-(-shape[0] // 128)) * (-(-shape[1] // 128))
    return matrix_bytes(parse_format(fmt), shape[0], shape[1])


def checkpoint_bytes(cfg: ModelConfig, name: str, shape) -> int:
    """Bytes of tensor `name` [shape] as the checkpoint stores it, which is how vLLM and SGLang hold it on a GPU:
    block-FP8 weights with their fp32 block scales, pack-quantized INT4 experts (int32 words of 8 codes, a bf16 scale
    per group, the [2] shape as compressed-tensors writes it, int64), a GGUF's types, the rest in the checkpoint's
    16-bit dtype; the router's correction bias is fp32 in every DeepSeek-V3-family checkpoint."""
    if cfg.gguf:
        return stored_bytes(cfg, name, shape)
    if name.endswith("e_score_correction_bias"):
        return 4 * numel(shape)
    if cfg.int4_group and int4_stored(name, cfg):
        n_out, n_in = shape
        return n_out * n_in // 2 + 2 * n_out * (n_in // cfg.int4_group) + 16
    if cfg.fp8_block and quantizable(name):
        rows, cols = cfg.fp8_block
        return numel(shape) + 4 * (-(-shape[0] // rows)) * (-(-shape[1] // cols))
    return TORCH_BYTES["fp32" if cfg.torch_dtype in ("float32", "fp32") else "bf16"] * numel(shape)


_STORED: dict[int, tuple] = {}  # id(cfg) -> (cfg, its stored_types as a dict)


def _stored_types(cfg: ModelConfig) -> dict:
    # By identity: hashing a config hashes its ~1,000 stored types, and this runs once per tensor (K2: 70k).
    hit = _STORED.get(id(cfg))
    if hit is None or hit[0] is not cfg:
        if len(_STORED) >= 16:
            _STORED.clear()
        hit = _STORED[id(cfg)] = (cfg, dict(cfg.stored_types))
    return hit[1]


def linear_format(fmt: Format, n_in: int) -> Format | None:
    """The format a matrix with n_in inputs is kept in by kernel cpu_linear: `fmt`, else (n_in not a multiple of its
    group) the same format with the largest group that divides n_in; None when none does (the matrix then stays
    a torch bf16 parameter). The loader and the byte accounting both ask this."""
    groups = [fmt.group_size] + sorted((g for g in fmt.spec.group_sizes if g != fmt.group_size), reverse=True)
    for group in groups:
        candidate = Format(fmt.name, group)
        if n_in % candidate.spec.input_multiple(group) == 0:
            return candidate
    return None


def absorbed_shapes(cfg: ModelConfig) -> tuple[tuple[int, int], tuple[int, int]]:
    """kv_b_proj [heads x (N + V), R] as the CPU kernels keep it, one pair of matrices per head: the key half
    transposed, [R, N] (q_nope -> its latent query), and the value half, [V, R] (attention output latent -> values)."""
    R = cfg.kv_lora_rank
    return (R, cfg.qk_nope_head_dim), (cfg.v_head_dim, R)


def is_kv_b(name: str) -> bool:
    return name.endswith(".self_attn.kv_b_proj.weight")


def linear_bytes(name: str, shape, fmt_name: str, cfg: ModelConfig) -> int:
    """Bytes of weight matrix `name` [shape] as kernel cpu_linear keeps it in format `fmt_name` (bf16, int8, int4
    with a group): tile padding and scales included, kv_b_proj as its per-head absorbed matrices, a matrix no
    group of the format divides as torch bf16."""
    fmt = parse_format(fmt_name)

    def one(n_out, n_in):
        kept = linear_format(fmt, n_in)
        return matrix_bytes(kept, n_out, n_in) if kept is not None else TORCH_BYTES["bf16"] * n_out * n_in

    if is_kv_b(name):
        (uk_out, uk_in), (uv_out, uv_in) = absorbed_shapes(cfg)
        return cfg.num_attention_heads * (one(uk_out, uk_in) + one(uv_out, uv_in))
    return one(*shape)


def stored_bytes(cfg: ModelConfig | None, name: str, shape) -> int:
    """Bytes of tensor `name` [shape] in the type its GGUF checkpoint stores it in (blocks of that type)."""
    if cfg is None or not cfg.gguf:
        raise PlanError(f"format {GGUF} keeps tensors as a GGUF checkpoint stores them; "
                        f"{cfg.source if cfg else 'this model'} is not a GGUF checkpoint")
    type_name = _stored_types(cfg).get(stored_key(name))
    if type_name is None:
        raise PlanError(f"{cfg.source}: the GGUF holds no tensor for {name}")
    if type_name in FLOAT_TYPE_BYTES:
        return FLOAT_TYPE_BYTES[type_name] * numel(shape)
    block, block_bytes = block_geometry(type_name)
    return numel(shape) // block * block_bytes


@lru_cache(maxsize=16)
def _tensors(cfg: ModelConfig):
    return tuple(expected_tensors(cfg).items())


def tensors(cfg: ModelConfig):
    """(name, shape) of every tensor the model reads, cached per config (K2 has ~70k)."""
    return _tensors(cfg)


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    counts = dict.fromkeys(GROUPS, 0)
    for name, shape in tensors(cfg):
        counts[group_of(name)] += numel(shape)
    return counts


def expert_bytes(cfg: ModelConfig, fmt: str) -> int:
    """One routed expert (gate, up, down) in `fmt`; for gguf, the mean over the MoE layers of what one expert
    of each layer really takes (dynamic quants store layers in different types)."""
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I)))
    if fmt == GGUF:
        total = sum(stored_bytes(cfg, expert_key(layer, 0, p), s) for layer in cfg.moe_layers for p, s in shapes)
        return total // max(len(cfg.moe_layers), 1)
    return sum(tensor_bytes(f"x.mlp.experts.0.{p}.weight", s, fmt) for p, s in shapes)


# GPU prefill (settings.gpu_prefill_tokens) streams experts through two slots of this size, on the GPU and pinned in
# RAM: ~22 K2 int4 experts each, a copy long enough (~20 ms) to run PCIe at full speed, small beside a 24 GB card.
STAGING_SLOT_BYTES = 1 << 29


def staging_bytes(settings) -> int:
    """GPU memory GPU prefill reserves for its two staging slots (0 when the plan does not stream)."""
    return 2 * STAGING_SLOT_BYTES if settings.gpu_prefill_tokens else 0


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * dtype_bytes * context * batch


# Keys per attention block in a prefill chunk (hybrid.run.attention_core). A block's fp32 scores are
# [heads, chunk, KEY_BLOCK]: 0.5 GiB for K2's 64 heads at a 512-token chunk, so a 128K prompt prefills 512 tokens
# per forward within the workspace share of a 24 GB card (full scores would allow 16), while one block's products
# (512 queries x 4096 keys x 512 latent) still keep a GPU busy and 128K takes only 32 iterations of Python.
KEY_BLOCK = 4096
# A forward of fewer queries per row (decode: one) takes proportionally more keys per block, up to
# BLOCK_QUERIES x KEY_BLOCK scores per row and head: decode at 128K then reads the cache as one block, one
# kernel per product, instead of 32 Python-level iterations per layer (61 layers: ~20k kernel launches a token).
BLOCK_QUERIES = 64
# A chunk of more queries than this (GPU prefill wants chunks of 1-8K tokens: the experts' copy over PCIe is paid
# once per chunk) takes proportionally fewer keys per block, down to MIN_KEY_BLOCK, so its scores stay the size
# of a 512-token chunk's and the chunk is bounded by the rest of the workspace instead.
FULL_BLOCK_QUERIES = 512
MIN_KEY_BLOCK = 512


def key_block(n_queries: int) -> int:
    """Keys per attention block for n_queries new tokens per row; the runtime and the workspace bound both ask."""
    if n_queries > FULL_BLOCK_QUERIES:
        return max(MIN_KEY_BLOCK, KEY_BLOCK * FULL_BLOCK_QUERIES // n_queries)
    return KEY_BLOCK * max(1, BLOCK_QUERIES // max(n_queries, 1))


def workspace_bytes(cfg: ModelConfig, context: int, chunk: int, batch: int = 1) -> int:
    """Peak activations of one prefill chunk: the fp32 attention scores of one key block [heads, chunk, block]
    (twice: the bf16 products before their fp32 cast and the cast take as much again) and the online softmax's
    fp32 accumulators [chunk, heads, kv_lora_rank] (the running output and one block's share of it); plus a
    dozen [chunk, max(width)] bf16 buffers and the fp32 logits of one token."""
    Hh = cfg.num_attention_heads
    scores = 2 * 4 * Hh * chunk * min(context, key_block(chunk)) * batch
    accumulators = 2 * 4 * Hh * cfg.kv_lora_rank * chunk * batch
    width = max(cfg.hidden_size, cfg.intermediate_size, Hh * cfg.qk_head_dim)
    return scores + accumulators + 12 * 2 * chunk * width * batch + 4 * cfg.vocab_size * batch


def largest_chunk(cfg: ModelConfig, context: int, budget_bytes: int, batch: int = 1) -> int:
    """The largest power-of-two prefill chunk (16..2048) whose workspace fits the budget."""
    chunk = 2048
    while chunk > 16 and workspace_bytes(cfg, context, chunk, batch) > budget_bytes:
        chunk //= 2
    return chunk


def is_routed_expert(name: str) -> bool:
    return parse_expert_key(name) is not None


def check_expert_format(cfg, fmt_name: str, whose: str, folder) -> None:
    """The CPU kernels read an expert's inputs (hidden_size for gate and up, the expert width for down) in
    whole groups of its format: refuse a model that does not divide, naming a format that fits."""
    if (fmt_name == GGUF) != cfg.gguf:
        raise PlanError(f"{folder}: a GGUF checkpoint's routed experts run as stored (expert format {GGUF}); "
                        f"{whose} asks for {fmt_name}" if cfg.gguf else
                        f"{whose}: expert format {GGUF} is for GGUF checkpoints; {folder} is not one")
    if fmt_name == GGUF:
        return
    try:
        fmt = parse_format(fmt_name)
    except ValueError as e:
        raise PlanError(f"{whose}: expert_format {fmt_name!r}: {e}") from None
    widths = _expert_inputs(cfg)
    if _fits(cfg, fmt):
        return
    what, n = next((k, n) for k, n in widths.items() if n % fmt.spec.input_multiple(fmt.group_size))
    other = fitting_format(cfg, fmt.name)
    hint = (f"; plan one that fits: hybrid plan {folder} --experts {other} -o plan.yaml, then --plan plan.yaml"
            if other else "")
    raise PlanError(f"{folder}: {what} {n} is not a multiple of {fmt.spec.input_multiple(fmt.group_size)}, "
                    f"which {whose}'s {fmt} experts need{hint}")


def _expert_inputs(cfg: ModelConfig) -> dict:
    return {"expert width (moe_intermediate_size)": cfg.moe_intermediate_size, "hidden_size": cfg.hidden_size}


def _fits(cfg: ModelConfig, fmt: Format) -> bool:
    return all(n % fmt.spec.input_multiple(fmt.group_size) == 0 for n in _expert_inputs(cfg).values())


def default_expert_format(cfg: ModelConfig) -> str:
    """A plan's routed-expert format unless asked otherwise: a GGUF's as stored, a pack-quantized INT4 checkpoint's
    own int4 groups (int4-g32 for K2-Thinking: loaded by a lossless repack), else int4 (group 128)."""
    return GGUF if cfg.gguf else cfg.stored_expert_format or "int4"


def fitting_format(cfg: ModelConfig, preferred: str = "int4") -> str | None:
    """The expert format nearest `preferred` that this model's widths divide: its own group sizes from the
    largest down, then the other formats; None if none does. A GGUF checkpoint's experts run as stored; plain
    "int4" for a pack-quantized INT4 checkpoint is its own groups (default_expert_format)."""
    if cfg.gguf:
        return GGUF
    if preferred == "int4" and cfg.stored_expert_format:
        return cfg.stored_expert_format
    fmt = parse_format(preferred)
    candidates = [Format(fmt.name, g) for g in sorted(fmt.spec.group_sizes, reverse=True)] or [fmt]
    candidates += [parse_format(name) for name in WRITABLE_NAMES]
    return next((str(f) for f in candidates if _fits(cfg, f)), None)
