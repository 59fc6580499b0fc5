"""K2 tool-call parsing: whole replies, every split of a streamed reply, and malformed output."""

import json

import pytest

from conftest import K2_FILES
from hybrid.errors import ConfigError
from hybrid.generation.tools import Text, ToolCall, ToolCallStream, Warn, collect, load_tools, parse_reply

B, E = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, CA, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


def call(i, name, args):
    return f"{CB}functions.{name}:{i}{CA}{args}{CE}"


ONE = B + call(0, "get_weather", '{"city": "Beijing"}') + E
SEVERAL = B + call(0, "get_weather", '{"city": "Beijing"}') + call(1, "get_weather", '{"city": "上海"}') + \
    call(2, "search", '{"q": "a <b> c", "n": [1, 2]}') + E
WITH_TEXT = "Let me check both cities.\n" + SEVERAL
BAD_JSON = "Sure." + B + call(0, "get_weather", '{"city": "Beijing"') + call(1, "ok", "{}") + E
NO_SECTION_END = "Hm " + B + call(0, "get_weather", '{"city": "Beijing"}')
NO_CALL_END = B + f"{CB}functions.get_weather:0{CA}" + '{"city": "Bei'
CUT_CALL = B + f"{CB}functions.a:0{CA}" + "{}" + call(1, "b", '{"x": 1}') + E
GARBAGE = B + "oops" + call(0, "f", "{}") + E + " after"
SPACED = B + "\n  " + call(0, "f", '{"a": 1}') + "\n" + call(1, "g", "{}") + " \n" + E
NOT_OBJECT = B + call(0, "f", "[1, 2]") + E
BAD_ID = B + f"{CB}get weather{CA}{{}}{CE}" + E
FALSE_START = "a <|tool_calls_sec> b <|tool_call_begin|> c"

ALL = [ONE, SEVERAL, WITH_TEXT, BAD_JSON, NO_SECTION_END, NO_CALL_END, CUT_CALL, GARBAGE, SPACED, NOT_OBJECT,
       BAD_ID, FALSE_START, "plain text, no tools", ""]


