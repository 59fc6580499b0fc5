"""Chat templates: the checkpoint's own Jinja template, rendered the way Hugging Face's apply_chat_template does.

Where the template comes from, first found wins (Hugging Face's order): `chat_template.jinja`,
`chat_template.json` ({"chat_template": ...}), tokenizer_config.json's `chat_template` (a string, or a list of
{"name", "template"} whose "tool_use" entry is used when tools are declared and "default" otherwise).

The environment matches transformers': a sandbox with trim_blocks and lstrip_blocks, loop controls, a `tojson`
filter taking ensure_ascii (default False), indent, separators and sort_keys, `raise_exception(msg)`,
`strftime_now(fmt)`, and the `{% generation %}` block (kept as plain text). The context holds `messages`,
`tools`, `add_generation_prompt`, the special tokens of tokenizer_config.json (bos_token, eos_token, ...) and
any extra keyword. The model's default system prompt is the template's business: K2's templates insert one
("You are Kimi, an AI assistant created by Moonshot AI." in 0905, "You are a helpful assistant" in 0711)
whenever the first message is not a system message.

`hybrid/generation/templates/kimi_k2.jinja` is K2-Instruct-0905's template for checkpoints that ship none (the demo model);
templates/SOURCES.md says where its text comes from.

`ChatTemplate.encode` gives the prompt's token ids, and only the template's own text can make control tokens
there: a message that writes `<|im_end|><|im_system|>...` (a user, a tool result, a fetched web page) would
otherwise close its turn and forge a system or tool-call turn. Before rendering, every special-token string in
the messages, tools and extra variables is swapped for a placeholder (ASCII with a random per-render nonce,
which untrusted text cannot guess and tojson leaves alone); after rendering, the tokenizer encodes the text
between the template's markers with the placeholders put back, as plain text. So does a string's trailing
fragment that could begin a special token with what the template writes next (two content parts "<|im_" and
"end|>" rendered side by side). Input without such text gives exactly the ids of encoding the rendering.
"""

import json
import secrets
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError, TemplateSyntaxError, nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hybrid.errors import ConfigError, GenerationError
from hybrid.generation.tokenizer import read_tokenizer_config, special_tokens_map

PACKAGED = Path(__file__).resolve().parent / "templates"
K2_TEMPLATE = PACKAGED / "kimi_k2.jinja"


