"""Build the model on the meta device and materialise every tensor from the checkpoint, by name.

Today every tensor goes to one device in one dtype; the placement plan (a later stage) will say per tensor.
The router's weight and correction bias stay in float32 whatever the dtype, as the reference keeps them,
so expert choice does not depend on the activation dtype.
"""

import torch
from torch import nn

from hybrid import names
from hybrid.checkpoint import Checkpoint
from hybrid.errors import CheckpointError
from hybrid.model import DeepseekV3ForCausalLM

FP32_ALWAYS = ("mlp.gate.weight", "e_score_correction_bias")


def load_model(checkpoint, device="cpu", dtype=torch.float32, progress=None) -> DeepseekV3ForCausalLM:
    """checkpoint: a Checkpoint or a folder. progress(done, total) is called after each tensor, if given."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(ckpt.config)
    params = dict(model.named_parameters())
    missing = set(names.expected_tensors(ckpt.config)) ^ set(params)
    if missing:  # the model and names.py disagree: a bug here, not in the user's files
        raise RuntimeError(f"model parameters and names.expected_tensors differ: {sorted(missing)[:5]}")
    for i, name in enumerate(params):
        want = torch.float32 if name.endswith(FP32_ALWAYS) else dtype
        tensor = ckpt.weight(name, want).to(device)
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{ckpt.tensors[name].path}: tensor {name} holds NaN or inf values")
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
        if progress is not None:
            progress(i + 1, len(params))
    return model.eval()
