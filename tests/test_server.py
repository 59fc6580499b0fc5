"""The real server on 127.0.0.1 with a tiny model, driven by the official openai and anthropic clients."""

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from hybrid.server.service import ReplySplitter
from live_server import free_port
from served import client, server, service  # noqa: F401 (module fixtures)

KEY = "test-key"
MODEL = "kimi-k2-tiny"  # the name it serves
NAMES = (MODEL,)


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_model_card_chat_example(client):
    # Kimi-K2-Instruct-0905's first model-card example: system prompt and content parts.
    messages = [{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
                {"role": "user", "content": [{"type": "text", "text": "Please give a brief self-introduction."}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.6, max_tokens=12)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 20 and 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_equals_non_streamed_at_temperature_0(client):
    msgs = [{"role": "user", "content": "Hello"}]
    whole = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_max_tokens_gives_length(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                       max_tokens=3, stop=None)
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 3


def test_stop_strings(client):
    msgs = [{"role": "user", "content": "Hi"}]
    free = client.completions.create(model=MODEL, prompt="abc", temperature=0, max_tokens=12).choices[0].text
    stop = next(free[i:i + 2] for i in range(1, len(free) - 1) if free[i:i + 2].strip() and free[i:i + 2].isprintable())
    cut = client.completions.create(model=MODEL, prompt="abc", temperature=0, max_tokens=12, stop=[stop])
    assert cut.choices[0].text == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"
    assert client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, stop="zz").choices


def test_model_card_tool_loop_runs_verbatim(client):
    # The second model-card example: loop while finish_reason == "tool_calls", answering each call.
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Get weather information",
              "parameters": {"type": "object", "required": ["city"],
                             "properties": {"city": {"type": "string", "description": "City name"}}}}}]
    tool_map = {"get_weather": lambda city: {"weather": "Sunny"}}
    messages = [{"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."}]
    finish_reason, rounds = None, 0
    while finish_reason is None or finish_reason == "tool_calls":
        completion = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.6,
                                                    tools=tools, tool_choice="auto", max_tokens=8)
        choice = completion.choices[0]
        finish_reason = choice.finish_reason
        if finish_reason == "tool_calls":
            messages.append(choice.message)
            for tool_call in choice.message.tool_calls:
                args = json.loads(tool_call.function.arguments)
                messages.append({"role": "tool", "tool_call_id": tool_call.id, "name": tool_call.function.name,
                                 "content": json.dumps(tool_map[tool_call.function.name](**args))})
        rounds += 1
        assert rounds < 5
    assert finish_reason in ("stop", "length")


def test_forced_output_through_the_parser_path():
    """What the tiny model cannot choose to say, fed to the same splitter the routes use."""
    reply = ("Let me check.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
             "<|tool_call_argument_begin|>{\"city\": \"Beijing\"}<|tool_call_end|><|tool_calls_section_end|>")
    split = ReplySplitter(parse=True)
    events = []
    for i in range(0, len(reply), 3):  # streamed in small pieces
        events += split.push(reply[i:i + 3])
    split.push("", final=True)
    out = split.outcome
    assert out.content == "Let me check." and not out.warnings
    assert [c.openai() for c in out.tool_calls] == [{"id": "functions.get_weather:0", "type": "function",
                                                    "function": {"name": "get_weather",
                                                                 "arguments": "{\"city\": \"Beijing\"}"}}]
    forced = ReplySplitter(parse=True, prefix="<|tool_calls_section_begin|><|tool_call_begin|>functions.f:0"
                                              "<|tool_call_argument_begin|>")
    forced.push("{\"x\": 1}<|tool_call_end|><|tool_calls_section_end|>", final=True)
    assert forced.outcome.tool_calls[0].name == "f" and forced.outcome.content == ""


def test_named_tool_choice_forces_a_call_section(client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "f"}}, max_tokens=6)
    assert r.choices[0].finish_reason in ("tool_calls", "stop", "length")  # random weights: maybe malformed


def test_concurrent_streams_are_independent(client):
    prompts = [f"request number {i}" for i in range(8)]

    def run(p, stream):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=8)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)

    alone = [run(p, False) for p in prompts]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: run(p, True), prompts))
    assert together == alone


def test_disconnect_frees_the_slot(server, service):
    import http.client

    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data:")
    conn.close()  # hang up after the first chunk
    deadline = time.monotonic() + 30
    while service.engine.active:
        assert time.monotonic() < deadline, "the cancelled request kept its slot"
        time.sleep(0.05)


def test_anthropic_messages(server):
    anthropic = pytest.importorskip("anthropic")
    a = anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)
    r = a.messages.create(model=MODEL, max_tokens=8, system="Be brief.",
                          messages=[{"role": "user", "content": "Hello"}])
    assert r.role == "assistant" and r.content[0].type == "text" and r.stop_reason in ("end_turn", "max_tokens")
    assert r.usage.input_tokens > 5 and 1 <= r.usage.output_tokens <= 8
    with a.messages.stream(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "Hi"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert isinstance(text, str) and final.usage.output_tokens >= 1
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}]
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": [{"type": "tool_use", "id": "functions.get_weather:0",
                                                  "name": "get_weather", "input": {"city": "Beijing"}}]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "functions.get_weather:0",
                                             "content": "Sunny"}]}]
    assert a.messages.create(model=MODEL, max_tokens=4, tools=tools, messages=history).stop_reason