def test_one_call_keeps_the_models_id():
    reply = parse_reply(ONE)
    assert reply.content == "" and reply.warnings == []
    assert [c.openai() for c in reply.tool_calls] == [{
        "id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}]


def test_several_calls_and_text_before_the_section():
    reply = parse_reply(WITH_TEXT)
    assert reply.content == "Let me check both cities.\n" and reply.warnings == []
    assert [(c.id, c.name) for c in reply.tool_calls] == [
        ("functions.get_weather:0", "get_weather"), ("functions.get_weather:1", "get_weather"),
        ("functions.search:2", "search")]
    assert [json.loads(c.arguments) for c in reply.tool_calls] == [
        {"city": "Beijing"}, {"city": "上海"}, {"q": "a <b> c", "n": [1, 2]}]


def test_whitespace_between_calls_is_ignored():
    reply = parse_reply(SPACED)
    assert [c.name for c in reply.tool_calls] == ["f", "g"] and reply.content == "" and not reply.warnings


def test_malformed_json_becomes_text_and_a_warning():
    reply = parse_reply(BAD_JSON)
    assert reply.content == "Sure." + call(0, "get_weather", '{"city": "Beijing"')
    assert [c.name for c in reply.tool_calls] == ["ok"]
    assert len(reply.warnings) == 1 and "not valid JSON" in reply.warnings[0]


def test_missing_section_end_keeps_complete_calls_and_warns():
    reply = parse_reply(NO_SECTION_END)
    assert reply.content == "Hm " and [c.name for c in reply.tool_calls] == ["get_weather"]
    assert any("ended inside a tool-call section" in w for w in reply.warnings)


def test_missing_call_end_is_text_and_warning():
    reply = parse_reply(NO_CALL_END)
    assert reply.tool_calls == [] and reply.content == NO_CALL_END[len(B):]
    assert len(reply.warnings) == 2
    reply = parse_reply(CUT_CALL)  # the next call begins before this one ended
    assert reply.content == f"{CB}functions.a:0{CA}{{}}" and [c.name for c in reply.tool_calls] == ["b"]
    assert "without <|tool_call_end|>" in reply.warnings[0]


def test_other_malformed_shapes_never_raise():
    reply = parse_reply(GARBAGE)
    assert reply.content == "oops after" and [c.name for c in reply.tool_calls] == ["f"]
    assert "text inside a tool-call section" in reply.warnings[0]
    not_object = parse_reply(NOT_OBJECT)
    assert not_object.content == call(0, "f", "[1, 2]") and not_object.tool_calls == []
    assert not_object.warnings[0].startswith("tool call arguments are not a JSON object: '<|tool_call_begin|>")
    assert "is not functions.NAME:INDEX" in parse_reply(BAD_ID).warnings[0]
    assert parse_reply(FALSE_START).content == FALSE_START and not parse_reply(FALSE_START).warnings


def normalised(events):
    """Adjacent texts joined: how a reader sees the stream."""
    out = []
    for e in events:
        if isinstance(e, Text) and out and isinstance(out[-1], Text):
            out[-1] = Text(out[-1].text + e.text)
        elif not (isinstance(e, Text) and not e.text):
            out.append(e)
    return out


def whole(text):
    s = ToolCallStream()
    return normalised(s.push(text) + s.finish())


@pytest.mark.parametrize("text", ALL)
def test_streaming_split_at_every_position_equals_whole(text):
    expected = whole(text)
    for cut in range(len(text) + 1):
        s = ToolCallStream()
        assert normalised(s.push(text[:cut]) + s.push(text[cut:]) + s.finish()) == expected, cut
    s = ToolCallStream()
    assert normalised([e for ch in text for e in s.push(ch)] + s.finish()) == expected


@pytest.mark.parametrize("text", [ONE, WITH_TEXT, SPACED])
def test_no_marker_fragment_is_ever_shown(text):
    s = ToolCallStream()
    shown = ""
    for ch in text:
        for e in s.push(ch):
            if isinstance(e, Text):
                shown += e.text
                assert "<|" not in shown, shown
    assert all(not isinstance(e, Warn) for e in s.finish())


def test_a_call_is_reported_as_soon_as_it_ends():
    s = ToolCallStream()
    first = B + call(0, "a", "{}")
    assert [e for e in s.push(first) if isinstance(e, ToolCall)] == [ToolCall("functions.a:0", "a", "{}")]
    assert s.push(call(1, "b", "{}")) == [ToolCall("functions.b:1", "b", "{}")]


def test_streamed_through_k2_tokens():
    """K2's markers are single special tokens: the text stream yields them whole, and the parser agrees with
    the whole-reply parse at every token boundary."""
    from hybrid.generation.streaming import TextStream
    from hybrid.generation.tokenizer import Tokenizer

    k2 = Tokenizer.from_folder(K2_FILES)
    ids = k2.encode(WITH_TEXT)
    assert k2.token_id(B) in ids and k2.token_id(CA) in ids
    text, s, events = TextStream(k2), ToolCallStream(), []
    for i in ids:
        events += s.push(text.push(i))
    events += s.push(text.flush()) + s.finish()
    assert collect(events) == parse_reply(WITH_TEXT)


def test_load_tools(tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps([{"type": "function", "function": {"name": "a", "parameters": {}}},
                             {"name": "b", "description": "bare"}]))
    assert load_tools(f) == [{"type": "function", "function": {"name": "a", "parameters": {}}},
                             {"type": "function", "function": {"name": "b", "description": "bare"}}]
    f.write_text(json.dumps([{"description": "no name"}]))
    with pytest.raises(ConfigError, match="tool 0 needs a"):
        load_tools(f)
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="tools.json"):
        load_tools(f)
    for entry in ({"type": "retrieval", "name": "r"}, {"function": {"name": "f"}}):
        f.write_text(json.dumps([entry]))
        with pytest.raises(ConfigError, match="tool 0 has type"):
            load_tools(f)
