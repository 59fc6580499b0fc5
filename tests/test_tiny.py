"""make-tiny: deterministic, K2's layout, sane activations at depth, K2's real tokenizer when asked."""

import hashlib
import json

import torch

from conftest import K2_FILES
from hybrid.read.checkpoint import Checkpoint
from hybrid.generation.generate import Stats, generate
from hybrid.run.loader import load_model
from hybrid.generation.sampling import SamplingParams
from hybrid.read.tiny import TinySpec, make_tiny
from hybrid.generation.tokenizer import Tokenizer


def digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def test_same_seed_same_bytes(tmp_path):
    spec = TinySpec(layers=2, experts=4, top_k=2, seed=7)
    assert digest(make_tiny(tmp_path / "a", spec)) == digest(make_tiny(tmp_path / "b", spec))
    assert digest(make_tiny(tmp_path / "c", TinySpec(layers=2, experts=4, top_k=2, seed=8))) != digest(tmp_path / "a")


def test_activations_stay_sane_through_many_layers(tmp_path):
    folder = make_tiny(tmp_path / "deep", TinySpec(layers=24, experts=4, top_k=2, hidden=128, seed=3))
    model = load_model(folder)
    rms = []
    hooks = [layer.register_forward_hook(lambda m, i, out: rms.append(float(out.pow(2).mean().sqrt())))
             for layer in model.model.layers]
    logits = model(torch.arange(1, 41)[None])
    for h in hooks:
        h.remove()
    assert torch.isfinite(logits).all()
    assert all(0.2 < r < 20 for r in rms), rms
    assert float(logits[0].std(dim=-1).min()) > 0.1


def test_k2_tokenizer_checkpoint(tmp_path):
    folder = make_tiny(tmp_path / "k2tok", TinySpec(layers=2, experts=4, top_k=2, hidden=64,
                                                    tokenizer_from=str(K2_FILES)))
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vocab_size"] == 163840 and (cfg["bos_token_id"], cfg["eos_token_id"]) == (163584, 163585)
    assert Checkpoint.open(folder).tensors["lm_head.weight"].shape == (163840, 64)
    tok = Tokenizer.from_folder(folder)
    ids = tok.encode("你好, K2")
    assert ids == Tokenizer.from_folder(K2_FILES).encode("你好, K2")
    stats = Stats()
    list(generate(load_model(folder), ids, SamplingParams(max_new_tokens=3), stats=stats))
    assert len(stats.tokens) == 3 and all(0 <= t < 163840 for t in stats.tokens)
