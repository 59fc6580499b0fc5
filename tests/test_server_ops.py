"""What an operator and a browser see of the real server on 127.0.0.1: the model names it answers to, one log
line per request, /metrics as Prometheus parses it, /health and the chat page open without the key, the chat
page driven in a real headless browser, and `hybrid serve`'s bad flags refused before the model loads."""

import contextlib
import json
import logging
import os
import re
import socket
import time
import urllib.request

import pytest
from click.testing import CliRunner

from hybrid.cli import cli
from hybrid.server.app import create_app
from served import client, server, service  # noqa: F401 (module fixtures)

KEY = "ops-key"
NAMES = ("kimi", "k2")  # as `--served-model-name kimi --served-model-name k2`; the checkpoint folder is k2-tiny
HI = [{"role": "user", "content": "Hi"}]
CHROMIUM = "/usr/bin/chromium"  # Debian's; .ci/run installs it


def fetch(server, path, body=None, key=KEY):
    """(status, headers, text) of a GET, or of a POST when a JSON body is given."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(server.url + path, json.dumps(body).encode() if body else None, headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def test_served_names_aliases_and_unknown_models(server, client):
    import anthropic
    import openai

    assert [m.id for m in client.models.list().data] == list(NAMES)
    for asked, reported in (("kimi", "kimi"), ("k2", "k2"), ("k2-tiny", "kimi")):  # k2-tiny: the folder's name
        assert client.chat.completions.create(model=asked, messages=HI, max_tokens=2).model == reported
    status, _, text = fetch(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})  # no model at all
    assert status == 200 and json.loads(text)["model"] == "kimi"
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert caught.value.status_code == 404 and caught.value.body == {
        "message": "The model `gpt-4` does not exist.", "type": "NotFoundError", "param": "model",
        "code": "model_not_found"}
    with pytest.raises(anthropic.NotFoundError) as caught:
        anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0).messages.create(
            model="claude-x", max_tokens=2, messages=HI)
    assert caught.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                            "message": "The model `claude-x` does not exist."}}


def test_health_and_the_page_are_open_the_rest_needs_the_key(server):
    status, _, text = fetch(server, "/health", key=None)
    assert status == 200 and json.loads(text)["model"] == "kimi"
    status, headers, text = fetch(server, "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and "<script>" in text
    assert "connect-src 'self'" in headers["content-security-policy"]
    for path in ("/v1/models", "/metrics"):
        assert fetch(server, path, key=None)[0] == 401
    assert fetch(server, "/v1/chat/completions", {"messages": HI}, key=None)[0] == 401


def logged(caplog, *patterns: str) -> list[re.Match]:
    """The access-log line matching each pattern, in order. Lines are written in the server's thread once each
    response has gone out, so one from the previous test's last request can still arrive during this one:
    lines are picked by what they say, never by position."""
    deadline = time.monotonic() + 10
    while True:
        lines = [r.getMessage() for r in caplog.records if r.name == "hybrid.serve"]
        found = [next((m for m in map(re.compile(p).fullmatch, lines) if m), None) for p in patterns]
        if all(found) or time.monotonic() > deadline:
            assert all(found), (patterns, lines)
            return found


def test_one_log_line_per_request(server, client, caplog):
    caplog.set_level(logging.INFO, logger="hybrid.serve")
    chunks = list(client.chat.completions.create(model="kimi", messages=HI, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}))
    fetch(server, "/v1/models", key="wrong")
    fetch(server, "/v1/chat/completions", {"model": "gpt-4", "messages": HI})
    chat, _, _ = logged(caplog, r"POST /v1/chat/completions 200 in=(\d+) out=(\d+) ttft=(\S+)s total=(\S+)s",
                        r"GET /v1/models 401 in=0 out=0 ttft=- total=\d+\.\d{3}s",
                        r"POST /v1/chat/completions 404 in=0 out=0 ttft=- total=\d+\.\d{3}s")
    usage = chunks[-1].usage
    assert (int(chat[1]), int(chat[2])) == (usage.prompt_tokens, usage.completion_tokens)
    assert 0 < float(chat[3]) <= float(chat[4])


def test_metrics_have_help_lines_and_latency_histograms(server, service, client):
    from prometheus_client.parser import text_string_to_metric_families

    client.completions.create(model="kimi", prompt="Hi", max_tokens=4, extra_body={"ignore_eos": True})
    status, headers, text = fetch(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {name: f.type for name, f in families.items()  # _created: when a histogram began (not ours to list)
             if name.startswith("hybrid_") and not name.endswith("_created")}
    assert kinds == {"hybrid_requests": "counter", "hybrid_prompt_tokens": "counter",
                     "hybrid_cached_prompt_tokens": "counter", "hybrid_prefilled_prompt_tokens": "counter",
                     "hybrid_generated_tokens": "counter", "hybrid_errors": "counter",
                     "hybrid_decode_tokens_per_second": "gauge", "hybrid_queue_depth": "gauge",
                     "hybrid_active_requests": "gauge", "hybrid_decode_steps": "counter",
                     "hybrid_time_to_first_token_seconds": "histogram",
                     "hybrid_inter_token_latency_seconds": "histogram",
                     "hybrid_request_duration_seconds": "histogram"}
    assert all(families[name].documentation for name in kinds)
    for name in ("hybrid_time_to_first_token_seconds", "hybrid_inter_token_latency_seconds",
                 "hybrid_request_duration_seconds"):
        count = next(s.value for s in families[name].samples if s.name == name + "_count")
        assert count >= (3 if "inter_token" in name else 1), name
    create_app(service)  # a second app in the same process: its own registry, no clash with the first


# What the page's reply area shows, each time it changes: more than one text means the reply was streamed.
WATCH_REPLY = """() => {
  window.shown = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll(".turn.assistant");
    const text = replies.length ? replies[replies.length - 1].textContent : "";
    if (text && window.shown[window.shown.length - 1] !== text) window.shown.push(text);
  }).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
}"""


def browser():
    """Debian's chromium under playwright (never playwright's own download), or a skip saying what is missing."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM} (apt-get install chromium)")
    return sync_playwright()


