"""The ASGI app: routes of both wire formats, bearer-key auth, request limits, errors as JSON in each
format's own shape (never a traceback, never a server path), /health and Prometheus /metrics; `serve` runs
it under uvicorn and stops the process when the engine fails."""

import hmac
import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from hybrid.errors import HybridError
from hybrid.server import anthropic_routes, openai_routes
from hybrid.server.service import ServeError

log = logging.getLogger("hybrid.serve")
MAX_BODY_BYTES = 4 << 20
MAX_MESSAGES = 1024
GRACEFUL_SHUTDOWN_S = 5  # on SIGTERM/SIGINT, open requests get this long before their connections are closed
HTTP_KINDS = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
              413: "invalid_request_error"}


def error_body(path: str, status: int, message: str, kind: str, param=None, code=None) -> dict:
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": kind, "message": message}}
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Guard:
    """Pure ASGI middleware in front of every route: the API key, then the body limit, counted on the bytes
    as they arrive (a chunked body has no Content-Length to trust). The body is read here, at most
    max_body_bytes of it, and replayed to the app; after it, `receive` is the server's own again, so a route
    still sees its client's disconnect."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and not self._authorized(headers):
            return await _reply(send, path, 401, "missing or wrong API key (Authorization: Bearer KEY)",
                                "authentication_error", code="invalid_api_key")
        size = headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > self.max_body_bytes):
            return await _reply(send, path, 413, f"request body over {self.max_body_bytes} bytes",
                                "invalid_request_error")
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _reply(send, path, 413, f"request body over {self.max_body_bytes} bytes",
                                    "invalid_request_error")
        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)

    def _authorized(self, headers: dict) -> bool:
        given = headers.get("x-api-key", "")  # what Anthropic's client sends
        if "authorization" in headers:
            scheme, _, token = headers["authorization"].partition(" ")
            given = token.strip() if scheme.lower() == "bearer" else ""  # RFC 7235: the scheme has any case
        return hmac.compare_digest(given.encode(), self.api_key.encode())


async def _reply(send, path: str, status: int, message: str, kind: str, code=None):
    body = json.dumps(error_body(path, status, message, kind, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def create_app(service, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="hybrid", docs_url=None, redoc_url=None)
    app.state.service = service
    app.include_router(openai_routes.router)
    app.include_router(anthropic_routes.router)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    def reply(request: Request, status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, status, message, kind, param, code), status_code=status)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, e: ServeError):
        return reply(request, e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):  # 404, 405, a body FastAPI cannot decode
        return reply(request, e.status_code, str(e.detail), HTTP_KINDS.get(e.status_code, "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is a byte offset, not a field
            return reply(request, 400, "malformed JSON body", "invalid_request_error")
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return reply(request, 400, f"{where or 'body'}: {first.get('msg', 'invalid request')}",
                     "invalid_request_error", where)

    @app.exception_handler(HybridError)
    async def hybrid_error(request: Request, e: HybridError):
        return reply(request, 400, str(e), "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        log.exception("request failed")
        service.counters.errors += 1
        return reply(request, 500, f"internal error: {type(e).__name__}", "server_error")

    @app.get("/health")
    async def health():
        engine = service.engine
        body = {"status": "ok" if engine.healthy else "failed", "model": service.name, "active": len(engine.active),
                "queued": engine.queue_depth}
        if engine.failure is not None:
            body["error"] = f"{type(engine.failure).__name__}: {engine.failure}"
        return JSONResponse(body, status_code=200 if engine.healthy else 503)

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


def serve(service, host: str, port: int, api_key: str | None = None) -> BaseException | None:
    """Serve until SIGINT/SIGTERM or an engine failure; returns the engine's failure when that is what ended
    it. Open requests get GRACEFUL_SHUTDOWN_S to finish, then the engine ends what is left with an error."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=api_key), host=host, port=port,
                                           log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    service.engine.on_failure = lambda e: setattr(server, "should_exit", True)  # uvicorn polls it
    try:
        server.run()
    finally:
        service.close()
    return service.engine.failure
