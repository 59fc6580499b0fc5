"""The ASGI app: routes of both wire formats, bearer-key auth, request limits, errors as JSON in each
format's own shape (never a traceback, never a server path), /health, Prometheus /metrics, a log line per
request and the chat page at /; `bind` takes the port before the model loads, and `serve` runs the app under
uvicorn on that socket and stops the process when the engine fails."""

import errno
import hmac
import json
import logging
import socket
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from hybrid.errors import ConfigError, HybridError
from hybrid.server import anthropic_routes, openai_routes
from hybrid.server.observe import AccessLog, Metrics
from hybrid.server.service import ServeError, anthropic_kind

log = logging.getLogger("hybrid.serve")
MAX_BODY_BYTES = 4 << 20
MAX_MESSAGES = 1024
GRACEFUL_SHUTDOWN_S = 5  # on SIGTERM/SIGINT, open requests get this long before their connections are closed
HTTP_KINDS = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
              413: "invalid_request_error"}
# Open without the API key: probes and load balancers hold no key, and the chat page asks for it itself.
OPEN_PATHS = frozenset({"/", "/health"})
# The page's script and style are inline in the one file; it talks to this server only.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def error_body(path: str, status: int, message: str, kind: str, param=None, code=None) -> dict:
    if path.startswith("/v1/messages"):
        return {"type": "error", "error": {"type": anthropic_kind(status), "message": message}}
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
        if self.api_key is not None and path not in OPEN_PATHS and not self._authorized(headers):
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
    metrics = Metrics(service)
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)
    app.add_middleware(AccessLog, metrics=metrics)  # added last: the outermost, so it sees refusals too
    page = resources.files("hybrid.server").joinpath("chat.html").read_text(encoding="utf-8")

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
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the model loads (minutes for K2): a bad port, a port in use or an
    address this machine does not have is one ConfigError at once, and uvicorn later accepts on this socket,
    so nothing can take the port in between."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: a TCP port is 1 to 65535")
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, kind)
    # As uvicorn does: a restart may rebind at once (TIME_WAIT), while a live listener still refuses.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen()
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use (another server?); choose one with --port") from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    return sock


def serve(service, sock: socket.socket, api_key: str | None = None, log_level: str = "info") -> BaseException | None:
    """Serve on `sock` (from `bind`) until SIGINT/SIGTERM or an engine failure; returns the engine's failure
    when that is what ended it. Open requests get GRACEFUL_SHUTDOWN_S to finish, then the engine ends what is
    left with an error (uvicorn then ends the process at once: those requests write no log line). uvicorn's
    access log stays off (AccessLog writes ours), and its own lines show from warning up, all of them at debug
    (at info they only repeat what `hybrid serve` prints)."""
    import uvicorn

    own_level = log_level if log_level in ("debug", "error") else "warning"
    server = uvicorn.Server(uvicorn.Config(create_app(service, api_key=api_key), access_log=False, log_level=own_level,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    service.engine.on_failure = lambda e: setattr(server, "should_exit", True)  # uvicorn polls it
    try:
        server.run(sockets=[sock])
    finally:
        service.close()
    return service.engine.failure
