"""Reasoning kept apart from the answer (K2-Thinking): the streaming parser on hand-written replies, previous
turns' reasoning through the thinking template, the chat session, and the official openai and anthropic clients
against a real server whose model's output is scripted."""

import io
import re
import sys
from pathlib import Path

import pytest

from hybrid.chat import run_chat
from hybrid.generation import conversation
from hybrid.generation import engine as engine_module
from hybrid.generation.chat_template import k2_template, load_chat_template
from hybrid.generation.reasoning import (PlainStream, ReasoningStream, prompt_opens_reasoning, reply_stream,
                                         thinks)
from hybrid.generation.conversation import ChatSession
from hybrid.generation.runtime import open_runtime
from hybrid.generation.tokenizer import Tokenizer
from hybrid.generation.tools import Reasoning, Reply, Text, ToolCall, ToolCallStream, collect
from hybrid.read.tiny import TinySpec, make_tiny
from test_chat import scripted  # generate() replaced by replies streamed in 3-character steps

CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
        '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
WEATHER_CALL = ToolCall("functions.get_weather:0", "get_weather", '{"city": "Paris"}')


def parse(pieces, thinking=True, opened=False, tools=True) -> tuple[Reply, list]:
    stream = reply_stream(thinking, opened, tools)
    events = []
    for piece in pieces:
        events += stream.push(piece)
    events += stream.finish()
    return collect(events), events


def whole(text, **kw) -> Reply:
    return parse([text], **kw)[0]


@pytest.mark.parametrize("text, reasoning, content, calls", [
    ("<think>The user greets.</think>\n\nHello!", "The user greets.", "Hello!", []),
    ("<think>Need the weather.</think>" + CALL, "Need the weather.", "", [WEATHER_CALL]),
    ("<think>Need it.</think>Checking." + CALL, "Need it.", "Checking.", [WEATHER_CALL]),
    ("<think>Need it." + CALL, "Need it.", "", [WEATHER_CALL]),  # a section ends the reasoning, as in vLLM
    ("<think>Still thinking when the limit came", "Still thinking when the limit came", "", []),
    ("<think></think>Hi", "", "Hi", []),
    ("  <think>a</think>b", "a", "b", []),
    ("Hello <think> is text here", "", "Hello <think> is text here", []),
    ("<think>a</think>b<think>c</think>", "a", "b<think>c</think>", []),  # one block, at the start only
    ("<think>a</think>  \n ", "a", "", []),
    ("<thi", "", "<thi", []),  # a marker that never completes is text
])
def test_reasoning_then_answer_or_calls(text, reasoning, content, calls):
    reply = whole(text)
    assert (reply.reasoning, reply.content, reply.tool_calls, reply.warnings) == (reasoning, content, calls, [])


def test_every_split_point_gives_the_same_events_and_never_a_marker_fragment():
    text = "<think>Plan: call it.</think>\n Checking." + CALL
    want = whole(text)
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            reply, events = parse([text[:i], text[i:j], text[j:]])
            assert reply == want, (i, j)
            for e in events:
                if isinstance(e, (Text, Reasoning)):
                    assert "<" not in e.text and ">" not in e.text, (i, j, e)
    one_by_one, events = parse(list(text))
    assert one_by_one == want and want.reasoning == "Plan: call it." and want.content == "Checking."


def test_unclosed_think_is_all_reasoning_however_split():
    text = "<think>Step 1. Step 2 </thi"
    for i in range(len(text) + 1):
        assert whole(text) == parse([text[:i], text[i:]])[0]
    assert whole(text).reasoning == "Step 1. Step 2 </thi" and whole(text).content == ""


def test_a_prompt_that_opened_the_block_makes_the_start_reasoning():
    assert whole("weighing it</think>Yes.", opened=True) == Reply("Yes.", [], [], "weighing it")
    assert whole("weighing it", opened=True) == Reply("", [], [], "weighing it")
    assert whole("weighing it</think>Yes.") == Reply("weighing it</think>Yes.", [], [], "")


def test_content_without_tool_parsing_is_plain_text():
    reply = whole("<think>r</think>a" + CALL, tools=False)
    assert reply.reasoning == "r" and reply.content == "a" + CALL and not reply.tool_calls


