"""Anthropic wire format: /v1/messages, plain JSON or the event stream, mapped onto the same service.

Temperature follows K2's model card for this API: the model runs at 0.6 x the requested temperature
(Anthropic's default 1.0 becomes K2's recommended 0.6)."""

import json
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from hybrid.server.schemas import AnthropicRequest
from hybrid.server.service import (ReplySplitter, ServeError, anthropic_kind, error_events, forced_prefix,
                                   tool_arguments)
from hybrid.generation.tools import Text, ToolCall

router = APIRouter()
K2_TEMPERATURE_SCALE = 0.6
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's -> OpenAI's


def _blocks_text(blocks, where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    if not isinstance(blocks, list):
        raise ServeError(400, f"{where}: expected a string or a list of content blocks", where)
    return "".join(_field(b, "text", str, f"{where}.{i}") for i, b in enumerate(blocks)
                   if isinstance(b, dict) and b.get("type") == "text")


def _field(block: dict, key: str, kind, where: str):
    """A required field of a content block, with the type Anthropic's API gives it."""
    value = block.get(key)
    if not isinstance(value, kind):
        raise ServeError(400, f"{where}.{key}: field required ({kind.__name__})", f"{where}.{key}")
    return value


def messages_of(req: AnthropicRequest) -> list[dict]:
    out = [{"role": "system", "content": _blocks_text(req.system, "system")}] if req.system else []
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        calls = []
        for j, b in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if b.get("type") == "tool_result":
                out.append({"role": "tool", "tool_call_id": _field(b, "tool_use_id", str, where),
                            "content": _blocks_text(b.get("content", ""), f"{where}.content")})
            elif b.get("type") == "tool_use":
                arguments = json.dumps(_field(b, "input", dict, where), ensure_ascii=False)
                calls.append({"id": _field(b, "id", str, where), "type": "function",
                              "function": {"name": _field(b, "name", str, where), "arguments": arguments}})
        text = _blocks_text(m.content, f"messages.{i}.content")
        if text or calls:
            msg = {"role": m.role, "content": text}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
    return out


def tools_of(req: AnthropicRequest):
    if not req.tools:
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}} for t in req.tools]


def choice_of(req: AnthropicRequest):
    c = req.tool_choice
    if c is not None and c.type == "tool":
        return {"type": "function", "function": {"name": c.name}}
    return TOOL_CHOICES[c.type if c is not None else "auto"]


@router.post("/v1/messages")
async def messages(body: AnthropicRequest, request: Request):
    svc = request.app.state.service
    model = svc.model_name(body.model)
    choice = choice_of(body)
    tools = tools_of(body) if choice != "none" else None
    prefix = forced_prefix(choice, tools)
    ids = svc.prompt(messages_of(body), tools, prefix)
    temperature = K2_TEMPERATURE_SCALE * (1.0 if body.temperature is None else body.temperature)
    params = svc.params(len(ids), body.max_tokens, temperature=temperature, top_p=body.top_p, top_k=body.top_k)
    splitter = ReplySplitter(parse=bool(tools), prefix=prefix)
    steps = await svc.run(ids, params, body.stop_sequences or [], request)
    head = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model}
    if body.stream:
        return StreamingResponse(error_events(_events(steps, splitter, head, len(ids), body), _error_event),
                                 media_type="text/event-stream")
    n, reason = await splitter.consume(steps)
    out = splitter.outcome
    content = [{"type": "text", "text": out.content}] if out.content or not out.tool_calls else []
    content += [{"type": "tool_use", "id": c.id, "name": c.name, "input": tool_arguments(c)} for c in out.tool_calls]
    return {**head, "content": content, "stop_reason": _stop_reason(reason, out.tool_calls),
            "stop_sequence": None, "usage": {**_input_usage(len(ids), steps.cached_tokens), "output_tokens": n}}


def _input_usage(n_prompt: int, cached: int) -> dict:
    """Anthropic's input counts: input_tokens are the prompt tokens not read from the cache (its three fields
    add up to the prompt); nothing is ever written to a cache on request, so cache creation is 0."""
    return {"input_tokens": n_prompt - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


def _stop_reason(reason, calls) -> str:
    if calls:
        return "tool_use"
    return STOP_REASONS.get(reason, "end_turn")


def _event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


def _error_event(e: ServeError) -> str:
    """Anthropic's in-stream error event (its clients raise on it)."""
    return _event("error", {"error": {"type": anthropic_kind(e.status), "message": e.message}})


async def _events(steps, splitter, head, n_prompt, body):
    yield _event("message_start", {"message": {**head, "content": [], "stop_reason": None, "stop_sequence": None,
                                               "usage": {**_input_usage(n_prompt, steps.cached_tokens),
                                                         "output_tokens": 0}}})
    index, text_open, n, reason = 0, False, 0, "stop"
    async for step in steps:
        n += 1
        reason = step.finish_reason or reason
        for e in splitter.push(step.text, final=bool(step.finish_reason)):
            if isinstance(e, Text) and e.text:
                if not text_open:
                    yield _event("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}})
                    text_open = True
                yield _event("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": e.text}})
            elif isinstance(e, ToolCall):
                if text_open:
                    yield _event("content_block_stop", {"index": index})
                    index, text_open = index + 1, False
                block = {"type": "tool_use", "id": e.id, "name": e.name, "input": {}}
                yield _event("content_block_start", {"index": index, "content_block": block})
                yield _event("content_block_delta", {"index": index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(tool_arguments(e))}})
                yield _event("content_block_stop", {"index": index})
                index += 1
    if text_open:
        yield _event("content_block_stop", {"index": index})
    stop = _stop_reason(reason, splitter.outcome.tool_calls)
    yield _event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                   "usage": {**_input_usage(n_prompt, steps.cached_tokens), "output_tokens": n}})
    yield _event("message_stop", {})
