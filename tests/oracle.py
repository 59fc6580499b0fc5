"""The transformers oracle: DeepseekV3ForCausalLM loaded from a twin of a tiny checkpoint.

transformers 5 has no `kimi_k2` model type, and an FP8 quantization_config would route it through its own
FP8 path, so the twin says `deepseek_v3`, has no quantization_config, and holds every block-FP8 weight
dequantized to bf16 the way DeepSeek's reference conversion writes it. Before any comparison the caller
checks with `assert_oracle_holds_checkpoint` that no oracle weight was left randomly initialised. A K2-Thinking
checkpoint's pack-quantized INT4 experts go into the twin as float32 weights, decompressed by the compressed-tensors
package itself (with the scales widened to float32, so the products are exact).
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from hybrid.read.checkpoint import Checkpoint
from hybrid.read.names import INT4_SUFFIXES, SCALE_SUFFIX, owner_of


def write_oracle_twin(folder, out) -> Path:
    src, out = Path(folder), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = Checkpoint.open(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "deepseek_v3"
    cfg.pop("quantization_config", None)
    cfg.pop("auto_map", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    tensors = {}
    for name in _weight_names(ckpt):
        if ckpt.is_int4(name):
            tensors[name] = package_int4_weight(ckpt, name)
            continue
        t = ckpt.raw(name)
        if t.dtype == torch.float8_e4m3fn:
            t = reference_fp8_to_bf16(t, ckpt.raw(name + SCALE_SUFFIX))
        tensors[name] = t.contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def _weight_names(ckpt):
    """Each model tensor the checkpoint stores, once: FP8 scales and INT4 parts stand for their weight."""
    return sorted({owner_of(name, ckpt.config) for name in ckpt.tensors})


def package_int4_weight(ckpt, name):
    """A pack-quantized expert decompressed by compressed-tensors (a test dependency), in float32."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                            group_size=ckpt.config.int4_group)
    state = {"weight" + s: ckpt.raw(name + s) for s in INT4_SUFFIXES}
    state["weight_scale"] = state["weight_scale"].float()
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


def reference_fp8_to_bf16(w, scale_inv, block=128):
    """DeepSeek's conversion: widen to f32, multiply by the block's scale, round to bf16 (written independently
    of hybrid.read.fp8: each block is multiplied in a loop)."""
    out = w.float().clone()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale_inv[i, j]
    return out.to(torch.bfloat16)


def load_oracle(twin):
    from transformers import DeepseekV3ForCausalLM

    # Eager attention and the per-expert loop: the most literal form of the reference math.
    model = DeepseekV3ForCausalLM.from_pretrained(str(twin), dtype=torch.float32, attn_implementation="eager",
                                                  experts_implementation="eager")
    return model.eval()


def oracle_tensor(state: dict, name: str, moe_width: int):
    """The oracle's value for a checkpoint tensor name (routed experts are fused into 3-D tensors there)."""
    parts = name.split(".")
    if ".mlp.experts." in name:
        layer, e, proj = parts[2], int(parts[5]), parts[6]
        prefix = f"model.layers.{layer}.mlp.experts"
        if proj == "down_proj":
            return state[f"{prefix}.down_proj"][e]
        fused = state[f"{prefix}.gate_up_proj"][e]
        return fused[:moe_width] if proj == "gate_proj" else fused[moe_width:]
    return state[name]


def assert_oracle_holds_checkpoint(oracle, folder):
    ckpt = Checkpoint.open(folder)
    state = oracle.state_dict()
    width = ckpt.config.moe_intermediate_size
    n_checked = 0
    for name in _weight_names(ckpt):
        mine = ckpt.weight(name, torch.float32)
        theirs = oracle_tensor(state, name, width).float()
        assert torch.equal(mine, theirs), f"oracle tensor {name} differs from the checkpoint"
        n_checked += 1
    n_oracle = sum(v.numel() for k, v in state.items())
    n_ckpt = sum(ckpt.weight(n).numel() if ckpt.is_int4(n) else
                 ckpt.tensors[n].nbytes // {"F8_E4M3": 1, "BF16": 2, "F32": 4}[ckpt.tensors[n].dtype]
                 for n in _weight_names(ckpt))
    assert n_oracle == n_ckpt, f"oracle holds {n_oracle} values, the checkpoint {n_ckpt}: some were not loaded"
    return n_checked
