"""Continuous batching: one thread runs the model; requests join and leave between decode steps.

Each active request owns a slot of one shared MLACache. A loop iteration admits waiting requests (each
prefilled alone into its slot, chunked), then runs ONE decode forward for every active request together, so
the CPU experts stream each expert's weights once for all of them. A request's tokens go to its `sink` as
Steps (token, finish_reason, text) from the engine thread; `cancel()` (a client that went away) frees the
slot at the next iteration.

Failures are sorted by whose they are. A request's own (its prefill, sampling its logits, decoding its text)
ends that request alone: its sink receives the exception and its slot is freed. Anything else (a batched
decode forward, a bug in the loop) stops the engine: every waiting and active request receives an EngineError,
`failure` is set, later submits are refused, and `on_failure(exc)` lets the owner (the server) shut down.

A retired request's slot keeps its tokens (hybrid.generation.prefix_cache): a request whose prompt starts with
them takes that slot and prefills only the rest; `Request.cached_tokens` says how many were reused.
"""

import queue
import threading
from dataclasses import dataclass, field

import torch

from hybrid.errors import EngineError, GenerationError
from hybrid.generation.generate import check_prompt, decode_step, make_step, new_cache, prefill
from hybrid.generation.prefix_cache import PrefixCache
from hybrid.generation.sampling import SamplingParams, sample
from hybrid.generation.streaming import TextStream


@dataclass
class Request:
    ids: list[int]
    params: SamplingParams
    sink: object  # callable(Step); called from the engine thread
    stop_ids: frozenset = frozenset()
    stop_strings: tuple = ()
    cancelled: bool = False
    # filled by the engine
    slot: int | None = None
    cached_tokens: int = 0  # prompt tokens found in the slot's cache, not prefilled (set before the first Step)
    generated: list = field(default_factory=list)
    text: TextStream | None = None
    generator: torch.Generator | None = None
    logits: torch.Tensor | None = None

    def cancel(self):
        self.cancelled = True


class Engine:
    def __init__(self, model, tokenizer=None, *, max_context: int, max_batch: int = 8,
                 prefill_chunk: int | None = None, device=None, on_failure=None):
        """max_context: positions per request (a Runtime's context limit, or less); prefill_chunk: tokens per
        prefill forward; device: where the cache lives (the Runtime's)."""
        self.model, self.tokenizer, self.max_batch = model, tokenizer, max_batch
        self.max_context, self.prefill_chunk = max_context, prefill_chunk
        self.cache = new_cache(model, max_context, max_batch, device)
        self.prefixes = PrefixCache(max_batch)  # what each slot holds, for the next request to reuse
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.active: dict[int, Request] = {}
        self.failure: BaseException | None = None  # set once the engine has stopped for good
        self.on_failure = on_failure  # callable(exception), from the engine thread
        self._lock = threading.Lock()  # a submit never lands in the queue after the engine drained it
        self._wake = threading.Event()
        self._stop = False
        self.steps = 0  # decode forwards run (for /metrics)
        self.thread = threading.Thread(target=self._loop, name="hybrid-engine", daemon=True)
        self.thread.start()

    def submit(self, req: Request) -> Request:
        """Queue a request (validated here, so a bad one fails in the caller's thread). Raises EngineError
        once the engine has stopped."""
        if not req.ids:
            raise GenerationError("empty prompt: give at least one token")
        check_prompt(self.model, req.ids)
        if len(req.ids) + req.params.max_new_tokens > self.max_context:
            raise GenerationError(f"context overflow: {len(req.ids)} prompt + {req.params.max_new_tokens} new tokens "
                                  f"exceed the engine's {self.max_context} positions")
        with self._lock:
            if self.failure is not None or self._stop:
                raise EngineError(f"the engine has stopped ({self.failure or 'shut down'})")
            self.waiting.put(req)
        self._wake.set()
        return req

    @property
    def queue_depth(self) -> int:
        return self.waiting.qsize()

    @property
    def healthy(self) -> bool:
        return self.failure is None and not self._stop and self.thread.is_alive()

    def close(self):
        """Stop the loop; requests still waiting or running receive an EngineError."""
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=10)
        self._end_all(EngineError("the engine was shut down"))

    def _loop(self):
        try:
            while not self._stop:
                self._admit()
                if not self.active:
                    self._wake.wait(0.05)
                    self._wake.clear()
                    continue
                self._decode_step()
        except Exception as e:  # not one request's own: nothing can be trusted to go on
            with self._lock:
                self.failure = e
            self._end_all(EngineError(f"the engine failed: {type(e).__name__}: {e}"))
            if self.on_failure is not None:
                self.on_failure(e)

    def _end_all(self, error: Exception):
        with self._lock:
            pending = list(self.active.values())
            self.active.clear()
            while not self.waiting.empty():
                pending.append(self.waiting.get())
        for req in pending:
            self._deliver(req, error)

    def _admit(self):
        free = [s for s in range(self.max_batch) if s not in self.active]
        while free and not self.waiting.empty():
            req = self.waiting.get()
            if req.cancelled:
                continue
            req.slot, req.cached_tokens = self.prefixes.choose(free, req.ids)
            free.remove(req.slot)
            self.prefixes.take(req.slot, req.cached_tokens)
            self.cache.truncate(req.slot, req.cached_tokens)
            try:
                req.generator = req.params.generator()
                req.text = TextStream(self.tokenizer, req.stop_strings) if self.tokenizer is not None else None
                req.logits = self._prefill(req)
            except Exception as e:  # a failing request ends alone; the engine goes on
                self.prefixes.forget(req.slot)  # a forward that stopped part way: trust nothing in the slot
                self.cache.reset(req.slot)
                free.append(req.slot)
                self._deliver(req, e)
                continue
            self.active[req.slot] = req
            self._emit(req)

    def _prefill(self, req: Request) -> torch.Tensor:
        """Feed the prompt after its reused prefix; returns the last prompt position's logits."""
        return prefill(self.model, self.cache, req.ids[req.cached_tokens:], self.prefill_chunk, req.slot)

    def _decode_step(self):
        reqs = list(self.active.values())
        logits = decode_step(self.model, self.cache, [r.generated[-1] for r in reqs], [r.slot for r in reqs])
        self.steps += 1
        for r, row in zip(reqs, logits):
            r.logits = row
            self._emit(r)

    def _emit(self, req: Request):
        """Sample the request's next token from req.logits, send it, and retire the request when it is done."""
        if req.cancelled:
            self._retire(req)
            return
        try:
            token = sample(req.logits, req.params, req.generator)
            req.generated.append(token)
            step = make_step(token, len(req.generated), req.params, req.stop_ids, req.text)
        except Exception as e:  # this request's numbers or text: it ends, the others go on
            self._retire(req)
            self._deliver(req, e)
            return
        if not self._deliver(req, step) or step.finish_reason:
            self._retire(req)

    def _deliver(self, req: Request, item) -> bool:
        """Hand a Step or an exception to the request's sink; a sink that fails (its client's event loop is
        gone) cancels the request instead of reaching the engine."""
        try:
            req.sink(item)
            return True
        except Exception:
            req.cancel()
            return False

    def _retire(self, req: Request):
        """Free the slot but keep its contents for a later prompt that starts the same way: the cache holds the
        prompt and the generated tokens fed back so far (not the last one sampled, never fed)."""
        self.active.pop(req.slot, None)
        held = self.cache.lengths[req.slot]
        self.prefixes.release(req.slot, (req.ids + req.generated)[:held])
