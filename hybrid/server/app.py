"""The ASGI app: routes of both wire formats, bearer-key auth, request limits, errors as JSON in each
format's own shape (never a traceback), /health and Prometheus /metrics."""

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from hybrid.errors import HybridError
from hybrid.server import anthropic_routes, openai_routes
from hybrid.server.service import ServeError

log = logging.getLogger("hybrid.serve")
MAX_BODY_BYTES = 4 << 20
MAX_MESSAGES = 1024


def error_body(path: str, status: int, message: str, kind: str, param=None, code=None) -> dict:
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(service, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="hybrid", docs_url=None, redoc_url=None)
    app.state.service = service
    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        path = request.url.path
        if api_key is not None:
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.headers.get("x-api-key", "")  # what Anthropic's client sends
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse(error_body(path, 401, "missing or wrong API key (Authorization: Bearer KEY)",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > max_body_bytes):
            return JSONResponse(error_body(path, 413, f"request body over {max_body_bytes} bytes",
                                           "invalid_request_error"), status_code=413)
        return await call_next(request)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return JSONResponse(error_body(request.url.path, e.status, e.message, e.kind, e.param, e.code),
                            status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "malformed JSON body" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg', 'invalid request')}"
        return JSONResponse(error_body(request.url.path, 400, message, "invalid_request_error", where),
                            status_code=400)

    @app.exception_handler(HybridError)
    async def hybrid_error(request: Request, e: HybridError):
        return JSONResponse(error_body(request.url.path, 400, str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("request failed")
        service.counters.errors += 1
        return JSONResponse(error_body(request.url.path, 500, f"internal error: {type(e).__name__}",
                                       "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.name, "active": len(service.engine.active),
                "queued": service.engine.queue_depth}

    @app.get("/metrics")
    async def metrics():
        c, e = service.counters, service.engine
        lines = [
            "# TYPE hybrid_requests_total counter", f"hybrid_requests_total {c.requests}",
            "# TYPE hybrid_prompt_tokens_total counter", f"hybrid_prompt_tokens_total {c.prompt_tokens}",
            "# TYPE hybrid_generated_tokens_total counter", f"hybrid_generated_tokens_total {c.generated_tokens}",
            "# TYPE hybrid_errors_total counter", f"hybrid_errors_total {c.errors}",
            "# TYPE hybrid_decode_tokens_per_second gauge",
            f"hybrid_decode_tokens_per_second {c.tokens_per_s():.3f}",
            "# TYPE hybrid_queue_depth gauge", f"hybrid_queue_depth {e.queue_depth}",
            "# TYPE hybrid_active_requests gauge", f"hybrid_active_requests {len(e.active)}",
            "# TYPE hybrid_decode_steps_total counter", f"hybrid_decode_steps_total {e.steps}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    return app
