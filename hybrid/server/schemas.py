"""Request schemas of the two wire formats (pydantic at the server's edge only). Unknown fields are accepted
and ignored, as the official servers do; known fields of the wrong type or out of range are a 400, so nothing
the engine or the chat template cannot take gets past here (tools and tool calls have the shape each API
documents; sampling values the ranges each API allows and the sampler takes)."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hybrid.generation.sampling import SEED_MAX, SEED_MIN

Seed = Field(default=None, ge=SEED_MIN, le=SEED_MAX)


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(Loose):
    name: str
    arguments: str


class ToolCallIn(Loose):
    """A tool call of an earlier assistant turn, as a client sends it back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDef(Loose):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Loose):
    type: Literal["function"]
    function: FunctionDef


class ChatMessage(Loose):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning (vLLM's and SGLang's field)
    reasoning: str | None = None  # the same, as newer vLLM and OpenRouter name it


class StreamOptions(Loose):
    include_usage: bool = False


class ChatRequest(Loose):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # vLLM's extensions, as K2's deployments accept them
    min_p: float | None = Field(default=None, ge=0, lt=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Seed
    ignore_eos: bool = False  # vLLM's and llama.cpp's extension: run to max_tokens (benchmarks)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionRequest(Loose):
    model: str | None = None
    prompt: str | list[int]
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, lt=1)
    max_tokens: int | None = Field(default=16, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Seed
    ignore_eos: bool = False  # vLLM's and llama.cpp's extension: run to max_tokens (benchmarks)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class AnthropicTool(Loose):
    name: str = Field(min_length=1)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=dict)


class AnthropicToolChoice(Loose):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # with type "tool"


class AnthropicMessage(Loose):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicRequest(Loose):
    model: str | None = None
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=1024)
    system: str | list[dict[str, Any]] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stop_sequences: list[str] | None = None
    stream: bool = False
