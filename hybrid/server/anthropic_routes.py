"""Anthropic wire format: /v1/messages, plain JSON or the event stream, mapped onto the same service.

Temperature follows K2's model card for this API: the model runs at 0.6 x the requested temperature
(Anthropic's default 1.0 becomes K2's recommended 0.6). A thinking model (K2-Thinking, recommended at 1.0) runs
at the requested temperature, else at its default, and its reasoning comes as a `thinking` content block (with
an empty `signature`: nothing here signs it) before the text and tool_use blocks, streamed as `thinking_delta`
events; `thinking` blocks of earlier assistant turns go back to the chat template as their `reasoning_content`."""

import json
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from hybrid.server.schemas import AnthropicRequest
from hybrid.server.service import ServeError, anthropic_kind, error_events, forced_prefix, tool_arguments
from hybrid.generation.tools import Reasoning, Text, ToolCall

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
        calls, reasoning = [], ""
        for j, b in enumerate(m.content):
            where = f"messages.{i}.content.{j}"
            if b.get("type") == "thinking" and m.role == "assistant":
                reasoning += _field(b, "thinking", str, where)
            elif b.get("type") == "tool_result":
                out.append({"role": "tool", "tool_call_id": _field(b, "tool_use_id", str, where),
                            "content": _blocks_text(b.get("content", ""), f"{where}.content")})
            elif b.get("type") == "tool_use":
                arguments = json.dumps(_field(b, "input", dict, where), ensure_ascii=False)
                calls.append({"id": _field(b, "id", str, where), "type": "function",
                              "function": {"name": _field(b, "name", str, where), "arguments": arguments}})
        text = _blocks_text(m.content, f"messages.{i}.content")
        if text or calls or reasoning:
            msg = {"role": m.role, "content": text}
            if reasoning:
                msg["reasoning_content"] = reasoning
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
    if svc.thinking:
        temperature = body.temperature  # None: the checkpoint's default (1.0 for a thinking model)
    else:
        temperature = K2_TEMPERATURE_SCALE * (1.0 if body.temperature is None else body.temperature)
    params = svc.params(len(ids), body.max_tokens, temperature=temperature, top_p=body.top_p, top_k=body.top_k)
    splitter = svc.splitter(ids, parse=bool(tools), prefix=prefix)
    steps = await svc.run(ids, params, body.stop_sequences or [], request)
    head = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant", "model": model}
    if body.stream:
        return StreamingResponse(error_events(_events(steps, splitter, head, len(ids), body), _error_event),
                                 media_type="text/event-stream")
    n, reason = await splitter.consume(steps)
    out = splitter.outcome
    content = [{"type": "thinking", "thinking": out.reasoning, "signature": ""}] if out.reasoning else []
    content += [{"type": "text", "text": out.content}] if out.content or not out.tool_calls else []
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
    blocks = _Blocks()
    n, reason = 0, "stop"
    async for step in steps:
        n += 1
        reason = step.finish_reason or reason
        for e in splitter.push(step.text, final=bool(step.finish_reason)):
            if isinstance(e, Reasoning) and e.text:
                for event in blocks.delta("thinking", {"type": "thinking_delta", "thinking": e.text}):
                    yield event
            elif isinstance(e, Text) and e.text:
                for event in blocks.delta("text", {"type": "text_delta", "text": e.text}):
                    yield event
            elif isinstance(e, ToolCall):
                for event in blocks.close():
                    yield event
                block = {"type": "tool_use", "id": e.id, "name": e.name, "input": {}}
                yield _event("content_block_start", {"index": blocks.index, "content_block": block})
                yield _event("content_block_delta", {"index": blocks.index, "delta": {
                    "type": "input_json_delta", "partial_json": json.dumps(tool_arguments(e))}})
                yield _event("content_block_stop", {"index": blocks.index})
                blocks.index += 1
    for event in blocks.close():
        yield event
    stop = _stop_reason(reason, splitter.outcome.tool_calls)
    yield _event("message_delta", {"delta": {"stop_reason": stop, "stop_sequence": None},
                                   "usage": {**_input_usage(n_prompt, steps.cached_tokens), "output_tokens": n}})
    yield _event("message_stop", {})


class _Blocks:
    """The streamed content blocks: which one is open (thinking or text), and the next block's index."""

    EMPTY = {"thinking": {"type": "thinking", "thinking": "", "signature": ""}, "text": {"type": "text", "text": ""}}

    def __init__(self):
        self.index, self.open = 0, None

    def delta(self, kind: str, delta: dict) -> list[str]:
        """Events for a delta of a `kind` block: the open block of another kind closed, this one opened."""
        events = self.close() if self.open not in (None, kind) else []
        if self.open is None:
            events.append(_event("content_block_start", {"index": self.index, "content_block": self.EMPTY[kind]}))
            self.open = kind
        return events + [_event("content_block_delta", {"index": self.index, "delta": delta})]

    def close(self) -> list[str]:
        if self.open is None:
            return []
        # Anthropic ends a thinking block with its signature; nothing signs this one
        events = [_event("content_block_delta", {"index": self.index,
                                                 "delta": {"type": "signature_delta", "signature": ""}})] \
            if self.open == "thinking" else []
        events.append(_event("content_block_stop", {"index": self.index}))
        self.index, self.open = self.index + 1, None
        return events