class ChatTemplate:
    def __init__(self, sources: dict[str, str], origin: str, special_tokens: dict[str, str] | None = None):
        """sources: template name -> Jinja text ("default", optionally "tool_use"); origin names the file in
        errors; special_tokens: bos_token etc., as tokenizer_config.json spells them."""
        if "default" not in sources:
            raise ConfigError(f"{origin}: no 'default' chat template among {sorted(sources)}")
        self.origin, self.special_tokens = origin, dict(special_tokens or {})
        self.sources = dict(sources)
        env = _environment()
        self._compiled = {}
        for name, source in sources.items():
            try:
                self._compiled[name] = env.from_string(source)
            except TemplateSyntaxError as e:
                raise ConfigError(f"{origin}: chat template {name!r} line {e.lineno}: {e.message}") from None

    @classmethod
    def from_file(cls, path, special_tokens=None) -> "ChatTemplate":
        path = Path(path)
        return cls({"default": path.read_text()}, str(path), special_tokens)

    def mentions(self, text: str) -> bool:
        """Whether the template's source writes `text` anywhere (`<think>`: the model reasons first)."""
        return any(text in source for source in self.sources.values())

    def render(self, messages: list[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               **kwargs) -> str:
        """The prompt text for `messages` (OpenAI-style dicts: role, content, tool_calls, tool_call_id, name),
        ending with the assistant's header when add_generation_prompt."""
        template = self._compiled.get("tool_use") if tools else None
        template = template or self._compiled["default"]
        context = self.special_tokens | kwargs
        try:
            return template.render(messages=messages, tools=tools or None,
                                   add_generation_prompt=add_generation_prompt, **context)
        except TemplateError as e:  # raise_exception(), a sandbox refusal, a bad message shape
            raise GenerationError(f"chat template ({self.origin}): {e.message or e}") from None
        except (TypeError, KeyError, AttributeError) as e:
            raise GenerationError(f"chat template ({self.origin}) cannot render these messages: {e}") from None

    def encode(self, tokenizer, messages: list[dict], tools: list[dict] | None = None,
               add_generation_prompt: bool = True, suffix: Sequence[str] = (), **kwargs) -> list[int]:
        """The prompt's token ids: `render(...)` encoded so that every string of messages, tools and kwargs
        (content and its parts, names, ids, arguments, tool schemas, dict keys too) is plain text, special-token
        strings included. suffix: parts appended after the rendering (an assistant prefill such as a forced
        tool call); a part that is exactly a special token's text becomes that token, any other is plain text."""
        if isinstance(suffix, str):
            raise ValueError("suffix must be a list of parts (a special token's text, or plain text), not a string")
        hold = _Placeholders(tokenizer)
        text = self.render(hold(messages), tools=hold(tools), add_generation_prompt=add_generation_prompt,
                           **hold(kwargs))
        text += "".join(part if part in tokenizer.special else hold(part) for part in suffix)
        return tokenizer.encode_marked(text, hold.literals)


class _Placeholders:
    """Untrusted strings with their special-token text swapped for placeholders; `literals` maps each
    placeholder back to its text, for Tokenizer.encode_marked."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.nonce = secrets.token_hex(8)  # fresh per render: no message can write a placeholder itself
        self.literals: dict[str, str] = {}
        self._held: dict[str, str] = {}  # text -> its placeholder
        self._longest = max(map(len, tokenizer.special), default=0)

    def __call__(self, value):
        """A copy of JSON-like `value` (dicts, lists, strings; other values as they are) with every string
        and dict key held."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value

    def text(self, s: str) -> str:
        parts = self.tokenizer.special_pattern.split(s)  # special-token strings at odd indices
        # A trailing proper prefix of a special token ("<|im_") would make one with the next string the
        # template writes ("end|>"); the template's own text never ends inside a marker, so holding the tail
        # of each string is enough.
        last = parts[-1]
        n = next((n for n in range(min(len(last), self._longest - 1), 0, -1)
                  if last[-n:] in self.tokenizer.special_prefixes), 0)
        parts[-1] = last[:len(last) - n]
        tail = self._hold(last[len(last) - n:]) if n else ""
        return "".join(self._hold(p) if i % 2 else p for i, p in enumerate(parts)) + tail

    def _hold(self, text: str) -> str:
        if text not in self._held:
            placeholder = f"hybrid{self.nonce}n{len(self._held)}x"  # letters and digits: tojson keeps them
            self._held[text], self.literals[placeholder] = placeholder, text
        return self._held[text]


def load_chat_template(folder) -> ChatTemplate | None:
    """The chat template a checkpoint folder ships, or None when it has none."""
    folder = Path(folder)
    cfg = read_tokenizer_config(folder)
    special = special_tokens_map(cfg)
    jinja, js = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        return ChatTemplate.from_file(jinja, special)
    if js.is_file():
        try:
            source = json.loads(js.read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{js}: expected a JSON object with a 'chat_template' string") from None
        return ChatTemplate({"default": source}, str(js), special)
    raw = cfg.get("chat_template")
    if raw is None:
        return None
    origin = str(folder / "tokenizer_config.json")
    if isinstance(raw, str):
        return ChatTemplate({"default": raw}, origin, special)
    try:
        return ChatTemplate({t["name"]: t["template"] for t in raw}, origin, special)
    except (KeyError, TypeError):
        raise ConfigError(f"{origin}: 'chat_template' must be a string or a list of "
                          "{\"name\": ..., \"template\": ...}") from None


def chat_template_for(folder, tokenizer, required: bool = True) -> ChatTemplate | None:
    """The checkpoint's own template; K2's packaged one when a K2-tokenizer checkpoint ships none. Without
    either: a ConfigError, or None when not `required`."""
    template = load_chat_template(folder)
    if template is not None:
        return template
    if tokenizer.token_id("<|im_user|>") is not None and tokenizer.token_id("<|im_middle|>") is not None:
        return k2_template(tokenizer.special_tokens_map)
    if not required:
        return None
    raise ConfigError(f"{folder}: no chat template (chat_template.jinja or tokenizer_config.json's "
                      "chat_template)")


def k2_template(special_tokens=None) -> ChatTemplate:
    """K2-Instruct-0905's template as this package ships it (for checkpoints without one)."""
    return ChatTemplate.from_file(K2_TEMPLATE, special_tokens)


class _GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering for inference
    keeps the text."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message):
    raise TemplateError(message)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols, _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
