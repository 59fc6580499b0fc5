"""K2's tokenizer: byte-level BPE ranks in `tiktoken.model` plus the special tokens of tokenizer_config.json.

`tiktoken.model` holds one `base64(bytes) rank` line per mergeable token (163,584 for K2). The 256 ids after
the last rank are special slots: those named in `added_tokens_decoder` ([BOS], <|im_end|>, ...), the rest
`<|reserved_token_N|>`. Pre-tokenization uses K2's pattern (Han runs kept whole, case-aware words, numbers
in groups of at most three).
"""

import base64
import json
from pathlib import Path

import tiktoken

from hybrid.errors import ConfigError

N_SPECIAL_SLOTS = 256
K2_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])


class Tokenizer:
    def __init__(self, encoding: tiktoken.Encoding, special: dict[str, int]):
        self.encoding, self.special = encoding, special

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer | None":
        """The tokenizer shipped in a checkpoint folder, or None when the folder has none."""
        folder = Path(folder)
        model, cfg = folder / "tiktoken.model", folder / "tokenizer_config.json"
        if not model.is_file():
            return None
        ranks = read_ranks(model)
        special = special_tokens(cfg, len(ranks))
        enc = tiktoken.Encoding(name=folder.name, pat_str=K2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        return cls(enc, special)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return self.encoding.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token)

    def token_id(self, text: str) -> int | None:
        return self.special.get(text)


def read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            b64, rank = line.split()
            ranks[base64.b64decode(b64, validate=True)] = int(rank)
        except ValueError:
            raise ConfigError(f"{path}: line {n} is not 'base64 rank'") from None
    return ranks


def special_tokens(path: Path, n_ranks: int) -> dict[str, int]:
    named = {}
    if path.is_file():
        try:
            decoder = json.loads(path.read_text()).get("added_tokens_decoder", {})
            named = {int(i): t["content"] for i, t in decoder.items()}
        except (json.JSONDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{path}: 'added_tokens_decoder' must map ids to {{\"content\": ...}}") from None
    ids = range(n_ranks, n_ranks + N_SPECIAL_SLOTS)
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in ids}
