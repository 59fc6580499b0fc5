"""Chat templates: K2's real 0711 template and the 0905 transcriptions against strings written by reading the
templates, and against transformers' own renderer; the Hugging Face environment's extras; where templates
are found."""

import json

import pytest

from conftest import K2_FILES
from hybrid.generation.chat_template import K2_TEMPLATE, ChatTemplate, load_chat_template
from hybrid.errors import ConfigError, GenerationError
from hybrid.generation.tokenizer import Tokenizer

T0711 = K2_FILES / "chat_template_0711_initial.jinja"
T0905A, T0905B = K2_FILES / "chat_template_0905_variantA.jinja", K2_FILES / "chat_template_0905_variantB.jinja"

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# tojson as Hugging Face defines it: json.dumps with ensure_ascii=False and the default ", " / ": " separators.
TOOLS_JSON = ('[{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", '
              '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]')
CALL = {"id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
USER = {"role": "user", "content": "Weather in Paris?"}
ASSISTANT_CALL = {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]}
RESULT = {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": '{"temp": 21}'}
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Weather?"}]

# (messages, tools, add_generation_prompt) per case
CASES = {
    "plain": ([{"role": "user", "content": "Hi"}], None, True),
    "system": (CHAT, None, True),
    "tools": ([USER], TOOLS, True),
    "tool_call": ([USER, ASSISTANT_CALL], TOOLS, False),
    "tool_result": ([USER, ASSISTANT_CALL, RESULT], TOOLS, True),
}

K2_0905_SYSTEM = "<|im_system|>system<|im_middle|>You are Kimi, an AI assistant created by Moonshot AI.<|im_end|>"
K2_0711_SYSTEM = "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
GEN = "<|im_assistant|>assistant<|im_middle|>"
SYSTEM_CHAT = ("<|im_system|>system<|im_middle|>Be brief.<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>"
               "<|im_assistant|>assistant<|im_middle|>Hello!<|im_end|><|im_user|>user<|im_middle|>Weather?<|im_end|>"
               + GEN)
ASK = "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|>"
SECTION = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
           '{"city": "Paris"}<|tool_call_end|><|tool_calls_section_end|>')

# 0905: the tool declaration keeps the template's literal line breaks and indentation around "# Tools"; a
# tool result is headed "## Return of ID" and its content follows a line break and the template's 4 spaces.
DECLARE_0905 = "<|im_system|>tool_declare<|im_middle|>\n  # Tools\n  " + TOOLS_JSON + "<|im_end|>"
EXPECTED_0905 = {
    "plain": K2_0905_SYSTEM + "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN,
    "system": SYSTEM_CHAT,
    "tools": DECLARE_0905 + K2_0905_SYSTEM + ASK + GEN,
    "tool_call": DECLARE_0905 + K2_0905_SYSTEM + ASK + "<|im_assistant|>assistant<|im_middle|>Let me check."
    + SECTION + "<|im_end|>",
    "tool_result": DECLARE_0905 + K2_0905_SYSTEM + ASK + "<|im_assistant|>assistant<|im_middle|>Let me check."
    + SECTION + "<|im_end|><|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n"
    '    {"temp": 21}<|im_end|>' + GEN,
}
# 0711's first template: compact declaration, no tool-call rendering (the assistant turn keeps only its text),
# a tool result is a plain "tool" message.
DECLARE_0711 = "<|im_system|>tool_declare<|im_middle|>" + TOOLS_JSON + "<|im_end|>"
EXPECTED_0711 = {
    "plain": K2_0711_SYSTEM + "<|im_user|>user<|im_middle|>Hi<|im_end|>" + GEN,
    "system": SYSTEM_CHAT,
    "tools": DECLARE_0711 + K2_0711_SYSTEM + ASK + GEN,
    "tool_call": DECLARE_0711 + K2_0711_SYSTEM + ASK + "<|im_assistant|>assistant<|im_middle|>Let me check.<|im_end|>",
    "tool_result": DECLARE_0711 + K2_0711_SYSTEM + ASK + "<|im_assistant|>assistant<|im_middle|>Let me check."
    '<|im_end|><|im_system|>tool<|im_middle|>{"temp": 21}<|im_end|>' + GEN,
}


def render(path, case):
    messages, tools, gen = CASES[case]
    return ChatTemplate.from_file(path).render(messages, tools=tools, add_generation_prompt=gen)


@pytest.mark.parametrize("case", CASES)
def test_0905_renders_as_read(case):
    assert render(K2_TEMPLATE, case) == EXPECTED_0905[case]  # the packaged template
    if CASES[case][2]:  # transcription B differs without a generation prompt (below)
        assert render(T0905B, case) == EXPECTED_0905[case]


@pytest.mark.parametrize("case", CASES)
def test_0711_renders_as_read(case):
    assert render(T0711, case) == EXPECTED_0711[case]


