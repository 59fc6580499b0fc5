"""Reasoning kept apart from the answer: K2-Thinking's `<think>...</think>` block split from the reply, as it streams.

A thinking model (Kimi-K2-Thinking) writes its reasoning first, then the answer or the tool calls:

    <think>reasoning</think>answer
    <think>reasoning</think><|tool_calls_section_begin|>...<|tool_calls_section_end|>

`ReasoningStream` takes the reply's decoded text in arbitrary pieces (a marker may arrive split anywhere, `<thi`
then `nk>`) and returns events: `Reasoning` for the think block's text, and for everything after it what the
content stream makes of it (a ToolCallStream's Text / ToolCall / Warn, or plain Text). No marker fragment is
ever emitted: what could still become a marker is held back until it does or cannot. The rules, as vLLM's and
SGLang's reasoning parsers have them:
- the reasoning ends at `</think>`, or where a tool-call section begins without one (the section is the
  content's); whitespace right after `</think>` is dropped;
- a reply that ends inside the block (a token limit, a cancel) is reasoning throughout;
- a reply that does not start with `<think>` (leading whitespace aside) is content, unless the prompt already
  opened the block (a template whose generation prompt ends in `<think>`: `opened=True`), when it is reasoning
  up to `</think>`.

Whether a model thinks (`thinks`) is read off its chat template and tokenizer: the template mentions `<think>`
or the tokenizer has it as a token. For any other model `reply_stream` gives the content stream itself, so the
output of K2-Instruct is parsed exactly as before.
"""

from hybrid.generation.tools import SECTION_BEGIN, EventStream, Reasoning, Text, ToolCallStream, partial_suffix

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
REASONING_ENDS = (THINK_CLOSE, SECTION_BEGIN)


class PlainStream:
    """The content stream when tool calls are not parsed: all text."""

    def push(self, text: str) -> list:
        return [Text(text)] if text else []

    def finish(self) -> list:
        return []


class ReasoningStream(EventStream):
    def __init__(self, content, opened: bool = False):
        """content: the stream the answer goes to (ToolCallStream or PlainStream); opened: the prompt ends inside
        an open think block."""
        self.content = content
        self.state = "reasoning" if opened else "start"  # start -> reasoning -> content, or start -> content
        self._buf = ""
        self._trim = False  # drop whitespace before the content (right after </think>)

    @property
    def reasoning(self) -> bool:
        """Whether the reply is (still, or possibly about to be) in its reasoning."""
        return self.state != "content"

    def finish(self) -> list:
        """At the end of the reply: what is held back (an unclosed think block is all reasoning), then the
        content stream's own end."""
        rest, self._buf = self._buf, ""
        if self.state == "reasoning":
            return [Reasoning(rest)] if rest else []
        if self._trim:
            rest = rest.lstrip()
        self.state = "content"
        return self.content.push(rest) + self.content.finish()

    def _step(self, events: list) -> bool:
        """Consume what the buffer decides; False when it needs more text."""
        if self.state == "start":
            head = self._buf.lstrip()
            if head.startswith(THINK_OPEN):
                self._buf, self.state = head[len(THINK_OPEN):], "reasoning"
                return True
            if THINK_OPEN.startswith(head):  # nothing yet, or a beginning of <think>
                return False
            self.state = "content"
            return True
        if self.state == "reasoning":
            found = [(at, m) for m in REASONING_ENDS if (at := self._buf.find(m)) >= 0]
            if not found:
                keep = partial_suffix(self._buf, REASONING_ENDS)
                _reasoning(events, self._buf[:len(self._buf) - keep])
                self._buf = self._buf[len(self._buf) - keep:]
                return False
            at, marker = min(found)
            _reasoning(events, self._buf[:at])
            # </think> is dropped; a tool-call section that ends the reasoning is the content's
            self._buf = self._buf[at + len(marker):] if marker == THINK_CLOSE else self._buf[at:]
            self.state, self._trim = "content", True
            return True
        if self._trim:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._trim = False
        text, self._buf = self._buf, ""
        events += self.content.push(text)
        return False


def _reasoning(events: list, text: str):
    if text:
        events.append(Reasoning(text))


def reply_stream(thinking: bool, opened: bool = False, tools: bool = True):
    """The stream a reply's text goes through: tool calls parsed (or not), reasoning split off for a thinking
    model, nothing more for any other."""
    content = ToolCallStream() if tools else PlainStream()
    return ReasoningStream(content, opened) if thinking else content


def thinks(template, tokenizer) -> bool:
    """Whether a model writes think blocks: its chat template mentions <think>, or its tokenizer has the token."""
    if tokenizer is not None and tokenizer.token_id(THINK_OPEN) is not None:
        return True
    return template is not None and template.mentions(THINK_OPEN)


def prompt_opens_reasoning(tokenizer, ids: list[int]) -> bool:
    """Whether the prompt ends inside an open think block (the generation prompt wrote <think>). With the markers
    as tokens this reads the ids: only the template's own markers are tokens there, so a message that writes
    "<think>" as text cannot open the block."""
    open_id, close_id = tokenizer.token_id(THINK_OPEN), tokenizer.token_id(THINK_CLOSE)
    if open_id is not None and close_id is not None:
        last = {t: i for i, t in enumerate(ids) if t in (open_id, close_id)}
        return last.get(open_id, -1) > last.get(close_id, -1)
    text = tokenizer.decode(ids)
    return text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)
