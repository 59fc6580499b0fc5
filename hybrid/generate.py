"""Generation as small named steps: prefill (chunked), decode_one, sample, should_stop; the loop is short."""

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from pathlib import Path

import torch

from hybrid.errors import ConfigError, GenerationError
from hybrid.kv_cache import MLACache
from hybrid.sampling import SamplingParams, sample
from hybrid.streaming import TextStream

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
    return model.model.embed_tokens.weight.device


def new_cache(model, n_positions: int, batch: int = 1) -> MLACache:
    """A cache for n_positions on the device that runs attention, in the activations' dtype."""
    cfg = model.config
    limit, why = cfg.max_position_embeddings, "max_position_embeddings"
    if model.max_context is not None and model.max_context < limit:
        limit, why = model.max_context, "the plan's context_length"
    if n_positions > limit:
        raise GenerationError(f"context overflow: {n_positions} positions requested, the limit is {limit} ({why})")
    w = model.model.norm.weight
    return MLACache(cfg, n_positions, batch, device=w.device, dtype=model.model.embed_tokens.weight.dtype)


def prefill(model, cache: MLACache, ids: list[int], chunk: int | None = None) -> torch.Tensor:
    """Feed the prompt in chunks (default: the plan's prefill_chunk); returns the last position's logits
    [vocab] float32."""
    chunk = chunk or model.prefill_chunk or DEFAULT_PREFILL_CHUNK
    if not ids:
        raise GenerationError("empty prompt: give at least one token")
    x = torch.tensor([ids], dtype=torch.long, device=device_of(model))
    for start in range(0, len(ids), chunk):
        logits = model(x[:, start:start + chunk], cache=cache, last_only=True)
    return logits[0, -1]


def decode_one(model, cache: MLACache, token: int) -> torch.Tensor:
    x = torch.tensor([[token]], dtype=torch.long, device=device_of(model))
    return model(x, cache=cache)[0, -1]


def should_stop(token: int, n_generated: int, params: SamplingParams, stop_ids) -> str | None:
    if token in stop_ids:
        return "stop"
    if n_generated >= params.max_new_tokens:
        return "length"
    return None


K2_DEFAULT_TEMPERATURE = 0.6  # Moonshot's recommendation for Kimi-K2-Instruct


def default_sampling(folder, model_type: str) -> dict:
    """Sampling defaults: generation_config.json's temperature/top_p/top_k when it sets them, else K2's 0.6."""
    gen_path = Path(folder) / "generation_config.json"
    raw = {}
    if gen_path.is_file():
        try:
            raw = json.loads(gen_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{gen_path}: not valid JSON ({e})") from None
    out = {k: raw[k] for k in ("temperature", "top_p", "top_k") if isinstance(raw.get(k), (int, float))}
    if "temperature" not in out and model_type == "kimi_k2":
        out["temperature"] = K2_DEFAULT_TEMPERATURE
    if raw.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def sampling_params(folder, config, temperature=None, top_p=None, top_k=None, min_p=0.0, seed=None,
                    max_new_tokens=64) -> SamplingParams:
    """SamplingParams from explicit values, falling back to the checkpoint's defaults (default_sampling)."""
    given = {"temperature": temperature, "top_p": top_p, "top_k": top_k}
    values = default_sampling(folder, config.model_type) | {k: v for k, v in given.items() if v is not None}
    return SamplingParams(min_p=min_p, seed=seed, max_new_tokens=max_new_tokens, **values)


def default_stop_ids(folder, model, tokenizer=None) -> set[int]:
    """eos ids of config.json and generation_config.json, plus the chat end marker <|im_end|> when known."""
    ids = set(model.config.eos_token_ids)
    gen_path = Path(folder) / "generation_config.json"
    if gen_path.is_file():
        try:
            eos = json.loads(gen_path.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{gen_path}: not valid JSON ({e})") from None
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.token_id("<|im_end|>") is not None:
        ids.add(tokenizer.token_id("<|im_end|>"))
    return ids


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
        logits = decode_one(model, cache, token)
