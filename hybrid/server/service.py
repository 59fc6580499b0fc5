"""What both wire formats share: prompts from messages through the checkpoint's chat template, sampling
parameters within the server's limits, requests run through the engine (awaited from asyncio, cancelled when
the client goes away), K2's output split into reasoning (a thinking model's), text and tool calls, the model
names it answers to, and the counters /metrics shows.

A request's errors reach its client in that API's shape: raised as ServeError before the first token (so the
client gets an HTTP status: `Service.run` waits for the first step before a response starts), and as one
error event inside a stream that has already begun (`error_events`)."""

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from hybrid.generation.engine import Engine, Request
from hybrid.errors import EngineError, GenerationError
from hybrid.generation.reasoning import prompt_opens_reasoning, reply_stream
from hybrid.generation.sampling import SamplingParams
from hybrid.generation.tools import ARGUMENT_BEGIN, CALL_BEGIN, SECTION_BEGIN, Reasoning, Text, ToolCall, Warn
from hybrid.server.observe import trace_of

RATE_WINDOW_S = 60.0
DISCONNECT_POLL_S = 0.5  # how often a waiting request asks whether its client is still there
log = logging.getLogger("hybrid.serve")


class ServeError(Exception):
    """An error the client caused, with its HTTP status and OpenAI-style fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


# Anthropic names its error types by HTTP status, whatever the cause.
ANTHROPIC_KINDS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def anthropic_kind(status: int) -> str:
    return ANTHROPIC_KINDS.get(status, "api_error" if status >= 500 else "invalid_request_error")


@dataclass
class Outcome:
    """One finished generation, split into what the client sees."""

    content: str = ""
    reasoning: str = ""  # a thinking model's think block (OpenAI's reasoning_content, Anthropic's thinking)
    tool_calls: list[ToolCall] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Counters:
    def __init__(self):
        self.requests = self.prompt_tokens = self.generated_tokens = 0
        self.cached_prompt_tokens = self.prefilled_prompt_tokens = 0  # prompt_tokens split by prefix reuse
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
    def __init__(self, runtime, names: tuple[str, ...], max_concurrency: int = 4, max_context: int | None = None,
                 also_accepted: tuple[str, ...] = ()):
        """runtime: an opened hybrid.generation.runtime.Runtime (it needs a tokenizer and a chat template);
        names: the model names the API lists (the first is the main one); also_accepted: names a request's
        `model` may give besides them (the checkpoint folder's); max_context: positions per request, at most
        the runtime's limit."""
        self.runtime, self.names = runtime, tuple(names)
        self.accepted = frozenset(self.names + tuple(also_accepted))
        self.model, self.tokenizer, self.template = runtime.model, runtime.tokenizer, runtime.chat_template()
        self.engine = Engine(runtime.model, runtime.tokenizer, max_batch=max_concurrency,
                             max_context=min(max_context or runtime.max_context, runtime.max_context),
                             prefill_chunk=runtime.prefill_chunk, device=runtime.device)
        self.stop_ids = runtime.stop_ids
        self.thinking = runtime.thinking  # replies start with a think block, returned apart from the content
        self.counters = Counters()
        self.created = int(time.time())

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def model_name(self, requested: str | None) -> str:
        """The name a reply reports for a request's `model`: that name when it is one this server lists, the
        main name when the request names none or the checkpoint folder; vLLM's 404 for any other."""
        if requested in self.names:
            return requested
        if not requested or requested in self.accepted:
            return self.name
        raise ServeError(404, f"The model `{requested}` does not exist.", "model", "model_not_found",
                         kind="NotFoundError")

    def close(self):
        self.engine.close()

    def prompt(self, messages: list[dict], tools=None, prefix: tuple[str, ...] = ()) -> list[int]:
        """The prompt ids for a conversation, then `prefix` (forced_prefix's parts). What the request says is
        encoded as text: only the template's own markers and prefix's marker parts become control tokens. A
        template that refuses the conversation is the client's 400, told without the server's file paths."""
        try:
            return self.template.encode(self.tokenizer, messages, tools=tools, suffix=prefix)
        except GenerationError as e:
            raise ServeError(400, str(e).replace(self.template.origin, "server"), "messages") from None

    def splitter(self, ids: list[int], parse: bool, prefix=()) -> "ReplySplitter":
        """The splitter for a reply to prompt `ids` (prefix's parts included): tool calls parsed when `parse`,
        and for a thinking model the reasoning split off, from the start when the prompt opened the block."""
        opened = self.thinking and prompt_opens_reasoning(self.tokenizer, ids)
        return ReplySplitter(parse, prefix, self.thinking, opened)

    def params(self, n_prompt: int, max_tokens=None, **sampling) -> SamplingParams:
        """The request's SamplingParams: its temperature, top_p, top_k, min_p and seed (None: not sent) over
        the checkpoint's defaults, the same merge every front end makes (Runtime.sampling)."""
        room = self.max_context - n_prompt
        if room < 1:
            raise ServeError(400, f"the prompt has {n_prompt} tokens; this server's context is {self.max_context}",
                             "messages", "context_length_exceeded")
        if max_tokens is not None and max_tokens > room:
            raise ServeError(400, f"max_tokens {max_tokens} + {n_prompt} prompt tokens exceed the context of "
                                  f"{self.max_context}", "max_tokens", "context_length_exceeded")
        return self.runtime.sampling(max_new_tokens=max_tokens or room, **sampling)

    async def run(self, ids: list[int], params: SamplingParams, stop=(), http_request=None, param="messages",
                  ignore_eos: bool = False):
        """Submit a request and wait for its first step, so that what fails before any output (a bad prompt,
        a failed prefill, a stopped engine) raises ServeError while an HTTP status can still be sent. Returns
        an async iterator over all its Steps; the request is cancelled (its slot freed) when the consumer
        stops early or the HTTP client disconnects."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        req = Request(ids, params, lambda s: loop.call_soon_threadsafe(q.put_nowait, s),
                      frozenset() if ignore_eos else self.stop_ids, tuple(stop or ()))
        try:
            self.engine.submit(req)
        except EngineError as e:
            raise ServeError(503, str(e), kind="server_error", code="engine_stopped") from None
        except GenerationError as e:
            code = "context_length_exceeded" if "context overflow" in str(e) else None
            raise ServeError(400, str(e), param, code) from None
        self.counters.requests += 1
        self.counters.prompt_tokens += len(ids)
        run = Run(self, q, req, http_request)
        run.trace.prompt_tokens = len(ids)
        try:
            run.step = await run.next_step()
        except BaseException:
            req.cancel()
            raise
        # the engine set cached_tokens before it handed out the first step
        self.counters.cached_prompt_tokens += req.cached_tokens
        self.counters.prefilled_prompt_tokens += len(ids) - req.cached_tokens
        return run


class Run:
    """One request's Steps as an async iterator. Its request is cancelled (slot freed) when the client goes
    away, when iteration ends early (aclose), and at the latest when the Run is dropped unstarted (a stream
    whose client left before its first chunk)."""

    def __init__(self, service: Service, q: asyncio.Queue, req: Request, http_request):
        self.service, self.q, self.req, self.http_request = service, q, req, http_request
        self.step = None  # the next Step to hand out (the first one is fetched by Service.run)
        self.trace = trace_of(http_request)  # for the access log and the latency histograms
        self.asked = time.monotonic()  # when the client was last asked whether it is still there

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens reused from the engine's cache rather than prefilled (the usage reports')."""
        return self.req.cached_tokens

    def __aiter__(self):
        return self

    async def __anext__(self):
        step = self.step
        if step is None or self.req.cancelled:
            self.req.cancel()
            raise StopAsyncIteration
        try:
            self.step = None if step.finish_reason else await self.next_step()
        except BaseException:
            self.req.cancel()
            raise
        return step

    async def next_step(self):
        """The request's next Step; None once its client has gone; ServeError for a failure. The client is
        asked every DISCONNECT_POLL_S whether it is still there, also while Steps keep coming."""
        while True:
            try:
                step = await asyncio.wait_for(self.q.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                step = None
            if await self._client_gone():
                return None
            if step is None:
                continue
            if isinstance(step, Exception):
                self.service.counters.errors += 1
                raise _serve_error(step)
            self.service.counters.add_generated(1)
            self.trace.token()
            return step

    async def _client_gone(self) -> bool:
        now = time.monotonic()
        if self.http_request is None or now - self.asked < DISCONNECT_POLL_S:
            return False
        self.asked = now
        return await self.http_request.is_disconnected()

    async def aclose(self):
        self.req.cancel()

    def __del__(self):
        self.req.cancel()


def _serve_error(e: Exception) -> ServeError:
    if isinstance(e, EngineError):
        return ServeError(503, str(e), kind="server_error", code="engine_stopped")
    if isinstance(e, GenerationError):
        return ServeError(500, f"generation failed: {e}", kind="server_error")
    log.error("request failed in the engine: %s: %s", type(e).__name__, e)
    return ServeError(500, f"generation failed: {type(e).__name__}", kind="server_error")


async def error_events(chunks, render):
    """Pass a response stream through; a failure after it began becomes one final event rendered in the
    API's own shape (`render(ServeError) -> str`), never a silently cut stream."""
    try:
        async for chunk in chunks:
            yield chunk
    except ServeError as e:
        yield render(e)
    except Exception as e:
        log.exception("stream failed")
        yield render(ServeError(500, f"internal error: {type(e).__name__}", kind="server_error"))


def forced_prefix(tool_choice, tools) -> tuple[str, ...]:
    """What follows the assistant header so K2 must call a tool: 'required' opens a call, a named function
    opens that call up to its arguments. Given as parts for Service.prompt: each marker a part of its own, the
    function's name inside a plain-text part (a name that spells a marker stays text). Forcing a call without
    tools is refused, as OpenAI does."""
    if tool_choice in (None, "auto", "none"):
        return ()
    if tool_choice != "required" and not isinstance(tool_choice, dict):
        raise ServeError(400, f"tool_choice {tool_choice!r} is not auto, none, required or a named function",
                         "tool_choice")
    if not tools:
        raise ServeError(400, "tool_choice asks for a tool call, but the request declares no tools", "tool_choice")
    if tool_choice == "required":
        return SECTION_BEGIN, CALL_BEGIN, "functions."
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
    if not isinstance(name, str) or not name:
        raise ServeError(400, "tool_choice names no function", "tool_choice")
    if name not in {t["function"]["name"] for t in tools}:
        raise ServeError(400, f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return SECTION_BEGIN, CALL_BEGIN, f"functions.{name}:0", ARGUMENT_BEGIN


class ReplySplitter:
    """K2's streamed text -> reasoning (thinking models), text pieces and tool calls as they complete
    (parse=False: no tool calls, all text)."""

    def __init__(self, parse: bool, prefix=(), thinking: bool = False, opened: bool = False):
        """prefix: the forced call's text the model continues (forced_prefix's parts, or one string);
        thinking, opened: hybrid.generation.reasoning.reply_stream's."""
        self.stream = reply_stream(thinking, opened, tools=parse)
        self.outcome = Outcome()
        if prefix and parse:
            self.stream.push("".join(prefix))

    async def consume(self, steps) -> tuple[int, str]:
        """Run a whole (non-streamed) reply through the splitter: (tokens generated, finish reason)."""
        n, reason = 0, "stop"
        async for step in steps:
            n += 1
            self.push(step.text, final=bool(step.finish_reason))
            reason = step.finish_reason or reason
        return n, reason

    def push(self, text: str, final: bool = False) -> list:
        events = self.stream.push(text) + (self.stream.finish() if final else [])
        for e in events:
            if isinstance(e, Text):
                self.outcome.content += e.text
            elif isinstance(e, Reasoning):
                self.outcome.reasoning += e.text
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


def load_service(folder, plan_file=None, store=None, names: tuple[str, ...] = (), max_concurrency: int = 4,
                 max_context: int | None = None, threads: int | None = None) -> Service:
    """A Service on the checkpoint at `folder` (K2's packaged template when it ships none), listed under
    `names` (default: the folder's name, which requests may always give); `threads`: open_runtime's."""
    from pathlib import Path

    from hybrid.generation.runtime import open_runtime

    folder_name = Path(folder).name
    runtime = open_runtime(folder, plan_file, store, needs_chat=True, threads=threads)
    return Service(runtime, tuple(names) or (folder_name,), max_concurrency, max_context,
                   also_accepted=(folder_name,))
