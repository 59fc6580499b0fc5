"""Planning a K2-sized GGUF from its headers: every tensor sized by its real type, fits or refused with numbers.

The files are K2-0905's full layout (61 layers, 384 experts, 163,840-token vocabulary, real tensor names and
shapes) with a dynamic-quant type mix like Unsloth's UD-TQ1_0 (~245 GB), written as sparse files: headers real,
data holes, nothing read but the headers.
"""

import pytest
from conftest import K2_FILES
from gguf_files import full_size_gguf

from hybrid.errors import PlanError
from hybrid.read.config import load_config
from hybrid.read.gguf import open_gguf
from placement import memory
from placement.hardware import describe
from placement.planner import PlanRequest, make_plan

GIB = 2**30


def ud_tq1_0(name: str) -> str:
    """Ternary routed gate/up, IQ2_XXS down (and all of the first five MoE layers), the rest in 4 to 8 bits."""
    if "_exps" in name:
        layer = int(name.split(".")[1])
        return "IQ2_XXS" if layer <= 5 or "down" in name else "TQ1_0"
    if name.startswith(("token_embd", "output")):
        return "Q6_K" if name.startswith("output") else "Q4_K"
    return "Q8_0" if "attn_k_b" in name or "attn_v_b" in name else "Q4_K"


@pytest.fixture(scope="module")
def k2_gguf(tmp_path_factory):
    cfg = load_config(K2_FILES / "config_0905.reconstructed.json")
    folder = full_size_gguf(cfg, K2_FILES, tmp_path_factory.mktemp("k2") / "UD-TQ1_0", n_shards=6, types=ud_tq1_0)
    return folder, open_gguf(folder)


def test_sizes_come_from_the_headers(k2_gguf):
    folder, ckpt = k2_gguf
    cfg = ckpt.config
    assert cfg.num_hidden_layers == 61 and cfg.n_routed_experts == 384 and cfg.vocab_size == 163840
    on_disk = sum(f.stat().st_size for f in folder.glob("*.gguf"))
    stored = sum(memory.stored_bytes(cfg, name, shape) for name, shape in memory.tensors(cfg))
    assert stored == ckpt.total_bytes()
    assert 0.99 < stored / on_disk <= 1.0  # the rest: headers, the token list, alignment padding
    assert 230 * 1e9 < on_disk < 260 * 1e9  # Unsloth's UD-TQ1_0 is ~245 GB
    # an expert of layer 3 (IQ2_XXS gate) takes more than one of layer 30 (TQ1_0 gate): dynamic types are seen
    assert memory.stored_bytes(cfg, "model.layers.3.mlp.experts.0.gate_proj.weight", (2048, 7168)) > \
        memory.stored_bytes(cfg, "model.layers.30.mlp.experts.0.gate_proj.weight", (2048, 7168))


def test_fits_a_24gb_gpu_with_256gb_ram_and_is_refused_at_128gb(k2_gguf):
    folder, ckpt = k2_gguf
    box = dict(memory="DDR5-4800x8", cores=32)
    result = make_plan(ckpt.config, str(folder), describe(gpu="RTX 4090", ram="256GB", **box))
    plan = result.plan
    assert plan.settings.expert_format == "gguf" and plan.settings.expert_backing == "ram"
    experts = result.budget.expert_device_bytes["cpu"]
    assert abs(experts - memory.expert_bytes(ckpt.config, "gguf") * 384 * 60) < 1e-3 * experts
    assert result.budget.total("cpu") < 248 * GIB and result.budget.total("cuda:0") <= 24 * GIB
    assert result.projection.decode_tps > 1
    print(f"\n24 GB GPU + 256 GB RAM: RAM {result.budget.total('cpu') / GIB:.1f} GiB (experts {experts / GIB:.1f}), "
          f"GPU {result.budget.total('cuda:0') / GIB:.1f} GiB, decode {result.projection.decode_tps:.1f} tok/s")
    with pytest.raises(PlanError) as refused:
        make_plan(ckpt.config, str(folder), describe(gpu="RTX 4090", ram="128GB", **box))
    message = str(refused.value)
    print(f"128 GB: {message}")
    assert "GiB of RAM" in message and "in gguf" in message and "short by" in message and "\n" not in message


def test_a_16gb_gpu_keeps_head_and_shared_experts_in_their_blocks(k2_gguf):
    """Unsloth's card: 16 GB of VRAM and 256 GB of RAM. K2's non-expert weights in bf16 (~20 GB) do not fit, so
    the head, the shared experts and the dense layer stay on the CPU in their GGUF blocks."""
    folder, ckpt = k2_gguf
    box = describe(gpu="RTX 4080", ram="256GB", memory="DDR5-4800x8", cores=32)
    result = make_plan(ckpt.config, str(folder), box, PlanRequest(context_length=16384))  # as Unsloth's command
    kernels = {(r.match, r.device, r.kernel) for r in result.plan.rules}
    assert any(kernel == "cpu_linear" and "shared_experts" in match for match, _, kernel in kernels)
    assert result.budget.total("cuda:0") <= 16 * GIB and result.budget.total("cpu") < 248 * GIB
    print(f"\n16 GB GPU + 256 GB RAM: GPU {result.budget.total('cuda:0') / GIB:.1f} GiB, RAM "
          f"{result.budget.total('cpu') / GIB:.1f} GiB, decode {result.projection.decode_tps:.1f} tok/s")
