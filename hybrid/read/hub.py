"""Where a model comes from: a checkpoint folder, or a Hugging Face id (`moonshotai/Kimi-K2-Instruct-0905`),
which is what people type.

A hub id resolves through huggingface_hub: the local Hugging Face cache first (`HF_HOME`, as every HF tool
shares it), then a download of only the files a run reads (config, safetensors shards and their index,
tokenizer, chat template, generation config: not README images or remote code), with huggingface_hub's
progress bars. Offline and not cached, or an id that does not exist: one line saying which and what to do.
`org/name:QUANT` names a quant of a GGUF repository, which this version cannot run yet.
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
            raise CheckpointError(f"{ref}: GGUF files cannot be run by this version yet; give a safetensors "
                                  "checkpoint folder (a Hugging Face download of the model)")
        raise CheckpointError(f"{ref}: is a file; give the checkpoint folder that holds config.json")
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        raise CheckpointError(f"{ref}: no such folder, and not a Hugging Face id (org/name)")
    repo, _, quant = ref.partition(":")
    if quant:
        raise CheckpointError(f"{ref}: a GGUF quant ({quant}) of {repo}; GGUF files cannot be run by this "
                              "version yet")
    return _from_hub(repo)


def hub_config(ref: str) -> Path:
    """Only the config.json of a hub id (what planning reads: not a terabyte of shards), cached or downloaded."""
    repo, _, quant = ref.partition(":")
    if quant:
        raise CheckpointError(f"{ref}: a GGUF quant ({quant}) of {repo}; GGUF files cannot be planned by this "
                              "version yet")
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
