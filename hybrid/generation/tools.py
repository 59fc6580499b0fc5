"""Tool calls: K2's tool-call sections parsed into OpenAI-style calls, incrementally while text streams.

K2 writes, after any text of its reply:

    <|tool_calls_section_begin|>
    <|tool_call_begin|>functions.NAME:IDX<|tool_call_argument_begin|>{json arguments}<|tool_call_end|>
    ...more calls...
    <|tool_calls_section_end|>

(without the line breaks). `functions.NAME:IDX` is the call's id, kept as the model wrote it, since the tool
result message must quote it (`tool_call_id`) for the template's "## Return of ID". IDX counts calls within
the reply from 0.

`ToolCallStream` takes text in arbitrary pieces (a marker may arrive split anywhere) and returns events:
`Text` to show, a `ToolCall` as soon as its end marker arrives, and `Warn` for malformed output. It holds back
only what could still become the section's begin marker, so no marker fragment is ever shown as text.
Malformed output never raises: a call whose arguments are not a JSON object, garbage inside a section, or a
section the reply never closes comes out as its raw text plus a warning. Feeding a reply whole or in any
split gives the same events, once adjacent texts are joined.

Tool declarations (`--tools tools.json`) are OpenAI's: a list of {"type": "function", "function": {"name",
"description", "parameters"}}; a bare {"name", ...} is wrapped into that form.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from hybrid.errors import ConfigError

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARGUMENT_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
CALL_ID = re.compile(r"(?:functions\.)?(?P<name>[^\s:<>]+):(?P<index>\d+)")


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Reasoning:
    text: str  # a thinking model's reasoning (hybrid.generation.reasoning), never part of the content


@dataclass(frozen=True)
class Warn:
    message: str


@dataclass(frozen=True)
class ToolCall:
    id: str  # as the model wrote it, e.g. "functions.get_weather:0"
    name: str
    arguments: str  # the JSON text of an object, as written

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Reply:
    """A whole reply parsed: the text around the sections, the calls, and what was malformed (and a thinking
    model's reasoning)."""
    content: str
    tool_calls: list[ToolCall]
    warnings: list[str]
    reasoning: str = ""


class EventStream:
    """Text fed in pieces into `_buf`; `_step(events)` consumes what the buffer decides, False when it needs more."""

    _buf = ""

    def push(self, text: str) -> list:
        """Feed the next piece of the reply; returns the events it completes."""
        self._buf += text
        events = []
        while self._step(events):
            pass
        return events

    def _step(self, events: list) -> bool:
        raise NotImplementedError


class ToolCallStream(EventStream):
    def __init__(self):
        self._buf = ""
        self._in_section = False

    def finish(self) -> list:
        """At the end of the reply: whatever is held back, and a warning if a section is still open."""
        events, rest = [], self._buf
        self._buf = ""
        if self._in_section:
            self._in_section = False
            rest = rest.lstrip()
            if rest:
                events += [Text(rest), Warn(f"incomplete tool call shown as text: {_short(rest)}")]
            events.append(Warn("the reply ended inside a tool-call section (no <|tool_calls_section_end|>)"))
        elif rest:
            events.append(Text(rest))
        return events

    def _step(self, events: list) -> bool:
        """Consume one complete item from the buffer; False when it needs more text."""
        if not self._in_section:
            at = self._buf.find(SECTION_BEGIN)
            if at < 0:
                keep = partial_suffix(self._buf, (SECTION_BEGIN,))
                _emit_text(events, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return False
            _emit_text(events, self._buf[:at])
            self._buf, self._in_section = self._buf[at + len(SECTION_BEGIN):], True
            return True
        self._buf = self._buf.lstrip()  # whitespace between calls means nothing
        buf = self._buf
        if buf.startswith(SECTION_END):
            self._buf, self._in_section = buf[len(SECTION_END):], False
            return True
        if buf.startswith(CALL_BEGIN):
            return self._take_call(events)
        if not buf or any(m.startswith(buf) for m in (SECTION_END, CALL_BEGIN)):
            return False
        # Not a call: raw text up to the next marker that can restart the structure.
        ends = [i for i in (buf.find(CALL_BEGIN), buf.find(SECTION_END)) if i > 0]
        if not ends:
            return False
        events += [Text(buf[:min(ends)]), Warn(f"text inside a tool-call section: {_short(buf[:min(ends)])}")]
        self._buf = buf[min(ends):]
        return True

    def _take_call(self, events: list) -> bool:
        body_at = len(CALL_BEGIN)
        end = self._buf.find(CALL_END, body_at)
        # A call is cut short when the next call or the section's end starts before its own end marker.
        cuts = [i for i in (self._buf.find(CALL_BEGIN, body_at), self._buf.find(SECTION_END, body_at)) if i >= 0]
        cut = min(cuts, default=-1)
        if cut >= 0 and (end < 0 or cut < end):
            raw = self._buf[:cut]
            events += [Text(raw), Warn(f"tool call without {CALL_END}: {_short(raw)}")]
            self._buf = self._buf[cut:]
            return True
        if end < 0:
            return False
        raw, body = self._buf[:end + len(CALL_END)], self._buf[body_at:end]
        self._buf = self._buf[end + len(CALL_END):]
        call, problem = parse_call(body)
        events.extend([call] if call else [Text(raw), Warn(f"{problem}: {_short(raw)}")])
        return True


def parse_call(body: str) -> tuple[ToolCall | None, str]:
    """`ID<|tool_call_argument_begin|>ARGS` -> (the call, "") or (None, what is wrong)."""
    call_id, sep, args = body.partition(ARGUMENT_BEGIN)
    call_id, args = call_id.strip(), args.strip()
    if not sep:
        return None, f"tool call without {ARGUMENT_BEGIN}"
    m = CALL_ID.fullmatch(call_id)
    if not m:
        return None, f"tool call id {call_id!r} is not functions.NAME:INDEX"
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as e:
        return None, f"tool call arguments are not valid JSON ({e.msg} at {e.pos})"
    if not isinstance(parsed, dict):
        return None, "tool call arguments are not a JSON object"
    return ToolCall(call_id, m["name"], args), ""


def parse_reply(text: str) -> Reply:
    """A whole reply at once (the same parser as the stream)."""
    stream = ToolCallStream()
    return collect(stream.push(text) + stream.finish())


def collect(events) -> Reply:
    reply = Reply("", [], [])
    for e in events:
        if isinstance(e, Text):
            reply.content += e.text
        elif isinstance(e, Reasoning):
            reply.reasoning += e.text
        elif isinstance(e, ToolCall):
            reply.tool_calls.append(e)
        else:
            reply.warnings.append(e.message)
    return reply


def load_tools(path) -> list[dict]:
    """A tools.json file: a list of OpenAI function declarations (bare {"name", ...} entries are wrapped)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read a JSON list of tools ({e})") from None
    if isinstance(raw, dict) and isinstance(raw.get("tools"), list):
        raw = raw["tools"]
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a JSON list of tool declarations")
    tools = []
    for i, tool in enumerate(raw):
        if isinstance(tool, dict) and ("type" in tool or "function" in tool) and tool.get("type") != "function":
            raise ConfigError(f"{path}: tool {i} has type {tool.get('type')!r}; declarations in OpenAI form are "
                              "{\"type\": \"function\", \"function\": {...}} (or a bare {\"name\": ...})")
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ConfigError(f"{path}: tool {i} needs a \"name\" (OpenAI form: "
                              "{\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}})")
        tools.append({"type": "function", "function": fn})
    return tools


def partial_suffix(text: str, markers) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of the markers."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


def _emit_text(events: list, text: str):
    if text:
        events.append(Text(text))


def _short(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