@contextlib.contextmanager
def chat_page(server):
    """The chat page of `server` open in headless chromium: (page, script errors, chat request bodies sent)."""
    with browser() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        try:
            page = chromium.new_page()
            errors, sent = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/chat/completions")
                    else None)
            page.goto(server.url + "/")
            yield page, errors, sent
        finally:
            chromium.close()


def test_chat_page_in_a_headless_browser(server):
    """Ask for the key, stream a reply into the page, and keep the conversation for a second turn. The tiny
    model's replies are noise: the test asserts their structure, not their words."""
    from playwright.sync_api import expect

    with chat_page(server) as (page, errors, sent):
        page.fill("#key", "wrong")
        page.click("#key-form button")
        expect(page.locator("#key-error")).to_have_text("that key was refused")
        page.fill("#key", KEY)
        page.click("#key-form button")
        expect(page.locator("#model")).to_have_text("kimi")
        page.click("summary")
        page.fill("#max-tokens", "12")
        page.fill("#temperature", "0")
        page.evaluate(WATCH_REPLY)
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        expect(page.locator(".turn.assistant:not(.streaming)")).to_have_count(1, timeout=30_000)
        assert len(page.evaluate("window.shown")) >= 2, "the reply appeared all at once, not streamed"
        page.fill("#input", "And again?")
        page.click("#send")
        expect(page.locator(".turn.assistant:not(.streaming)")).to_have_count(2, timeout=30_000)
        assert page.locator(".turn.user").all_inner_texts() == ["Hello", "And again?"]
        replies = page.locator(".turn.assistant").all_text_contents()
        assert len(replies) == 2 and all(r.strip() for r in replies), replies
        assert page.locator("#log .error").count() == 0 and not errors, errors
    assert [m["role"] for m in sent[1]["messages"]] == ["user", "assistant", "user"]  # the first turn went along
    assert sent[1]["messages"][1]["content"] == replies[0] and sent[1]["stream"] is True


BAD_FLAGS = [  # hybrid serve EMPTY_FOLDER FLAGS -> the one line it prints
    (["--port", "99999"], "error: --port 99999: a TCP port is 1 to 65535"),
    (["--port", "0"], "error: --port 0: a TCP port is 1 to 65535"),
    (["--max-concurrency", "0"], "error: --max-concurrency 0: must be at least 1"),
    (["--max-context", "0"], "error: --max-context 0: must be at least 1"),
]


@pytest.mark.parametrize("flags,line", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_serve_flags_are_one_line_before_the_model_loads(tmp_path, flags, line):
    """tmp_path holds no checkpoint: had serve read the model first, it would say so instead."""
    r = CliRunner().invoke(cli, ["serve", str(tmp_path), *flags])
    assert (r.exit_code, r.output) == (2, line + "\n")


def test_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(cli, ["serve", str(tmp_path), "--port", str(port)])
    assert (r.exit_code, r.output) == (
        2, f"error: port {port} on 127.0.0.1 is in use (another server?); choose one with --port\n")
