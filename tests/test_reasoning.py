"""Reasoning kept apart from the answer (K2-Thinking): the streaming parser on hand-written replies, previous
turns' reasoning through the thinking template, the chat session, and the official openai and anthropic clients
against a real server whose model's output is scripted."""

import pytest

from hybrid.generation.reasoning import (PlainStream, ReasoningStream, prompt_opens_reasoning, reply_stream,
                                         thinks)
from hybrid.generation.tools import Reasoning, Reply, Text, ToolCall, ToolCallStream, collect

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