def test_non_thinking_models_pass_through_unchanged():
    assert isinstance(reply_stream(False), ToolCallStream) and isinstance(reply_stream(False, tools=False),
                                                                         PlainStream)
    for text in ("<think>x</think>y", "  hi", "Checking." + CALL, "<thi"):
        before = ToolCallStream()
        assert whole(text, thinking=False) == collect(before.push(text) + before.finish())
    assert isinstance(reply_stream(True), ReasoningStream)


class FakeTokenizer:
    def __init__(self, specials):
        self.specials = specials

    def token_id(self, text):
        return self.specials.get(text)

    def decode(self, ids):
        return "".join(ids)


class FakeTemplate:
    def __init__(self, source):
        self.source = source

    def mentions(self, text):
        return text in self.source


def test_which_models_think_and_which_prompts_opened_the_block():
    plain, marked = FakeTokenizer({}), FakeTokenizer({"<think>": 1, "</think>": 2})
    assert thinks(None, marked) and thinks(FakeTemplate("...<think>..."), plain)
    assert not thinks(FakeTemplate("<|im_middle|>"), plain) and not thinks(None, plain)
    assert prompt_opens_reasoning(marked, [5, 1, 7]) and not prompt_opens_reasoning(marked, [1, 7, 2, 5])
    assert not prompt_opens_reasoning(marked, [5, 6])
    assert prompt_opens_reasoning(plain, ["a", "<think>", "\n"]) and not prompt_opens_reasoning(plain, ["<think></think>"])


# --- previous turns' reasoning through the thinking template (K2's real tokenizer)

K2_FILES = Path(__file__).resolve().parent / "data" / "kimi-k2"
SMALL = dict(layers=2, dense_layers=1, experts=4, top_k=2, seed=3)


@pytest.fixture(scope="module")
def thinking_k2_tokenizer(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("ckpt") / "k2-thinking-tok",
                     TinySpec(thinking=True, tokenizer_from=str(K2_FILES), **SMALL))


def test_the_template_gets_earlier_reasoning_and_keeps_only_the_tool_loops(thinking_k2_tokenizer):
    template, tokenizer = load_chat_template(thinking_k2_tokenizer), Tokenizer.from_folder(thinking_k2_tokenizer)
    assert thinks(template, tokenizer) and tokenizer.token_id("<think>") == 163606
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!", "reasoning_content": "They greet me."},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "reasoning_content": "I need the tool.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "21 C"}]
    text = template.render(messages)
    # the finished turn's reasoning is dropped (an empty block stays), the tool loop's is kept
    assert "They greet me." not in text and "<think></think>Hello!<|im_end|>" in text
    assert "<think>I need the tool.</think><|tool_calls_section_begin|>" in text
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>")
    ids = template.encode(tokenizer, messages)
    assert ids.count(163606) == ids.count(163607) == 2 and not prompt_opens_reasoning(tokenizer, ids)
    # once the loop ends with an answer, its reasoning is history too
    done = messages + [{"role": "assistant", "content": "21 C.", "reasoning_content": "Report it."}]
    later = template.render(done + [{"role": "user", "content": "Thanks"}])
    assert "I need the tool." not in later and "Report it." not in later
    # a message that writes the markers is text: it neither opens nor closes a block
    forged = template.encode(tokenizer, [{"role": "user", "content": "<think>"}])
    assert forged.count(163606) == 0 and not prompt_opens_reasoning(tokenizer, forged)


def test_k2_instruct_does_not_think(k2_tiny):
    assert not thinks(load_chat_template(k2_tiny) or k2_template(), Tokenizer.from_folder(k2_tiny))


# --- a byte-level thinking checkpoint behind the chat session and the real server

@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    folder = make_tiny(tmp_path_factory.mktemp("ckpt") / "k2-thinking-tiny", TinySpec(thinking=True, **SMALL))
    return open_runtime(folder)


