"""Tokenizers loaded from a checkpoint folder: K2's tiktoken BPE, or a Hugging Face `tokenizer.json`.

K2 (`tiktoken.model` + tokenizer_config.json): one `base64(bytes) rank` line per mergeable token (163,584 for
K2). The 256 ids after the last rank are special slots: those named in `added_tokens_decoder` ([BOS],
<|im_end|>, ...), the rest `<|reserved_token_N|>`. Pre-tokenization uses K2's pattern (Han runs kept whole,
case-aware words, numbers in groups of at most three). A GGUF file of K2 (hybrid.read.gguf) carries the same
tokenizer as a token list whose ids are the ranks: `TiktokenTokenizer.from_gguf`.

DeepSeek-V3/R1 (`tokenizer.json`): byte-level BPE run by the `tokenizers` package; its added tokens
(<｜begin▁of▁sentence｜>, <｜User｜>, ...) are the special tokens.

Both give the same interface: `encode`, `encode_marked` (a rendered prompt whose untrusted text stands behind
placeholders, see hybrid.generation.chat_template), `decode`, `token_bytes` (the raw bytes of one token, so streamed text
never splits a UTF-8 character, see hybrid.generation.streaming), `token_id` (a special token's id) and
`special_tokens_map` (bos/eos/unk/pad strings from tokenizer_config.json, which chat templates read).
"""

import base64
import json
import re
from functools import cached_property
from pathlib import Path

import tiktoken

from hybrid.errors import ConfigError
from hybrid.read.config import read_json_object
from hybrid.read.gguf import byte_alphabet

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
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """The common interface; `Tokenizer.from_folder` picks the backend the checkpoint ships."""

    special: dict[str, int]  # special / added token text -> id
    special_tokens_map: dict[str, str]  # bos_token, eos_token, ... -> token text (for chat templates)

    @classmethod
    def from_folder(cls, folder) -> "Tokenizer | None":
        """The tokenizer shipped in a checkpoint folder (tiktoken.model first, else tokenizer.json), or None
        when the folder has neither."""
        folder = Path(folder)
        if (folder / "tiktoken.model").is_file():
            return TiktokenTokenizer.load(folder)
        if (folder / "tokenizer.json").is_file():
            return JsonTokenizer.load(folder)
        return None

    @property
    def n_vocab(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Special tokens written in the text become their ids (as Hugging Face's apply_chat_template does
        with a rendered prompt); with allow_special=False they are encoded as plain text."""
        raise NotImplementedError

    def encode_marked(self, text: str, literals: dict[str, str]) -> list[int]:
        """`text` encoded with its special-token strings as control tokens, except that each key of `literals`
        (a placeholder standing for untrusted text) is put back as its value and encoded as plain text, even
        where that value spells a special token. Text holding no placeholder gives exactly encode(text)."""
        literals = {k: v for k, v in literals.items() if k in text}
        if not literals:
            return self.encode(text)
        restore = re.compile("|".join(map(re.escape, sorted(literals, key=len, reverse=True))))
        ids = []
        # Both backends encode the text between special tokens piece by piece, so encoding each piece alone
        # (its placeholders put back) changes nothing but what the placeholders stood for.
        for i, piece in enumerate(self.special_pattern.split(text)):
            if i % 2:
                ids.append(self.special[piece])
            elif piece:
                ids += self.encode(restore.sub(lambda m: literals[m[0]], piece), allow_special=False)
        return ids

    @cached_property
    def special_pattern(self) -> re.Pattern:
        """Matches any special-token string, the longest where several start at one place; `split` keeps
        the matches at odd indices."""
        alternatives = "|".join(map(re.escape, sorted(self.special, key=len, reverse=True)))
        return re.compile(f"({alternatives or '(?!)'})")  # (?!) never matches: no special tokens

    @cached_property
    def special_prefixes(self) -> frozenset[str]:
        """Every proper prefix of a special-token string: text ending in one could become a special token
        with what follows it."""
        return frozenset(s[:n] for s in self.special for n in range(1, len(s)))

    def decode(self, ids) -> str:
        raise NotImplementedError

    def token_bytes(self, token: int) -> bytes:
        raise NotImplementedError

    def token_id(self, text: str) -> int | None:
        return self.special.get(text)


class TiktokenTokenizer(Tokenizer):
    def __init__(self, encoding: tiktoken.Encoding, special: dict[str, int], special_tokens_map=None):
        self.encoding, self.special = encoding, special
        self.special_tokens_map = special_tokens_map or {}

    @classmethod
    def load(cls, folder: Path) -> "TiktokenTokenizer":
        ranks = read_ranks(folder / "tiktoken.model")
        cfg = read_tokenizer_config(folder)
        special = special_tokens(cfg, folder / "tokenizer_config.json", len(ranks))
        enc = tiktoken.Encoding(name=folder.name, pat_str=K2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        return cls(enc, special, special_tokens_map(cfg))

    @classmethod
    def from_gguf(cls, ckpt) -> "TiktokenTokenizer":
        """K2's tokenizer from a GGUF checkpoint (hybrid.read.gguf): its token list holds the tiktoken ranks
        as ids and the special slots as control tokens; the pattern is K2's."""
        return cls.from_pieces(Path(ckpt.folder).name, *ckpt.tokenizer_pieces()[:3])

    @classmethod
    def from_pieces(cls, name: str, ranks: dict, special: dict, special_map: dict) -> "TiktokenTokenizer":
        """K2's tokenizer from GGUFCheckpoint.tokenizer_pieces()' ranks, special tokens and bos/eos strings."""
        enc = tiktoken.Encoding(name=name, pat_str=K2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
        return cls(enc, special, special_map)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        return self.encoding.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids), errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token)


class JsonTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (DeepSeek-V3/R1) through the `tokenizers` package. Byte-level BPE vocab
    entries are spelled in GPT-2's printable alphabet; `token_bytes` maps them back to raw bytes."""

    def __init__(self, backend, special_tokens_map=None, byte_level: bool = True):
        """backend: a tokenizers.Tokenizer whose added tokens are all flagged special (as `load` makes them)."""
        self.backend = backend
        self.special = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self._special_ids = set(self.special.values())
        self.special_tokens_map = special_tokens_map or {}
        self._byte_level = byte_level
        self._from_alphabet = {c: b for b, c in byte_alphabet().items()}

    @classmethod
    def load(cls, folder: Path) -> "JsonTokenizer":
        from tokenizers import Tokenizer as Backend

        path = folder / "tokenizer.json"
        try:
            text = path.read_text()
            spec = json.loads(text)
            # tokenizers matches an added token that is not flagged special (DeepSeek's <｜User｜>, <think>)
            # even when told to encode special tokens as text; flagged special, every one obeys allow_special.
            plain = [t for t in spec.get("added_tokens") or [] if not t.get("special")]
            for token in plain:
                token["special"] = True
            backend = Backend.from_str(json.dumps(spec) if plain else text)
        except Exception as e:  # the Rust side raises plain Exceptions with serde's message
            raise ConfigError(f"{path}: not a tokenizers file ({e})") from None
        return cls(backend, special_tokens_map(read_tokenizer_config(folder)), _uses_byte_level(spec))

    @property
    def n_vocab(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        self.backend.encode_special_tokens = not allow_special
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token: int) -> bytes:
        piece = self.backend.id_to_token(token)
        if piece is None:
            raise ValueError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
        if token in self._special_ids:
            return piece.encode()  # added tokens are stored as plain text
        if not self._byte_level:
            # Not the DeepSeek-V3 family's format: a token's decoded text is the best available answer.
            return self.backend.decode([token]).encode()
        return bytes(self._from_alphabet[c] for c in piece)


def _uses_byte_level(spec: dict) -> bool:
    decoder = spec.get("decoder") or {}
    parts = decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    return any(d.get("type") == "ByteLevel" for d in parts)


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


def read_tokenizer_config(folder: Path) -> dict:
    return read_json_object(Path(folder) / "tokenizer_config.json", missing_ok=True)


def special_tokens(cfg: dict, path: Path, n_ranks: int) -> dict[str, int]:
    """K2's special slots n_ranks .. n_ranks+255: named ones from added_tokens_decoder, the rest reserved."""
    try:
        named = {int(i): t["content"] for i, t in cfg.get("added_tokens_decoder", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ConfigError(f"{path}: 'added_tokens_decoder' must map ids to {{\"content\": ...}}") from None
    ids = range(n_ranks, n_ranks + N_SPECIAL_SLOTS)
    return {named.get(i, f"<|reserved_token_{i}|>"): i for i in ids}


def special_tokens_map(cfg: dict) -> dict[str, str]:
    """bos_token etc. as strings; tokenizer_config.json writes each as a string or as {"content": ...}."""
    out = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = cfg.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out
