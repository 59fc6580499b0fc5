"""A chat session: messages, the checkpoint's template, tool calls, and one cache kept across turns.

Each turn renders the whole conversation with the chat template, encodes it, and prefills only what the cache
does not already hold: the longest common prefix of the cached tokens and the new prompt is kept, the rest is
computed. So a reply costs its new tokens, not the history; a changed system prompt or a re-tokenised reply
costs the tokens from the first difference on.

The session yields a reply as events (hybrid.generation.tools: Text, ToolCall, Warn, and Reasoning for a thinking
model) while it streams, and appends the assistant message (OpenAI form: content, tool_calls, and the reasoning
as `reasoning_content`, which the template keeps or drops for later turns) when the reply ends, whether it
finished, hit a limit or was cancelled between two tokens. Library code: no printing, no terminal.
"""

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from hybrid.errors import GenerationError
from hybrid.generation.generate import Stats, generate
from hybrid.generation.reasoning import prompt_opens_reasoning, reply_stream
from hybrid.generation.tools import ToolCall, collect, load_tools


@dataclass
class Turn:
    """The last reply: what was prefilled and decoded, how fast, and how it ended."""
    new_tokens: int = 0  # prompt tokens prefilled this turn
    reused_tokens: int = 0  # prompt tokens already in the cache
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None  # stop, length, tool_calls, interrupted
    n_tool_calls: int = 0
    reasoning_tokens: int = 0  # generated while the reply was in its think block


