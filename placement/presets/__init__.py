"""Configs of models nobody here can download, stored as data (see SOURCES.md beside this file)."""

from pathlib import Path

from hybrid.read.config import ModelConfig, load_config

HERE = Path(__file__).parent
ALIASES = {"kimi-k2": "kimi-k2-instruct-0905", "kimi-k2-0905": "kimi-k2-instruct-0905",
           "kimi-k2-instruct-0711": "kimi-k2-instruct", "kimi-k2-0711": "kimi-k2-instruct",
           "deepseek-r1": "deepseek-v3", "deepseek-v3.1": "deepseek-v3", "moonlight": "moonlight-16b-a3b"}


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.json")) + sorted(ALIASES)


def find(name: str) -> Path | None:
    key = ALIASES.get(name.lower(), name.lower())
    path = HERE / f"{key}.json"
    return path if path.is_file() else None


def load(name: str) -> ModelConfig | None:
    path = find(name)
    return None if path is None else load_config(path)


# The Hugging Face repository each preset's checkpoint is published in: what vLLM and SGLang load (placement.launch).
HUB_IDS = {"kimi-k2-instruct-0905": "moonshotai/Kimi-K2-Instruct-0905",
           "kimi-k2-instruct": "moonshotai/Kimi-K2-Instruct",
           "kimi-k2-thinking": "moonshotai/Kimi-K2-Thinking", "deepseek-v3": "deepseek-ai/DeepSeek-V3",
           "moonlight-16b-a3b": "moonshotai/Moonlight-16B-A3B-Instruct",
           # aliases that share a preset's config but not its checkpoint
           "deepseek-r1": "deepseek-ai/DeepSeek-R1", "deepseek-v3.1": "deepseek-ai/DeepSeek-V3.1"}


def hub_id(name: str) -> str | None:
    path = find(name)
    return None if path is None else HUB_IDS.get(name.lower(), HUB_IDS.get(path.stem))
