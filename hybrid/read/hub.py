"""Where a model comes from: a checkpoint folder, or a Hugging Face id (`moonshotai/Kimi-K2-Instruct-0905`),
which is what people type.

A hub id resolves through huggingface_hub: the local Hugging Face cache first (`HF_HOME`, as every HF tool
shares it), then a download of only the files a run reads (config, safetensors shards and their index,
tokenizer, chat template, generation config: not README images or remote code), with huggingface_hub's
progress bars. Offline and not cached, or an id that does not exist: one line saying which and what to do.
`org/name:QUANT` names one quant of a GGUF repository (Unsloth's `unsloth/Kimi-K2-Instruct-0905-GGUF:UD-Q2_K_XL`,
as llama.cpp's `-hf` takes it): only that quant's files are fetched, from its folder or by its name.
"""

import re
from pathlib import Path

from hybrid.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+)?$")
NEEDED_FILES = ["*.json", "*.safetensors", "tiktoken.model", "*.jinja", "tokenizer.model"]


def resolve_model(ref: str) -> Path:
    """The checkpoint folder `ref` names: an existing folder as it is, else a hub id through the cache or a
    download. CheckpointError (one line) for a file, a GGUF, or anything that cannot be found."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix == ".gguf":
            return path  # one GGUF file, or the first of a split set
        raise CheckpointError(f"{ref}: is a file; give the checkpoint folder that holds config.json, or a .gguf")
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise CheckpointError(f"{ref}: no such folder, and not a Hugging Face id (org/name)")
    repo, _, quant = ref.partition(":")
    if quant:
        return _quant_files(_from_hub(repo, gguf_patterns(quant)), ref, quant)
    return _from_hub(repo)


def gguf_patterns(quant: str) -> list[str]:
    """The files of one quant: its folder (Unsloth's layout), or files named for it in the repository's root."""
    return [f"{quant}/*.gguf", f"*-{quant}.gguf", f"*-{quant}-*-of-*.gguf"]


def _quant_files(snapshot: Path, ref: str, quant: str) -> Path:
    if (snapshot / quant).is_dir():
        return snapshot / quant
    found = sorted(snapshot.glob(f"*-{quant}.gguf")) or sorted(snapshot.glob(f"*-{quant}-*-of-*.gguf"))
    if not found:
        raise CheckpointError(f"{ref}: the repository has no {quant} quant (no {quant}/ folder or *-{quant}.gguf)")
    return found[0]


def hub_config(ref: str) -> Path:
    """Only the config.json of a hub id (what planning reads: not a terabyte of shards), cached or downloaded."""
    repo, _, quant = ref.partition(":")
    if quant:
        raise CheckpointError(f"{ref}: a GGUF quant is planned from its file headers, which means downloading it; "
                              f"`hybrid generate {ref} ...` downloads it, then `hybrid plan FOLDER` reads its headers")
    return _from_hub(repo, ["config.json"]) / "config.json"


def _from_hub(repo: str, files=NEEDED_FILES) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo, allow_patterns=files, local_files_only=True))
    except LocalEntryNotFoundError:
        pass  # not cached: download it
    try:
        return Path(snapshot_download(repo, allow_patterns=files))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{repo}: no such model on the Hugging Face hub (or it is private: "
                              "`hf auth login` first)") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(f"{repo}: not in the Hugging Face cache, and this machine is offline "
                              "(HF_HUB_OFFLINE or no network); download it where there is a network, or give "
                              "its folder") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{repo}: download failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def display_name(folder) -> str:
    """What to call a model: its hub id for a Hugging Face cache snapshot (the folder itself is named for a
    commit hash), else the folder's name."""
    folder = Path(folder)
    repo = folder.parent.parent.name
    if folder.parent.name == "snapshots" and repo.startswith("models--"):
        return repo.removeprefix("models--").replace("--", "/", 1)
    return folder.name
