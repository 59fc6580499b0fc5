"""Generation as small named steps: prefill (chunked), decode_step, sample, should_stop; the loop is short."""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from hybrid.errors import GenerationError
from hybrid.run.kv_cache import MLACache
from hybrid.generation.sampling import SamplingParams, sample
from hybrid.generation.streaming import TextStream

DEFAULT_PREFILL_CHUNK = 256  # tokens per prefill forward: bounds the [chunk x context] attention scores


@dataclass
class Step:
    token: int
    finish_reason: str | None  # "stop" (a stop id or string) or "length" (max_new_tokens) on the last step
    text: str = ""  # new printable text (with a tokenizer): whole characters, stop strings held back


@dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: str | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""


def device_of(model) -> torch.device:
    return model.embedding_device


def new_cache(model, n_positions: int, batch: int = 1, device: torch.device | None = None) -> MLACache:
    """A cache for n_positions on `device` (a plan's cache_device; default: where the model's attention
    weights are), in the activations' dtype. The model's own limit is checked here; a plan's context limit is
    the Runtime's (hybrid.generation.runtime.Runtime.new_cache)."""
    cfg = model.config
    if n_positions > cfg.max_position_embeddings:
        raise GenerationError(f"context overflow: {n_positions} positions requested, the limit is "
                              f"{cfg.max_position_embeddings} (max_position_embeddings)")
    device = device if device is not None else model.model.norm.weight.device
    return MLACache(cfg, n_positions, batch, device=device, dtype=model.activation_dtype)


# The model is driven through these two functions only: generate() (one sequence), the server's Engine
# (slots joining and leaving) and the profiler (batches of equal prompts) all call them.

def prefill_rows(model, cache: MLACache, ids: torch.Tensor, chunk: int | None = None, slots=None) -> torch.Tensor:
    """Feed prompts ids [B, T] into cache slots (default 0..B-1), `chunk` tokens per forward (default
    DEFAULT_PREFILL_CHUNK: bounds the [chunk x context] attention scores); returns the last position's
    logits [B, vocab] float32."""
    chunk = chunk or DEFAULT_PREFILL_CHUNK
    if ids.shape[1] == 0:
        raise GenerationError("empty prompt: give at least one token")
    ids = ids.to(device_of(model))
    for start in range(0, ids.shape[1], chunk):
        logits = model(ids[:, start:start + chunk], cache=cache, last_only=True, slots=slots)
    return logits[:, -1]


def prefill(model, cache: MLACache, ids: list[int], chunk: int | None = None, slot: int = 0) -> torch.Tensor:
    """One prompt into one cache slot; returns the last position's logits [vocab] float32."""
    if not ids:
        raise GenerationError("empty prompt: give at least one token")
    return prefill_rows(model, cache, torch.tensor([ids], dtype=torch.long), chunk, [slot])[0]


def decode_step(model, cache: MLACache, tokens: list[int], slots=None) -> torch.Tensor:
    """One new token per row (row b continues cache slot slots[b], default b) -> logits [B, vocab] float32."""
    x = torch.tensor([[t] for t in tokens], dtype=torch.long, device=device_of(model))
    return model(x, cache=cache, slots=slots)[:, -1]


def should_stop(token: int, n_generated: int, params: SamplingParams, stop_ids) -> str | None:
    if token in stop_ids:
        return "stop"
    if n_generated >= params.max_new_tokens:
        return "length"
    return None


def make_step(token: int, n_generated: int, params: SamplingParams, stop_ids, text: TextStream | None) -> Step:
    """The Step for a freshly sampled token: its printable text, and why generation ends here, if it does
    (a stop id, a stop string completed by this token's text, or max_new_tokens)."""
    reason = should_stop(token, n_generated, params, stop_ids)
    new_text = ""
    if text is not None:
        new_text = text.push(token) if token not in stop_ids else ""
        if text.stopped:
            reason = "stop"
        elif reason:
            new_text += text.flush()
    return Step(token, reason, new_text)


def check_prompt(model, ids: list[int]):
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise GenerationError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")


def generate(model, ids: list[int], params: SamplingParams, stop_ids=(), stats: Stats | None = None,
             chunk: int | None = None, tokenizer=None, stop_strings=(), cache: MLACache | None = None) -> Iterator[Step]:
    """Yield generated tokens one by one as they are produced; the last Step carries the finish reason.
    With a tokenizer each Step carries its new text, and a stop string ends generation (its text dropped).
    With a cache, ids continue the sequence already in its slot 0 (a chat's next turn); the caller leaves
    room for max_new_tokens."""
    check_prompt(model, ids)
    stats = stats if stats is not None else Stats()
    stats.prompt_tokens = len(ids)
    cache = cache if cache is not None else new_cache(model, len(ids) + params.max_new_tokens)
    if params.max_new_tokens == 0:
        stats.finish_reason = "length"
        return
    gen = params.generator()
    text = TextStream(tokenizer, stop_strings) if tokenizer is not None else None
    t0 = time.perf_counter()
    logits = prefill(model, cache, ids, chunk)
    stats.prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    while True:
        token = sample(logits, params, gen)
        stats.tokens.append(token)
        stats.generated_tokens += 1
        step = make_step(token, stats.generated_tokens, params, stop_ids, text)
        stats.decode_s = time.perf_counter() - t0
        stats.text += step.text
        yield step
        if step.finish_reason:
            stats.finish_reason = step.finish_reason
            return
        logits = decode_step(model, cache, [token])[0]
