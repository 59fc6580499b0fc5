"""What the server tells its operator: one log line per request, and the Prometheus registry behind /metrics.

A Trace rides in each HTTP request's ASGI scope. Service.run fills in its tokens as the engine hands them out;
AccessLog, which wraps the whole app (refused requests too), reads it once the response has been sent, so the
log line and the latency histograms come from the same numbers. The log line reads

    POST /v1/chat/completions 200 in=31 out=12 ttft=0.042s total=0.311s

(in: prompt tokens, out: generated tokens, ttft: time to first token, "-" when no token was generated)."""

import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("hybrid.serve")
TRACE_KEY = "hybrid.trace"  # an ASGI scope key of our own: the scope is the one object every layer shares
# K2 on a workstation: prefilling a long prompt takes seconds to minutes, a decode step tens to hundreds of ms.
TTFT_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
INTER_TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5, 10)
DURATION_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280, 2560)


@dataclass
class Trace:
    """One HTTP request's token counts and token times (time.monotonic seconds)."""

    start_s: float = field(default_factory=time.monotonic)
    prompt_tokens: int = 0
    output_tokens: int = 0
    first_token_s: float | None = None
    last_token_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)  # between consecutive tokens

    def token(self):
        now = time.monotonic()
        if self.last_token_s is None:
            self.first_token_s = now
        else:
            self.gaps_s.append(now - self.last_token_s)
        self.last_token_s = now
        self.output_tokens += 1

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s


def trace_of(http_request) -> Trace:
    """The request's Trace (a detached one when it came without HTTP or around AccessLog)."""
    scope = getattr(http_request, "scope", None) or {}
    return scope.get(TRACE_KEY) or Trace()


class Metrics:
    """One app's registry (not prometheus_client's global one, so that one process can hold several apps): the
    service's counters and the engine's gauges read when scraped, and the latency histograms AccessLog feeds."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, service):
        self.registry = CollectorRegistry()
        self.registry.register(_ServiceCollector(service))
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "From a request's arrival to its first "
                              "generated token.", buckets=TTFT_BUCKETS_S, registry=self.registry)
        self.inter_token = Histogram("hybrid_inter_token_latency_seconds", "Between consecutive tokens of one "
                                     "reply.", buckets=INTER_TOKEN_BUCKETS_S, registry=self.registry)
        self.duration = Histogram("hybrid_request_duration_seconds", "From a generation request's arrival to "
                                  "the end of its response.", buckets=DURATION_BUCKETS_S, registry=self.registry)

    def observe(self, trace: Trace, total_s: float):
        if trace.ttft_s is not None:
            self.ttft.observe(trace.ttft_s)
        for gap in trace.gaps_s:
            self.inter_token.observe(gap)
        if trace.prompt_tokens:  # it reached the engine: a generation request
            self.duration.observe(total_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceCollector:
    def __init__(self, service):
        self.service = service

    def collect(self):
        c, e = self.service.counters, self.service.engine
        yield CounterMetricFamily("hybrid_requests", "Generation requests accepted by the engine.", c.requests)
        yield CounterMetricFamily("hybrid_prompt_tokens", "Prompt tokens of those requests.", c.prompt_tokens)
        yield CounterMetricFamily("hybrid_cached_prompt_tokens", "Prompt tokens reused from the cache of an earlier "
                                  "request with the same prefix, not prefilled.", c.cached_prompt_tokens)
        yield CounterMetricFamily("hybrid_prefilled_prompt_tokens", "Prompt tokens prefilled.",
                                  c.prefilled_prompt_tokens)
        yield CounterMetricFamily("hybrid_generated_tokens", "Tokens generated for clients.", c.generated_tokens)
        yield CounterMetricFamily("hybrid_errors", "Requests that failed in the server or the engine.", c.errors)
        yield GaugeMetricFamily("hybrid_decode_tokens_per_second", "Tokens generated per second over the last "
                                "minute.", c.tokens_per_s())
        yield GaugeMetricFamily("hybrid_queue_depth", "Requests waiting for a slot.", e.queue_depth)
        yield GaugeMetricFamily("hybrid_active_requests", "Requests holding a slot.", len(e.active))
        yield CounterMetricFamily("hybrid_decode_steps", "Decode forwards run by the engine.", e.steps)


class AccessLog:
    """Pure ASGI middleware around everything: a Trace into the scope, and once the response has been sent
    (or the request has failed) one log line and the histograms."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        trace = scope[TRACE_KEY] = Trace()
        status = None

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500  # what the app's outermost error handler answers
            raise
        finally:
            total_s = time.monotonic() - trace.start_s
            self.metrics.observe(trace, total_s)
            ttft = "-" if trace.ttft_s is None else f"{trace.ttft_s:.3f}s"
            log.info("%s %s %s in=%d out=%d ttft=%s total=%.3fs", scope["method"], scope["path"], status or "-",
                     trace.prompt_tokens, trace.output_tokens, ttft, total_s)


def setup_logging(level: str):
    """For the `serve` front end: hybrid's loggers at `level` ("debug" ... "error"), one line each on stderr;
    other libraries' loggers are left as they are."""
    logger = logging.getLogger("hybrid")
    logger.setLevel(level.upper())
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
