"""OpenAI wire format: /v1/models, /v1/chat/completions and /v1/completions, plain JSON or SSE chunks.

A thinking model's reasoning comes apart from the content as vLLM and SGLang return it: `message.reasoning_content`
(null when the reply had none), `delta.reasoning_content` chunks before the content's; an earlier assistant turn's
`reasoning_content` (or `reasoning`) sent back goes to the chat template, which keeps or drops it."""

import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from hybrid.server.schemas import ChatRequest, CompletionRequest
from hybrid.server.service import ServeError, error_events, forced_prefix
from hybrid.generation.tools import Reasoning, Text, ToolCall

router = APIRouter()


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")


def messages_of(req: ChatRequest) -> list[dict]:
    out = []
    for m in req.messages:
        d = {"role": "system" if m.role == "developer" else m.role}
        if m.role == "user" and isinstance(m.content, list):  # content parts: the template renders them
            d["content"] = [p for p in m.content if isinstance(p, dict)]
        else:
            d["content"] = _text(m.content)
        for key in ("name", "tool_call_id"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        reasoning = m.reasoning_content if m.reasoning_content is not None else m.reasoning
        if m.role == "assistant" and reasoning:
            d["reasoning_content"] = reasoning
        if m.tool_calls is not None:
            d["tool_calls"] = [c.model_dump(exclude_unset=True) for c in m.tool_calls]
        out.append(d)
    return out


def tools_of(req: ChatRequest) -> list[dict] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    return [t.model_dump(exclude_unset=True) for t in req.tools]


def sampling_of(body) -> dict:
    return {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p", "seed")}


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage object; cached: prompt tokens reused from an earlier request's cache (counted in prompt)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(e: ServeError) -> str:
    """OpenAI's in-stream error: a data event holding an `error` object (its clients raise APIError on it)."""
    return sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}}) + \
        "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request):
    svc = request.app.state.service
    return {"object": "list", "data": [{"id": name, "object": "model", "created": svc.created,
                                        "owned_by": "hybrid", "max_model_len": svc.max_context}
                                       for name in svc.names]}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatRequest, request: Request):
    svc = request.app.state.service
    model = svc.model_name(body.model)
    if body.n != 1:
        raise ServeError(400, "only n=1 is supported", "n")
    tools = tools_of(body)
    prefix = forced_prefix(body.tool_choice, tools)
    ids = svc.prompt(messages_of(body), tools, prefix)
    params = svc.params(len(ids), body.max_completion_tokens or body.max_tokens, **sampling_of(body))
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    splitter = svc.splitter(ids, parse=bool(tools), prefix=prefix)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": model}
    steps = await svc.run(ids, params, stop, request, ignore_eos=body.ignore_eos)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(error_events(_chat_chunks(steps, splitter, head, len(ids), include_usage),
                                              sse_error), media_type="text/event-stream")
    n, reason = await splitter.consume(steps)
    out = splitter.outcome
    message = {"role": "assistant", "content": out.content or (None if out.tool_calls else "")}
    if svc.thinking:
        message["reasoning_content"] = out.reasoning or None
    if out.tool_calls:
        message["tool_calls"] = [c.openai() for c in out.tool_calls]
        reason = "tool_calls"
    return {**head, "object": "chat.completion", "choices": [{"index": 0, "message": message,
                                                              "finish_reason": reason, "logprobs": None}],
            "usage": usage(len(ids), n, steps.cached_tokens)}


async def _chat_chunks(steps, splitter, head, n_prompt, include_usage):
    def chunk(delta, finish=None):
        return sse({**head, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

    yield chunk({"role": "assistant", "content": ""})
    n, reason, calls = 0, "stop", 0
    async for step in steps:
        n += 1
        for event in splitter.push(step.text, final=bool(step.finish_reason)):
            if isinstance(event, Text) and event.text:
                yield chunk({"content": event.text})
            elif isinstance(event, Reasoning) and event.text:
                yield chunk({"reasoning_content": event.text})
            elif isinstance(event, ToolCall):
                yield chunk({"tool_calls": [{"index": calls, **event.openai()}]})
                calls += 1
        reason = step.finish_reason or reason
    yield chunk({}, "tool_calls" if calls else reason)
    if include_usage:
        yield sse({**head, "object": "chat.completion.chunk", "choices": [],
                   "usage": usage(n_prompt, n, steps.cached_tokens)})
    yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    svc = request.app.state.service
    model = svc.model_name(body.model)
    if body.n != 1:
        raise ServeError(400, "only n=1 is supported", "n")
    ids = body.prompt if isinstance(body.prompt, list) else svc.tokenizer.encode(body.prompt, allow_special=True)
    if not ids:
        raise ServeError(400, "prompt is empty: give at least one token", "prompt")
    params = svc.params(len(ids), body.max_tokens, **sampling_of(body))
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": model}
    steps = await svc.run(ids, params, stop, request, "prompt", body.ignore_eos)
    if body.stream:
        return StreamingResponse(error_events(_completion_chunks(steps, head, len(ids), body), sse_error),
                                 media_type="text/event-stream")
    text, n, reason = "", 0, "stop"
    async for step in steps:
        text, n, reason = text + step.text, n + 1, step.finish_reason or reason
    return {**head, "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}],
            "usage": usage(len(ids), n, steps.cached_tokens)}


async def _completion_chunks(steps, head, n_prompt, body):
    n = 0
    async for step in steps:
        n += 1
        yield sse({**head, "choices": [{"index": 0, "text": step.text, "finish_reason": step.finish_reason,
                                        "logprobs": None}]})
    if body.stream_options and body.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": usage(n_prompt, n, steps.cached_tokens)})
    yield "data: [DONE]\n\n"
