"""Shared fixtures: tiny checkpoints in K2's layout, written once per test session."""

from pathlib import Path

import pytest
import torch

from hybrid.read.tiny import TinySpec, make_tiny

K2_FILES = Path(__file__).resolve().parent / "data" / "kimi-k2"  # K2's real tokenizer, configs and templates (SOURCES.md)

# K2's routing (one group, sigmoid + correction bias), block-FP8 weights, K2's beta_fast/beta_slow.
K2_SPEC = TinySpec(layers=3, dense_layers=1, experts=16, top_k=4, seed=1)
# DeepSeek-V3's routing scaled down: 8 groups, best 4 kept, bf16 weights, V3's YaRN betas, no q LoRA
# (as Moonlight and DeepSeek-V2-Lite have).
V3_SPEC = TinySpec(layers=3, dense_layers=1, experts=32, top_k=6, n_group=8, topk_group=4, fp8=False,
                   beta_fast=32.0, beta_slow=1.0, model_type="deepseek_v3", q_lora_rank=None,
                   routed_scaling_factor=2.5, seed=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def k2_tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "k2-tiny", K2_SPEC)


@pytest.fixture(scope="session")
def v3_tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "v3-tiny", V3_SPEC)


@pytest.fixture
def k2_copy(k2_tiny, tmp_path):
    """A private copy of the K2 tiny checkpoint that a test may damage."""
    import shutil

    return Path(shutil.copytree(k2_tiny, tmp_path / "k2"))
