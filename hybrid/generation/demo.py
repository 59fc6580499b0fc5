"""The demo model behind `hybrid chat --demo`: a tiny random-weight checkpoint in K2's exact layout, written on
first use into the user's cache folder ($XDG_CACHE_HOME/hybrid/demo-k2, else ~/.cache/hybrid/demo-k2).

Its weights are random, so it talks noise. Two touches make the noise pleasant to watch: its output layer is
narrowed to printable ASCII, newline and <|im_end|> (rows of other tokens zeroed, the kept ones scaled up so
their logits dominate), so it writes readable characters and ends replies by itself; and it carries K2's
chat template (hybrid/generation/templates/kimi_k2.jinja), so a turn is rendered exactly as for the real model.
"""

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hybrid.generation.chat_template import K2_TEMPLATE
from hybrid.errors import ConfigError
from hybrid.read.tiny import N_BYTE_RANKS, TinySpec, make_tiny

DEMO_SPEC = TinySpec(layers=2, dense_layers=1, experts=8, top_k=2, max_position_embeddings=8192, seed=7)
DEMO_VERSION = 1  # bump when what ensure_demo_model writes changes, so old caches are rebuilt
KEPT_LOGIT_SCALE = 8.0  # kept rows x8: their logits (std ~1 before) dwarf the zeroed rows' 0
IM_END = N_BYTE_RANKS + 2  # <|im_end|> in the tiny byte-level vocabulary (tiny.K2_SPECIALS)
READABLE = [ord("\n"), *range(0x20, 0x7F)]


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hybrid"


def ensure_demo_model(folder=None) -> Path:
    """The demo checkpoint folder, written now if missing or from an older version of this function."""
    folder = Path(folder) if folder else cache_dir() / "demo-k2"
    stamp = folder / "hybrid_demo.json"
    want = {"version": DEMO_VERSION, "spec": asdict(DEMO_SPEC)}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    try:
        make_tiny(folder, DEMO_SPEC, overwrite=True)
        restrict_output(folder, READABLE + [IM_END])
        shutil.copyfile(K2_TEMPLATE, folder / "chat_template.jinja")
        stamp.write_text(json.dumps(want, indent=2) + "\n")  # last: a half-written folder is rebuilt next time
    except OSError as e:
        raise ConfigError(f"{folder}: cannot write the demo model there ({e}); set XDG_CACHE_HOME") from None
    return folder


def restrict_output(folder, keep_ids, scale: float = KEPT_LOGIT_SCALE):
    """Rewrite lm_head.weight of a tiny checkpoint so only keep_ids are ever likely: other rows zero, kept
    rows scaled by `scale`."""
    folder = Path(folder)
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    tensors = load_file(shard)
    head = tensors["lm_head.weight"]
    keep = torch.zeros(head.shape[0], dtype=torch.bool)
    keep[list(keep_ids)] = True
    tensors["lm_head.weight"] = torch.where(keep[:, None], head.float() * scale, 0.0).to(head.dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