def raw(server, path, body=None, key=KEY, data=None):
    req = urllib.request.Request(server.url + path, data=data if data is not None else
                                 (json.dumps(body).encode() if body is not None else None),
                                 headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"}
                                                                                 if key else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


BAD = [
    ("no key", dict(key=None, body={"messages": [{"role": "user", "content": "x"}]}), 401, "API key"),
    ("wrong key", dict(key="nope", body={"messages": [{"role": "user", "content": "x"}]}), 401, "API key"),
    ("malformed JSON", dict(data=b"{not json"), 400, "malformed JSON"),
    ("wrong type", dict(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": "lots"}), 400,
     "max_tokens"),
    ("n > 1", dict(body={"messages": [{"role": "user", "content": "x"}], "n": 2}), 400, "n=1"),
    ("no messages", dict(body={"messages": []}), 400, "messages"),
    ("bad role", dict(body={"messages": [{"role": "wizard", "content": "x"}]}), 400, "role"),
    ("max_tokens beyond context", dict(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}),
     400, "context"),
    ("prompt beyond context", dict(body={"messages": [{"role": "user", "content": "x" * 600}]}), 400, "context"),
    ("bad tool_choice", dict(body={"messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes",
                                   "tools": [{"type": "function", "function": {"name": "f"}}]}), 400, "tool_choice"),
    ("unknown model", dict(body={"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}), 404,
     "The model `gpt-4` does not exist."),
]


@pytest.mark.parametrize("case,kw,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_json_4xx(server, case, kw, status, words):
    code, text = raw(server, "/v1/chat/completions", **kw)
    assert code == status, text
    err = json.loads(text)["error"]
    assert words in err["message"] and "Traceback" not in text


def test_too_big_a_body_is_refused_before_it_is_read(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for k, v in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                 ("Content-Length", str(64 << 20))):
        conn.putheader(k, v)
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "bytes" in json.loads(r.read())["error"]["message"]
    conn.close()


def test_anthropic_errors_have_anthropic_shape(server):
    code, text = raw(server, "/v1/messages", {"messages": [{"role": "user", "content": "x"}]})  # no max_tokens
    assert code == 400 and json.loads(text)["type"] == "error"


def test_health_and_metrics(server, client):
    code, text = raw(server, "/health", key=None)
    assert code == 200 and json.loads(text)["status"] == "ok"
    code, text = raw(server, "/metrics")
    assert code == 200
    values = dict(line.split() for line in text.splitlines() if not line.startswith("#"))
    assert float(values["hybrid_requests_total"]) > 0 and float(values["hybrid_generated_tokens_total"]) > 0
    assert "hybrid_queue_depth" in values and "hybrid_decode_tokens_per_second" in values


def test_hybrid_serve_command(k2_tiny):
    """The console command as a user starts it: a real process serving on a loopback port, saying where once
    the port is bound, logging one line per request (uvicorn's access log stays off)."""
    import re
    import signal
    import subprocess
    import sys
    from pathlib import Path

    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "hybrid"), "serve", str(k2_tiny), "--port", str(port),
                             "--served-model-name", "tiny", "--served-model-name", "k2", "--max-context", "512"],
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny", "k2"]
                    break
            except OSError:
                assert time.monotonic() < deadline, "hybrid serve did not come up"
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    log = proc.stderr.read()
    assert f"serving tiny on http://127.0.0.1:{port} (chat page at /, API at /v1; 4 concurrent, context 512)" in log
    assert re.search(r" INFO GET /v1/models 200 in=0 out=0 ttft=- total=\d+\.\d{3}s\n", log), log
    assert "HTTP/1.1" not in log, log


def test_request_sampling_reaches_the_sampler(client, service, server):
    """top_k, min_p and seed sent by a client sample exactly what the library's generate() samples with the
    same values over the same defaults (Runtime.sampling, the one merge every front end uses)."""
    from hybrid.generation.generate import Stats, generate

    ids, kw = [5, 6, 7, 8], dict(temperature=1.0, top_k=3, min_p=0.05, seed=7)

    def library(**values):
        stats = Stats()
        params = service.runtime.sampling(max_new_tokens=12, **values)
        list(generate(service.model, ids, params, service.stop_ids, stats, tokenizer=service.tokenizer))
        return stats.text

    assert library(**kw) != library(**(kw | {"top_k": 0, "min_p": 0.0}))  # the filters change this draw
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=1.0, seed=7,
                                  extra_body={"top_k": 3, "min_p": 0.05})
    assert r.choices[0].text == library(**kw)
    # Anthropic's top_k (its API has no seed): top_k=1 at any temperature is the greedy reply
    body = {"max_tokens": 12, "temperature": 1.0, "top_k": 1, "messages": [{"role": "user", "content": "Hi"}]}
    greedy = client.chat.completions.create(model=MODEL, messages=body["messages"], max_tokens=12, temperature=0)
    code, text = raw(server, "/v1/messages", body)
    assert code == 200 and json.loads(text)["content"][0]["text"] == greedy.choices[0].message.content
