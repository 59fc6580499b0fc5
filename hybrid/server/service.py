"""What both wire formats share: prompts from messages through the checkpoint's chat template, sampling
parameters within the server's limits, requests run through the engine (awaited from asyncio, cancelled when
the client goes away), K2's output split into text and tool calls, and the counters /metrics shows."""

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field

from hybrid.engine import Engine, Request
from hybrid.errors import GenerationError
from hybrid.generate import default_sampling, default_stop_ids
from hybrid.sampling import SamplingParams
from hybrid.tools import ARGUMENT_BEGIN, CALL_BEGIN, SECTION_BEGIN, Text, ToolCall, ToolCallStream, Warn

RATE_WINDOW_S = 60.0


class ServeError(Exception):
    """An error the client caused, with its HTTP status and OpenAI-style fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


@dataclass
class Outcome:
    """One finished generation, split into what the client sees."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Counters:
    def __init__(self):
        self.requests = self.prompt_tokens = self.generated_tokens = 0
        self.errors = 0
        self._recent = deque()  # (time, tokens) of recent steps, for tokens/s

    def add_generated(self, n: int):
        now = time.monotonic()
        self.generated_tokens += n
        self._recent.append((now, n))
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_s(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        return sum(n for _, n in self._recent) / span if span > 0 else 0.0


class Service:
    def __init__(self, model, tokenizer, template, folder, name: str, max_concurrency: int = 4,
                 max_context: int | None = None):
        if tokenizer is None or template is None:
            raise GenerationError(f"{folder}: serving needs the checkpoint's tokenizer and a chat template")
        self.model, self.tokenizer, self.template, self.name = model, tokenizer, template, name
        self.engine = Engine(model, tokenizer, max_batch=max_concurrency, max_context=max_context)
        self.stop_ids = frozenset(default_stop_ids(folder, model, tokenizer))
        self.defaults = default_sampling(folder, model.config.model_type)
        self.counters = Counters()
        self.created = int(time.time())

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def prompt(self, messages: list[dict], tools=None, prefix: str = "") -> list[int]:
        text = self.template.render(messages, tools=tools, add_generation_prompt=True) + prefix
        return self.tokenizer.encode(text, allow_special=True)

    def params(self, n_prompt: int, temperature=None, top_p=None, max_tokens=None, seed=None) -> SamplingParams:
        room = self.max_context - n_prompt
        if room < 1:
            raise ServeError(400, f"the prompt has {n_prompt} tokens; this server's context is {self.max_context}",
                             "messages", "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ServeError(400, f"max_tokens {max_tokens} + {n_prompt} prompt tokens exceed the context of "
                                  f"{self.max_context}", "max_tokens", "context_length_exceeded")
        values = dict(self.defaults)
        values.update({k: v for k, v in (("temperature", temperature), ("top_p", top_p)) if v is not None})
        return SamplingParams(seed=seed, max_new_tokens=max_tokens or room, **values)

    async def steps(self, ids: list[int], params: SamplingParams, stop=(), http_request=None):
        """Async iterator over the engine's Steps for one request; the request is cancelled (its slot freed)
        when the consumer stops early or the HTTP client disconnects."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = Request(ids, params, lambda s: loop.call_soon_threadsafe(q.put_nowait, s), self.stop_ids,
                      tuple(stop or ()))
        try:
            self.engine.submit(req)
        except GenerationError as e:
            raise ServeError(400, str(e), "messages", "context_length_exceeded") from None
        self.counters.requests += 1
        self.counters.prompt_tokens += len(ids)
        try:
            while True:
                try:
                    step = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if http_request is not None and await http_request.is_disconnected():
                        return
                    continue
                if isinstance(step, Exception):
                    raise ServeError(500, f"generation failed: {step}", kind="server_error")
                self.counters.add_generated(1)
                yield step
                if step.finish_reason:
                    return
        finally:
            req.cancel()


def forced_prefix(tool_choice, tools) -> str:
    """Text appended after the assistant header so K2 must call a tool: 'required' opens a call, a named
    function opens that call up to its arguments."""
    if not tools or tool_choice in (None, "auto", "none"):
        return ""
    if tool_choice == "required":
        return SECTION_BEGIN + CALL_BEGIN + "functions."
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        if not name:
            raise ServeError(400, "tool_choice names no function", "tool_choice")
        if name not in {(t.get("function") or t).get("name") for t in tools}:
            raise ServeError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        return SECTION_BEGIN + CALL_BEGIN + f"functions.{name}:0" + ARGUMENT_BEGIN
    raise ServeError(400, f"tool_choice {tool_choice!r} is not auto, none, required or a named function",
                     "tool_choice")


class ReplySplitter:
    """K2's streamed text -> text pieces and tool calls as they complete (parse=False: all text)."""

    def __init__(self, parse: bool, prefix: str = ""):
        self.stream = ToolCallStream() if parse else None
        self.outcome = Outcome()
        if prefix and self.stream is not None:
            self.stream.push(prefix)

    async def consume(self, steps) -> tuple[int, str]:
        """Run a whole (non-streamed) reply through the splitter: (tokens generated, finish reason)."""
        n, reason = 0, "stop"
        async for step in steps:
            n += 1
            self.push(step.text, final=bool(step.finish_reason))
            reason = step.finish_reason or reason
        return n, reason

    def push(self, text: str, final: bool = False) -> list:
        if self.stream is None:
            events = [Text(text)] if text else []
        else:
            events = self.stream.push(text) + (self.stream.finish() if final else [])
        for e in events:
            if isinstance(e, Text):
                self.outcome.content += e.text
            elif isinstance(e, ToolCall):
                self.outcome.tool_calls.append(e)
            elif isinstance(e, Warn):
                self.outcome.warnings.append(e.message)
        return events


def tool_arguments(call: ToolCall) -> dict:
    try:
        value = json.loads(call.arguments)
        return value if isinstance(value, dict) else {"value": value}
    except json.JSONDecodeError:
        return {"raw": call.arguments}


def load_service(folder, plan_file=None, store=None, name=None, max_concurrency: int = 4,
                 max_context: int | None = None) -> Service:
    """Model, tokenizer and chat template of a checkpoint folder (K2's packaged template when it ships none)."""
    from pathlib import Path

    from hybrid.checkpoint import Checkpoint
    from hybrid.conversation import chat_template_for
    from hybrid.loader import load_model
    from hybrid.tokenizer import Tokenizer

    ckpt = Checkpoint.open(folder)
    plan = None
    if plan_file:
        from placement.plan_file import load_checked_plan

        plan = load_checked_plan(plan_file, ckpt.config)
    tokenizer = Tokenizer.from_folder(folder)
    if tokenizer is None:
        raise GenerationError(f"{folder}: serving needs the checkpoint's tokenizer (tiktoken.model or tokenizer.json)")
    template = chat_template_for(folder, tokenizer)  # the same choice `hybrid chat` makes
    model = load_model(ckpt, plan=plan, store=store)
    return Service(model, tokenizer, template, folder, name or Path(folder).name, max_concurrency, max_context)