class ChatSession:
    def __init__(self, runtime, params, tools=None, system=None, context: int | None = None):
        """runtime: an opened hybrid.generation.runtime.Runtime; params: SamplingParams (max_new_tokens per reply);
        context: cache positions (default and limit: the runtime's context limit)."""
        self.runtime, self.model, self.tokenizer = runtime, runtime.model, runtime.tokenizer
        self.template = runtime.chat_template()
        self.params, self.stop_ids, self.tools = params, set(runtime.stop_ids), tools or None
        self.thinking = runtime.thinking  # split the reasoning off each reply (hybrid.generation.reasoning)
        self.reasoning_tokens = 0  # of the reply in progress, so far
        self.cache = runtime.new_cache(min(context or runtime.max_context, runtime.max_context))
        self.cached_ids: list[int] = []  # the tokens the cache holds, in order
        self.system = system or None
        self.messages: list[dict] = []
        self.reset()
        self.last = Turn()

    @classmethod
    def open(cls, runtime, system=None, temperature=None, max_new_tokens=None, seed=None, tools_file=None,
             context=None) -> "ChatSession":
        """A session on an opened runtime, with its template, sampling defaults and stop ids."""
        params = runtime.sampling(temperature=temperature, seed=seed,
                                  max_new_tokens=max_new_tokens or 1 << 30)  # a reply may fill the context
        tools = load_tools(tools_file) if tools_file else None
        return cls(runtime, params, tools, system, context)

    # --- the conversation

    def reset(self):
        """Forget the conversation (the system prompt stays; the cache keeps its reusable prefix)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def set_system(self, text: str | None):
        """Replace the system prompt (None or "": the template's default) and keep the conversation."""
        self.system = text or None
        if self.messages and self.messages[0]["role"] == "system":
            self.messages.pop(0)
        if self.system:
            self.messages.insert(0, {"role": "system", "content": self.system})

    def add_user(self, text: str):
        self.messages.append({"role": "user", "content": text})

    def add_tool_result(self, call: ToolCall, content: str):
        self.messages.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": content})

    def forget_unanswered(self):
        """Drop trailing user and tool messages (a reply that could not start leaves them unanswered)."""
        while self.messages and self.messages[-1]["role"] in ("user", "tool"):
            self.messages.pop()

    def save(self, path) -> int:
        """Write the conversation as a JSON list of messages; returns how many."""
        Path(path).write_text(json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n")
        return len(self.messages)

    def prompt_ids(self) -> list[int]:
        """The conversation rendered and encoded; what the messages and tools say is text, never control
        tokens (see ChatTemplate.encode)."""
        return self.template.encode(self.tokenizer, self.messages, tools=self.tools, add_generation_prompt=True)

    # --- one reply

    def respond(self, cancel: Callable[[], bool] = lambda: False) -> Iterator:
        """Generate the assistant's reply to the conversation, yielding Text / ToolCall / Warn events as they
        come; `cancel()` is asked between tokens and ends the reply early (its text so far is kept)."""
        if not self.messages or self.messages[-1]["role"] not in ("user", "tool"):
            raise GenerationError("nothing to answer: the conversation must end with a user or tool message")
        ids = self.prompt_ids()
        keep = self._reuse(ids)
        room = self.cache.max_len - len(ids)
        if room <= 0:
            raise GenerationError(f"context full: the conversation is {len(ids)} tokens, the cache holds "
                                  f"{self.cache.max_len}; /reset starts over")
        params = replace(self.params, max_new_tokens=min(self.params.max_new_tokens, room))
        opened = self.thinking and prompt_opens_reasoning(self.tokenizer, ids)
        stats, stream, events, interrupted = Stats(), reply_stream(self.thinking, opened), [], False
        self.reasoning_tokens = 0
        try:
            for step in generate(self.model, ids[keep:], params, self.stop_ids, stats, chunk=self.runtime.prefill_chunk,
                                 tokenizer=self.tokenizer, cache=self.cache):
                pushed = stream.push(step.text)
                self.reasoning_tokens += getattr(stream, "reasoning", False)  # this token left it inside the block
                for event in pushed:
                    events.append(event)
                    yield event
                if step.finish_reason is None and cancel():
                    interrupted = True
                    break
        except BaseException:  # stopped inside a forward (a second Ctrl-C) or the caller stopped reading
            self.cache.reset()  # trust nothing cached
            self.cached_ids = []
            self._record(events, stats, ids, keep, "interrupted")
            raise
        self.cached_ids = (ids + stats.tokens)[:self.cache.length]
        for event in stream.finish():
            events.append(event)
            yield event
        self._record(events, stats, ids, keep, "interrupted" if interrupted else stats.finish_reason)

    def _record(self, events, stats: Stats, ids, keep: int, reason):
        """Append the assistant message the events make, and the turn's numbers."""
        reply = collect(events)
        message = {"role": "assistant", "content": reply.content}
        if reply.reasoning:
            message["reasoning_content"] = reply.reasoning
        if reply.tool_calls:
            message["tool_calls"] = [c.openai() for c in reply.tool_calls]
            reason = "tool_calls" if reason != "interrupted" else reason
        self.messages.append(message)
        self.last = Turn(len(ids) - keep, keep, stats.generated_tokens, stats.prefill_s, stats.decode_s, reason,
                         len(reply.tool_calls), self.reasoning_tokens)

    def _reuse(self, ids: list[int]) -> int:
        """Keep the cached prefix the new prompt shares (at least one prompt token must be fed, for logits)."""
        keep = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)
        self.cache.lengths[0] = keep  # positions past it are simply overwritten by the next forward
        self.cached_ids = self.cached_ids[:keep]
        return keep

    # --- numbers for /stats

    def stats(self) -> dict:
        t, used = self.last, self.cache.length
        return {"new_tokens": t.new_tokens, "reused_tokens": t.reused_tokens,
                "prefill_tok_s": t.new_tokens / t.prefill_s if t.prefill_s else 0.0,
                "generated_tokens": t.generated_tokens, "reasoning_tokens": t.reasoning_tokens,
                "decode_tok_s": t.generated_tokens / t.decode_s if t.decode_s else 0.0,
                "finish_reason": t.finish_reason, "cache_tokens": used, "cache_capacity": self.cache.max_len,
                "cache_mib": used * self.cache.nbytes / self.cache.max_len / 2**20,
                "messages": len(self.messages)}