def test_the_0905_transcriptions_differ_only_where_read():
    # A's `{% endif %}` after the role header leaves a line break after a system or tool header.
    a = render(T0905A, "system")
    assert a == SYSTEM_CHAT.replace("system<|im_middle|>Be", "system<|im_middle|>\nBe")
    assert render(T0905A, "plain") == EXPECTED_0905["plain"]
    # B closes the last message only when a generation prompt follows (an assistant prefill stays open).
    b = ChatTemplate.from_file(T0905B).render(CASES["tool_call"][0], tools=TOOLS, add_generation_prompt=False)
    assert b == EXPECTED_0905["tool_call"].removesuffix("<|im_end|>")


def test_0711_template_file_is_tokenizer_configs():
    cfg = json.loads((K2_FILES / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == T0711.read_text()
    assert load_chat_template(K2_FILES).render([{"role": "user", "content": "Hi"}]) == EXPECTED_0711["plain"]


@pytest.mark.parametrize("path", [T0711, T0905A, T0905B, K2_TEMPLATE])
@pytest.mark.parametrize("case", CASES)
def test_same_as_transformers_renderer(path, case):
    from transformers.utils.chat_template_utils import render_jinja_template

    messages, tools, gen = CASES[case]
    theirs = render_jinja_template([messages], tools=tools, chat_template=path.read_text(),
                                   add_generation_prompt=gen)[0][0]
    assert render(path, case) == theirs


def test_argument_objects_are_tojson_without_ascii_escapes():
    call = {"id": "functions.f:0", "type": "function", "function": {"name": "f", "arguments": {"city": "Zürich"}}}
    out = ChatTemplate.from_file(K2_TEMPLATE).render([USER, {"role": "assistant", "content": "", "tool_calls": [call]}],
                                                     add_generation_prompt=False)
    assert '<|tool_call_argument_begin|>{"city": "Zürich"}<|tool_call_end|>' in out


def test_rendered_markers_are_single_k2_tokens():
    k2 = Tokenizer.from_folder(K2_FILES)
    ids = k2.encode(EXPECTED_0905["tool_result"])
    for marker, token in [("<|im_system|>", 163594), ("<|im_user|>", 163587), ("<|im_assistant|>", 163588),
                          ("<|im_middle|>", 163601), ("<|im_end|>", 163586), ("<|tool_calls_section_begin|>", 163595),
                          ("<|tool_call_begin|>", 163597), ("<|tool_call_argument_begin|>", 163598),
                          ("<|tool_call_end|>", 163599), ("<|tool_calls_section_end|>", 163596)]:
        assert k2.token_id(marker) == token and token in ids
    assert k2.decode(ids) == EXPECTED_0905["tool_result"]


def test_hugging_face_environment_extras():
    t = ChatTemplate({"default": (
        "{{ bos_token }}{{ messages | tojson(separators=(',', ':')) }}|{{ messages[0] | tojson(indent=1) }}|"
        "{{ 'é' | tojson(ensure_ascii=True) }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=True) }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% generation %}kept{% endgeneration %}|{{ strftime_now('%Y') | length }}|{{ extra }}")},
        "inline", {"bos_token": "<s>"})
    out = t.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], extra="E")
    assert out == ('<s>[{"role":"user","content":"x"},{"role":"assistant","content":"y"}]|'
                   '{\n "role": "user",\n "content": "x"\n}|"\\u00e9"|{"a": 2, "b": 1}|user|kept|4|E')


def test_template_errors_are_hybrid_errors():
    raising = ChatTemplate({"default": "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}"},
                           "inline")
    with pytest.raises(GenerationError, match="user first"):
        raising.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ConfigError, match="line 2"):
        ChatTemplate({"default": "ok\n{% if %}"}, "inline")
    with pytest.raises(GenerationError, match="cannot render"):  # 0711 iterates content that is not a string
        ChatTemplate.from_file(T0711).render([{"role": "user", "content": None}])
    with pytest.raises(GenerationError, match="chat template"):  # the sandbox refuses attribute games
        ChatTemplate({"default": "{{ messages.__class__.__mro__ }}"}, "inline").render([])


def test_where_templates_are_found(tmp_path):
    assert load_chat_template(tmp_path) is None
    cfg = {"bos_token": {"content": "<B>"}, "eos_token": "<E>", "chat_template": [
        {"name": "default", "template": "d{{ bos_token }}{{ eos_token }}"}, {"name": "tool_use", "template": "t"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = load_chat_template(tmp_path)
    assert t.render([]) == "d<B><E>" and t.render([], tools=TOOLS) == "t"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json{{ bos_token }}"}))
    assert load_chat_template(tmp_path).render([]) == "json<B>"
    (tmp_path / "chat_template.jinja").write_text("jinja")
    assert load_chat_template(tmp_path).render([]) == "jinja"
    (tmp_path / "chat_template.json").write_text("[")
    (tmp_path / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="chat_template.json"):
        load_chat_template(tmp_path)