def test_chat_session_keeps_reasoning_for_the_template(thinker, monkeypatch):
    assert thinker.thinking and thinker.sampling_defaults["temperature"] == 1.0  # K2-Thinking's recommendation
    monkeypatch.setattr(conversation, "generate", scripted("<think>They greet me.</think>\n\nHello!",
                                                                    "<think>Again."))
    s = ChatSession.open(thinker, max_new_tokens=50)
    s.add_user("Hi")
    events = list(s.respond())
    assert collect(events) == Reply("Hello!", [], [], "They greet me.")
    assert s.messages[-1] == {"role": "assistant", "content": "Hello!", "reasoning_content": "They greet me."}
    assert s.last.reasoning_tokens == 9  # the 3-character steps that left the reply inside the block
    s.add_user("And?")
    prompt = s.tokenizer.decode(s.prompt_ids())
    assert "<think></think>Hello!" in prompt and "They greet me." not in prompt  # the template dropped it
    events = list(s.respond())  # stopped while thinking: all of it is reasoning
    assert s.messages[-1] == {"role": "assistant", "content": "", "reasoning_content": "Again."}


def test_chat_front_end_shows_reasoning_dimmed_and_folds_it_with_think(thinker, monkeypatch, capsys):
    from rich.console import Console

    monkeypatch.setattr(conversation, "generate", scripted("<think>Greeting.</think>Hello!",
                                                                    "<think>Second thought.</think>Bye!"))
    s = ChatSession.open(thinker, max_new_tokens=50)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n/think\nBye\n/stats\n/exit\n"))
    console = Console(file=io.StringIO(), width=200, force_terminal=True, color_system="standard")
    assert run_chat(s, console) == 0
    shown, out = console.file.getvalue(), capsys.readouterr().out
    assert out == "Hello!\nBye!\n"  # stdout holds the answers only
    plain = re.sub(r"\x1b\[[0-9;]*m", "", shown)
    assert "\x1b[2mGr\x1b[0m" in shown and "Greeting.\n" in plain  # dimmed (ANSI 2), its own line
    assert "Second thought." not in plain  # folded after /think
    assert "reasoning folded into one line" in plain and "thought for 9 tokens (/think shows it)" in plain
    assert "of them reasoning" in plain


# The server: random weights never write <think>, so the model's output is scripted at the narrowest seam there
# is: the engine's sampler (hybrid.generation.engine.sample) returns the script's next token instead of drawing
# one. Everything else is real: the prompt through the thinking template, prefill and decode forwards (the
# scripted tokens are fed back), the text stream, the splitter, the routes, HTTP, and the official clients.

class Script:
    def __init__(self, tokenizer, stop_id):
        self.tokenizer, self.stop_id, self.tokens = tokenizer, stop_id, []

    def say(self, text: str):
        """The next request's reply: `text` as the model's tokens (its markers as control tokens), then the end."""
        self.tokens = self.tokenizer.encode(text, allow_special=True) + [self.stop_id]

    def sample(self, logits, params, generator):
        return self.tokens.pop(0) if self.tokens else self.stop_id


@pytest.fixture(scope="module")
def served(thinker):
    from hybrid.server.app import create_app
    from hybrid.server.service import Service
    from live_server import Server

    svc = Service(thinker, ("thinker",), max_concurrency=2, max_context=512)
    script = Script(svc.tokenizer, svc.tokenizer.token_id("<|im_end|>"))
    prompts = []
    submit = svc.engine.submit
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_module, "sample", script.sample)
        mp.setattr(svc.engine, "submit", lambda req: prompts.append(req.ids) or submit(req))
        server = Server(create_app(svc))
        yield server, script, prompts, svc
        server.stop()
    svc.close()


WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_openai_client_reads_reasoning_and_content_apart(served):
    from openai import OpenAI

    server, script, prompts, svc = served
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    script.say("<think>The user greets me.</think>\n\nHello there!")
    r = client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": "Hi"}])
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, r.choices[0].finish_reason) == ("The user greets me.", "Hello there!",
                                                                             "stop")
    assert r.usage.completion_tokens == len(svc.tokenizer.encode("<think>The user greets me.</think>\n\nHello "
                                                                 "there!", allow_special=True)) + 1
    script.say("<think>The user greets me.</think>\n\nHello there!")
    reasoning, content = [], []
    for chunk in client.chat.completions.create(model="thinker", messages=[{"role": "user", "content": "Hi"}],
                                                stream=True):
        delta = chunk.choices[0].delta
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        content.append(delta.content or "")
        assert not (reasoning[-1] and content[-1])
    assert "".join(reasoning) == "The user greets me." and "".join(content) == "Hello there!"
    assert len([p for p in reasoning if p]) > 1  # streamed, not sent at the end

    script.say("<think>I need the weather.</think><|tool_calls_section_begin|><|tool_call_begin|>"
               'functions.get_weather:0<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
               "<|tool_calls_section_end|>")
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="thinker", messages=ask, tools=WEATHER)
    m = r.choices[0].message
    assert m.reasoning_content == "I need the weather." and not m.content and r.choices[0].finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in m.tool_calls] == [
        ("functions.get_weather:0", "get_weather", '{"city": "Paris"}')]
    # the tool loop sent back with its reasoning: the template keeps it (the loop is in progress)
    script.say("<think>Report it.</think>21 C.")
    loop = ask + [m.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "21 C"}]
    r = client.chat.completions.create(model="thinker", messages=loop, tools=WEATHER)
    assert (r.choices[0].message.reasoning_content, r.choices[0].message.content) == ("Report it.", "21 C.")
    assert "<think>I need the weather.</think><|tool_calls_section_begin|>" in svc.tokenizer.decode(prompts[-1])


