"""Front-end helpers: a MODEL argument (preset name, checkpoint folder or Hugging Face id) and hardware from file
and flags."""

from pathlib import Path

from hybrid.errors import PlanError
from hybrid.read.config import ModelConfig, load_config
from hybrid.read.gguf import open_gguf
from hybrid.read.hub import HUB_ID, hub_config
from hybrid.read.open import is_gguf
from placement import presets
from placement.hardware import Hardware, describe, detect, load_hardware


def resolve_model(text: str) -> tuple[str, ModelConfig]:
    path = Path(text)
    if is_gguf(path):
        return str(path), open_gguf(path).config  # the headers: every tensor's real type and size
    if path.is_dir():
        return str(path), load_config(path)
    if path.is_file() and path.suffix == ".json":
        return path.stem, load_config(path)
    cfg = presets.load(text)
    if cfg is None and HUB_ID.match(text):
        return text, load_config(hub_config(text))  # a Hugging Face id: its config.json is all a plan needs
    if cfg is None:
        raise PlanError(f"{text!r} is neither a checkpoint folder, a preset ({', '.join(presets.names())}) "
                        "nor a Hugging Face id (org/name)")
    return text, cfg


def resolve_hardware(hardware_file=None, **flags) -> Hardware:
    """Hardware YAML if given, else this machine when no machine-describing flag is given; flags override."""
    given = {k: v for k, v in flags.items() if v is not None}
    if hardware_file:
        base = load_hardware(hardware_file)
    elif {"gpu", "ram"} & set(given):
        base = None  # describing another machine: nothing detected here applies
    else:
        base = detect()
    return describe(base=base, **given) if given else base
