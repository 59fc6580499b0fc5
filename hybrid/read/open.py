"""Open whatever checkpoint a path names: a safetensors folder (config.json) or a GGUF file set.

Both give the same interface (hybrid.read.checkpoint.Checkpoint, hybrid.read.gguf.GGUFCheckpoint): a validated
ModelConfig, tensors under Hugging Face names, weight() in a torch dtype.
"""

from pathlib import Path

from hybrid.read.checkpoint import Checkpoint
from hybrid.read.gguf import GGUFCheckpoint, open_gguf


def is_gguf(path) -> bool:
    """A .gguf file, or a folder that holds .gguf files and no config.json."""
    path = Path(path)
    if path.is_file():
        return path.suffix == ".gguf"
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


def open_checkpoint(path) -> Checkpoint | GGUFCheckpoint:
    return open_gguf(path) if is_gguf(path) else Checkpoint.open(path)