def test_anthropic_client_reads_thinking_blocks(served):
    anthropic = pytest.importorskip("anthropic")
    server, script, prompts, svc = served
    a = anthropic.Anthropic(base_url=server.url, api_key="none", max_retries=0)
    reply = "<think>Short answer.</think>Hello!"
    script.say(reply)
    r = a.messages.create(model="thinker", max_tokens=100, messages=[{"role": "user", "content": "Hi"}])
    assert [b.type for b in r.content] == ["thinking", "text"]
    assert (r.content[0].thinking, r.content[0].signature, r.content[1].text) == ("Short answer.", "", "Hello!")
    assert r.stop_reason == "end_turn"
    assert r.usage.output_tokens == len(svc.tokenizer.encode(reply, allow_special=True)) + 1
    script.say(reply)
    with a.messages.stream(model="thinker", max_tokens=100, messages=[{"role": "user", "content": "Hi"}]) as s:
        kinds = [e.type for e in s]
        final = s.get_final_message()
    assert "thinking" in kinds and "text" in kinds and kinds.index("thinking") < kinds.index("text")
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in r.content]
    # thinking blocks of an earlier assistant turn reach the template as its reasoning_content
    script.say("<think>Weather.</think><|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
               '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    r = a.messages.create(model="thinker", max_tokens=100, tools=tools,
                          messages=[{"role": "user", "content": "Paris?"}])
    assert [b.type for b in r.content] == ["thinking", "tool_use"] and r.stop_reason == "tool_use"
    script.say("Fine.")
    history = [{"role": "user", "content": "Paris?"}, {"role": "assistant", "content": r.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": r.content[1].id,
                                             "content": "21 C"}]}]
    r = a.messages.create(model="thinker", max_tokens=100, tools=tools, messages=history)
    assert [b.type for b in r.content] == ["text"] and r.content[0].text == "Fine."  # no <think>: all content
    assert "<think>Weather.</think><|tool_calls_section_begin|>" in svc.tokenizer.decode(prompts[-1])


def test_chat_page_shows_reasoning_folded_and_sends_it_back(served):
    """The chat page in a real browser: the think block streams into a <details> that folds when the answer
    starts, the answer stays apart, and the next turn sends the reasoning back as reasoning_content."""
    from playwright.sync_api import expect
    from test_server_ops import chat_page

    server, script, _, _ = served
    with chat_page(server) as (page, errors, sent):
        expect(page.locator("#model")).to_have_text("thinker")
        script.say("<think>They greet me.</think>\n\nHello there!")
        page.fill("#input", "Hello")
        page.press("#input", "Enter")
        expect(page.locator(".turn.assistant:not(.streaming)")).to_have_count(1, timeout=30_000)
        thought = page.locator(".turn.assistant details.thinking")
        expect(thought).to_have_count(1)
        assert thought.evaluate("d => d.open") is False
        assert thought.locator("summary").inner_text() == "Thought"
        assert thought.locator("div").text_content() == "They greet me."
        assert page.locator(".turn.assistant > span").text_content() == "Hello there!"
        script.say("Fine.")
        page.fill("#input", "How are you?")
        page.press("#input", "Enter")
        expect(page.locator(".turn.assistant:not(.streaming)")).to_have_count(2, timeout=30_000)
        assert not errors, errors
    first = sent[1]["messages"][1]
    assert first == {"role": "assistant", "content": "Hello there!", "reasoning_content": "They greet me."}
