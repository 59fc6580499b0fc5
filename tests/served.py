"""The tiny K2 checkpoint behind the real server on 127.0.0.1, as module fixtures for the server tests:
`service`, `server` (uvicorn on a free loopback port) and `client` (the official openai client). A test module
imports them and says what its server serves: NAMES (as `--served-model-name`, repeated) and KEY (`--api-key`);
each module gets its own server."""

import pytest

from hybrid.server.app import create_app
from hybrid.server.service import load_service
from live_server import Server


@pytest.fixture(scope="module")
def service(request, k2_tiny):
    svc = load_service(k2_tiny, names=request.module.NAMES, max_concurrency=4, max_context=512)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(request, service):
    s = Server(create_app(service, api_key=request.module.KEY))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(request, server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=request.module.KEY, max_retries=0, timeout=120)
