"""Kimi-K2-Thinking's layout: routed experts as compressed-tensors pack-quantized INT4 (group 32), the rest bf16.

The oracle is the compressed-tensors package itself (a test dependency, never imported by the product): the tiny
checkpoint's experts are written by its own PackedQuantizationCompressor from its own scale formula, and its own
decompression is what our stores and kernels must hold.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from cpu_kernels import KernelThreads
from cpu_kernels.dequant import dense_matrix, dense_shape
from cpu_kernels.formats import parse_format
from cpu_kernels.formats.int_lanes import HAS_AVX2
from cpu_kernels.store import MemoryLayerWriter, load_store
from hybrid.errors import CheckpointError, ConfigError
from hybrid.read import int4, names
from hybrid.read.checkpoint import Checkpoint
from hybrid.read.config import parse_config
from hybrid.read.convert import convert, quantize_layer
from hybrid.read.expert_store import layer_dir_name
from hybrid.read.tiny import TinySpec, make_tiny
from placement import memory, presets
from placement.hardware import describe
from placement.planner import PlanRequest, make_plan
from reference import routed_experts_reference

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402

GROUP = 32
SPEC = TinySpec(layers=3, dense_layers=1, experts=8, top_k=2, int4=True, seed=3)
ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP)
SCHEME = QuantizationScheme(targets=["Linear"], weights=ARGS)
EXPERTS = r"\.mlp\.experts\."


def package_compress(w: torch.Tensor) -> dict:
    """One bf16 matrix through the package: its minmax scale formula, then its pack-quantized compressor."""
    grouped = w.view(w.shape[0], -1, GROUP)
    scale, _ = calculate_qparams(grouped.amin(-1), grouped.amax(-1), ARGS)
    return PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale.to(w.dtype)}, SCHEME)


def package_decompress(parts: dict, scale_dtype=None) -> torch.Tensor:
    state = dict(parts)
    if scale_dtype is not None:
        state["weight_scale"] = state["weight_scale"].to(scale_dtype)
    return PackedQuantizationCompressor.decompress(state, SCHEME)["weight"]


@pytest.fixture(scope="module")
def thinking(tmp_path_factory):
    """A tiny K2-Thinking checkpoint whose expert tensors the package wrote (from new bf16 weights)."""
    folder = make_tiny(tmp_path_factory.mktemp("ckpt") / "k2-thinking", SPEC)
    gen = torch.Generator().manual_seed(7)
    for shard in sorted(folder.glob("*.safetensors")):
        tensors = load_file(shard)
        for name in [n for n in tensors if n.endswith("_packed")]:
            weight = name[: -len("_packed")]
            n_out, n_in = tensors[weight + "_shape"].tolist()
            w = (torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5).to(torch.bfloat16)
            parts = package_compress(w)
            for suffix in names.INT4_SUFFIXES:
                tensors[weight + suffix] = parts["weight" + suffix]
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder


def package_parts(ckpt: Checkpoint, name: str) -> dict:
    return {"weight" + s: ckpt.raw(name + s) for s in names.INT4_SUFFIXES}


def expert_names(cfg):
    return [names.expert_key(layer, e, p) for layer in cfg.moe_layers for e in range(cfg.n_routed_experts)
            for p in names.EXPERT_PROJS]


def test_tiny_pack_equals_the_package_compressor_bit_for_bit():
    w = torch.randn(200, 256, generator=torch.Generator().manual_seed(0))
    packed, scale, shape = int4.quantize(w, GROUP)
    theirs = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, SCHEME)
    assert torch.equal(theirs["weight_packed"], packed) and theirs["weight_packed"].dtype == torch.int32
    assert torch.equal(theirs["weight_shape"], shape) and shape.dtype == theirs["weight_shape"].dtype
    assert packed.shape == (200, 256 // 8) and scale.shape == (200, 256 // GROUP) and scale.dtype == torch.bfloat16


def test_tiny_checkpoint_has_k2_thinkings_layout(thinking):
    ckpt = Checkpoint.open(thinking)
    assert ckpt.config.int4_group == GROUP and ckpt.config.fp8_block is None
    dtypes = {}
    for name, info in ckpt.tensors.items():
        kind = name.rsplit(".", 1)[1] if names.parse_expert_key(names.owner_of(name, ckpt.config)) else "rest"
        dtypes.setdefault(kind, set()).add(info.dtype)
    assert dtypes["weight_packed"] == {"I32"} and dtypes["weight_scale"] == {"BF16"}
    assert dtypes["weight_shape"] == {"I64"} and "F8_E4M3" not in dtypes["rest"]
    assert not any(n.endswith(".experts.0.up_proj.weight") for n in ckpt.tensors)


def test_store_values_equal_the_package_decompression_bitwise(thinking):
    """(a) The values our kernels multiply by (the int4-g32 store, expanded by cpu_kernels' own dequantizer) are the
    package's decompression, bit for bit in float32. The package multiplies in the scale's dtype: with the
    stored bf16 scale its result is our exact product rounded to bf16, which Checkpoint.weight(bf16) also gives."""
    ckpt = Checkpoint.open(thinking)
    cfg, fmt, threads = ckpt.config, parse_format("int4-g32"), KernelThreads(1)
    for layer in cfg.moe_layers:
        writer = MemoryLayerWriter(fmt, cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        store = quantize_layer(ckpt, layer, writer)
        for e in range(cfg.n_routed_experts):
            for p in names.EXPERT_PROJS:
                name = names.expert_key(layer, e, p)
                n_out, n_in = names.expected_tensors(cfg)[name]
                out = np.empty(dense_shape(fmt, n_out, n_in)[0], np.float32)
                assert dense_matrix(fmt, store.values[p][e], store.scales[p][e], n_out, n_in, out, threads)
                ours = torch.from_numpy(out[:, :n_out].T.copy())
                exact = package_decompress(package_parts(ckpt, name), torch.float32)
                assert exact.dtype == torch.float32
                assert torch.equal(ours.view(torch.int32), exact.view(torch.int32)), name
                native = package_decompress(package_parts(ckpt, name))
                assert native.dtype == torch.bfloat16
                assert torch.equal(ckpt.weight(name, torch.bfloat16).view(torch.int16), native.view(torch.int16))
                assert torch.equal(ckpt.weight(name), exact)


class ReferenceExperts(torch.nn.Module):
    """tests/reference.py's plain routed-expert loop (float64) on given weights, in TorchExperts' interface; with
    int8_inputs, each projection's input rounded to int8 as the integer kernels multiply it."""

    def __init__(self, gate, up, down, int8_inputs):
        super().__init__()
        self.weights, self.int8_inputs, self._out = (gate, up, down), int8_inputs, None

    def submit(self, hidden, ids, weights):
        out = routed_experts_reference(hidden, ids, weights, *self.weights, int8_inputs=self.int8_inputs)
        self._out = out.to(hidden.dtype)

    def wait(self):
        out, self._out = self._out, None
        return out


def with_reference_experts(model, ckpt, int8_inputs):
    """`model` (the plain torch model) with every MoE layer's experts replaced by ReferenceExperts on the
    package's own decompression of the checkpoint (float32 scales: the exact products)."""
    cfg = ckpt.config
    for layer in cfg.moe_layers:
        stacks = [torch.stack([package_decompress(package_parts(ckpt, names.expert_key(layer, e, p)), torch.float32)
                               for e in range(cfg.n_routed_experts)]) for p in names.EXPERT_PROJS]
        model.model.layers[layer].mlp.experts = ReferenceExperts(*stacks, int8_inputs)
    return model


def test_runtime_on_int4_kernels_gives_the_reference_tokens(thinking):
    """(b) Greedy tokens of the hybrid runtime (routed experts on the CPU int4-g32 kernels, loaded by repacking)
    against the plain torch model whose routed experts are tests/reference.py's loop on the package's
    decompressed weights. On AVX2 the kernels multiply by int8-rounded inputs (activations.py), so the reference
    rounds its experts' inputs the same way (reference.int8_rounded): then 32 tokens agree and the logits to 1e-4 at
    all but rare positions where an input lands within float32's precision of a rounding tie (half an int8 step:
    the kernel rounds float32 values, the reference float64 ones), which moves that one input by one step and its
    position's logits by ~1e-3; which positions hit a tie depends on the CPU's float32 arithmetic upstream (seen on
    a Zen 4 with AVX-512: 1 of 48 positions, 2.3e-3). Against the unrounded reference the logits differ by the
    rounding alone (< 2 %, a fifth of what re-quantizing the experts into int4-g128 costs), too much for token
    equality on this random model (it diverges at token 5)."""
    from hybrid.generation.generate import Stats, generate
    from hybrid.generation.sampling import SamplingParams
    from hybrid.run.experts import HybridExperts
    from hybrid.run.loader import load_model
    from placement.plan import Plan, Rule, Settings

    def plan(fmt):
        rules = (Rule(EXPERTS, "cpu", fmt, "cpu_moe"), Rule(".*", "cpu", "fp32", "torch"))
        return Plan("t", Settings(cpu_threads=2), rules)

    def greedy(model, ids, n=32):
        stats = Stats()
        list(generate(model, ids[0].tolist(), SamplingParams(max_new_tokens=n), stats=stats))
        return stats.tokens

    def rel_err(a, b):
        return float((a - b).norm() / b.norm())

    ckpt = Checkpoint.open(thinking)
    model = load_model(thinking, plan=plan("int4-g32"))
    assert isinstance(model.model.layers[1].mlp.experts, HybridExperts)
    rounded = with_reference_experts(load_model(thinking), ckpt, int8_inputs=HAS_AVX2)
    ids = torch.randint(0, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    got, want = model(ids)[0], rounded(ids)[0]
    per_position = (got - want).norm(dim=-1) / want.norm(dim=-1)
    assert (per_position < 1e-4).float().mean() >= 0.9 and per_position.max() < 1e-2, per_position
    assert greedy(model, ids) == greedy(rounded, ids)
    if HAS_AVX2:
        plain = with_reference_experts(load_model(thinking), ckpt, int8_inputs=False)
        requantized = load_model(thinking, plan=plan("int4-g128"))
        want = plain(ids)
        assert rel_err(model(ids), want) < min(0.02, rel_err(requantized(ids), want) / 5)


def thinking_config(**changes) -> dict:
    raw = json.loads(presets.find("kimi-k2-thinking").read_text())
    weights = raw["quantization_config"]["config_groups"]["group_0"]["weights"]
    for key, value in changes.items():
        if key in weights:
            weights[key] = value
        elif key in raw["quantization_config"]:
            raw["quantization_config"][key] = value
        else:
            raw[key] = value
    return raw


@pytest.mark.parametrize("changes, key", [
    (dict(num_bits=8), "quantization_config.config_groups.group_0.weights.num_bits"),
    (dict(symmetric=False), "quantization_config.config_groups.group_0.weights.symmetric"),
    (dict(group_size=48), "quantization_config.config_groups.group_0.weights.group_size"),
    (dict(group_size=128, moe_intermediate_size=2112), "weights.group_size"),
    (dict(strategy="channel"), "quantization_config.config_groups.group_0.weights.strategy"),
    (dict(dynamic=True), "quantization_config.config_groups.group_0.weights.dynamic"),
    (dict(actorder="group"), "quantization_config.config_groups.group_0.weights.actorder"),
    (dict(format="naive-quantized"), "quantization_config.format"),
    (dict(quant_method="gptq"), "quantization_config.quant_method"),
])
def test_config_errors_name_the_key(changes, key):
    """(c) Only what the kernels run as stored is accepted; anything else is one line naming the key."""
    with pytest.raises(ConfigError) as e:
        parse_config(thinking_config(**changes), "config.json")
    msg = str(e.value)
    assert "\n" not in msg and key in msg and msg.startswith("config.json: key"), msg


def test_k2_thinking_config_parses():
    cfg = parse_config(thinking_config(), "config.json")
    assert cfg.int4_group == 32 and cfg.fp8_block is None and cfg.stored_expert_format == "int4-g32"


def rewrite(folder, name, tensor):
    """Replace tensor `name` in the shard that holds it."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensor
    save_file(tensors, str(shard), metadata={"format": "pt"})


@pytest.mark.parametrize("suffix, bad, words", [
    ("_shape", torch.tensor([128, 257]), ["holds [128, 257]", "[128, 256]"]),
    ("_packed", torch.zeros(128, 16, dtype=torch.int32), ["I32[128, 16]", "I32[128, 32]"]),
    ("_packed", torch.zeros(128, 32, dtype=torch.int64), ["I64[128, 32]", "expected I32[128, 32]"]),
    ("_scale", torch.zeros(128, 4, dtype=torch.bfloat16), ["BF16[128, 4]", "[128, 8]"]),
    ("_scale", None, ["is missing"]),
])
def test_tensor_errors_name_file_and_tensor(thinking, tmp_path, suffix, bad, words):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(thinking, folder)
    name = names.expert_key(1, 3, "gate_proj") + suffix
    if bad is None:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        shard = folder / index["weight_map"][name]
        tensors = load_file(shard)
        del tensors[name]
        save_file(tensors, str(shard), metadata={"format": "pt"})
        index["weight_map"].pop(name)
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        rewrite(folder, name, bad)
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and all(w in msg for w in words), msg


def test_convert_repacks_to_the_direct_repack_and_the_planner_sizes_it(thinking, tmp_path):
    """(d) `hybrid convert` of a K2-Thinking checkpoint writes int4-g32 by default, equal to the direct repack of
    every expert; the planner's expert bytes are the store's; int8 (dequantize + quantize) still converts."""
    from click.testing import CliRunner

    from hybrid.cli import cli

    out = tmp_path / "store"
    r = CliRunner().invoke(cli, ["convert", str(thinking), str(out)])
    assert r.exit_code == 0, r.output
    ckpt = Checkpoint.open(thinking)
    cfg = ckpt.config
    assert json.loads((out / "hybrid_store.json").read_text())["format"] == "int4-g32"
    store_bytes = 0
    for layer in cfg.moe_layers:
        store = load_store(out / layer_dir_name(layer))
        assert str(store.fmt) == "int4-g32"
        store_bytes += store.nbytes
        for e in range(cfg.n_routed_experts):
            for p in names.EXPERT_PROJS:
                values, scales = int4.to_store(*ckpt.int4_parts(names.expert_key(layer, e, p)), GROUP)
                assert np.array_equal(store.values[p][e], values) and np.array_equal(store.scales[p][e], scales)
    plan = make_plan(cfg, str(thinking), describe(gpu=None, ram="64GB", memory="DDR5-4800x8", cores=2))
    assert plan.plan.settings.expert_format == "int4-g32"
    assert plan.budget.expert_device_bytes["cpu"] == store_bytes
    convert(thinking, tmp_path / "int8", "int8")
    assert str(load_store(tmp_path / "int8" / layer_dir_name(1)).fmt) == "int8-g128"


def test_planner_sizes_k2_thinking_at_its_real_bytes():
    """The K2-Thinking preset plans int4-g32 experts (5 bits a weight in the store: 4-bit codes and a float32 scale
    per 32) and every other tensor in bf16, no FP8 rule: 590.6 GiB of experts, 23.5 GiB on a 24 GB GPU at 16K."""
    cfg = presets.load("kimi-k2-thinking")
    r = make_plan(cfg, "kimi-k2-thinking", describe(gpu="RTX 4090", ram="768GB", memory="DDR5-4800x8", cores=32),
                  PlanRequest(context_length=16384))
    assert r.plan.settings.expert_format == "int4-g32"
    assert {rule.format for rule in r.plan.rules if rule.kernel == "torch"} == {"bf16"}
    n_experts = cfg.n_routed_experts * len(cfg.moe_layers)
    assert memory.expert_bytes(cfg, "int4-g32") == 3 * 7168 * 2048 * 5 // 8
    assert r.budget.expert_device_bytes["cpu"] == n_experts * memory.expert_bytes(cfg, "int4-g32")
    assert 590 < r.budget.expert_device_bytes["cpu"] / memory.GIB < 591
    assert r.budget.total("cuda:0") <= 24 * memory.GIB

    def stored(shape):  # weight_packed int32, weight_scale bf16, weight_shape int64 [2]
        return shape[0] * shape[1] // 2 + 2 * shape[0] * shape[1] // GROUP + 16

    checkpoint_bytes = sum(stored(shape) if memory.is_routed_expert(name) else memory.tensor_bytes(name, shape, "bf16")
                           for name, shape in memory.tensors(cfg))
    assert 590e9 < checkpoint_bytes < 600e9  # the release's ~594 GB: 4.5 bits a routed weight, bf16 scales


def test_torch_model_matches_the_transformers_oracle(thinking, tmp_path):
    """The plain torch model on a K2-Thinking checkpoint (experts via Checkpoint.weight) against transformers'
    DeepseekV3ForCausalLM holding the package's decompression of the same experts."""
    from hybrid.run.loader import load_model
    from oracle import assert_oracle_holds_checkpoint, load_oracle, write_oracle_twin

    oracle = load_oracle(write_oracle_twin(thinking, tmp_path / "twin"))
    assert_oracle_holds_checkpoint(oracle, thinking)
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = oracle(ids).logits
    got = load_model(thinking)(ids)
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_gpu_resident_experts_get_the_decompressed_weights(thinking):
    """Experts the plan puts on a GPU (the CPU stands in here, as the loader's device rule says) are the package's
    decompression in the plan's dtype; the others run on the int4-g32 kernels."""
    from hybrid.run.experts import HybridExperts
    from hybrid.run.loader import load_model
    from placement.plan import Plan, Rule, Settings

    rules = (Rule(r"^model\.layers\.2\.mlp\.experts\.(1|6)\.", "cuda:0", "bf16", "torch"),
             Rule(EXPERTS, "cpu", "int4-g32", "cpu_moe"), Rule(".*", "cuda:0", "bf16", "torch"))
    p = Plan("t", Settings(cpu_threads=2), rules)
    model = load_model(thinking, plan=p)
    experts = model.model.layers[2].mlp.experts
    assert isinstance(experts, HybridExperts) and sorted(int(k) for k in experts._modules) == [1, 6]
    ckpt = Checkpoint.open(thinking)
    params = dict(model.named_parameters())
    for e in (1, 6):
        for proj in names.EXPERT_PROJS:
            name = names.expert_key(2, e, proj)
            assert params[name].dtype == torch.bfloat16
            want = package_decompress(package_parts(ckpt, name))
            assert torch.equal(params[name].view(torch.int16), want.view(torch.int16))
    out = model(torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(4)))
    assert torch.isfinite(out).all()


def test_store_writer_refuses_arrays_of_another_format():
    fmt = parse_format("int4-g32")
    writer = MemoryLayerWriter(fmt, 2, 256, 128)
    gate = int4.to_store(*[t.numpy() if i == 0 else t.view(torch.int16).numpy().view(np.uint16)
                           for i, t in enumerate(int4.quantize(torch.randn(128, 256), 32)[:2])], 32)
    with pytest.raises(ValueError, match="down_proj.values of expert 0"):
        writer.write_quantized(0, {"gate_proj": gate, "up_proj": gate, "down_proj": gate})
