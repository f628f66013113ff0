"""Tool calling without a model: the streaming tool-call parser (against the whole-text parse
under random chunkings), tool_choice resolution, OpenMini's tool prompt and multi-turn
history, and the grammar spec built for each tool_choice mode."""

from __future__ import annotations

import json
import random

import pytest

from openmini.serving.errors import OpenAIError
from openmini.serving.structured import (
    check_json_mentioned,
    response_format_constraint,
    structured_output_spec,
    tool_constraints,
)
from openmini.serving.tool_parsers import (
    HERMES,
    ContentDelta,
    ParsedOutputBuilder,
    ParsedToolCall,
    ToolCallArgumentsDelta,
    ToolCallStarted,
    ToolCallStreamParser,
    parse_tool_calls,
)
from openmini.serving.tools import (
    ToolChoice,
    history_as_text,
    plan_tool_calling,
    resolve_tool_choice,
    tool_system_prompt,
)

W = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Oslo"}}\n</tool_call>'
F = ('<tool_call>\n{"name": "write_file", "arguments": {"path": "a.py", "content": '
     '"print(\\"}1{\\")\\n"}}\n</tool_call>')


def _chunked(text: str, rng: random.Random, **kw):
    parser = ToolCallStreamParser(HERMES, **kw)
    builder = ParsedOutputBuilder()
    events = []
    i = 0
    while i < len(text):
        n = rng.randint(1, 7)
        ev = parser.feed(text[i:i + n])
        events += ev
        builder.add(ev)
        i += n
    ev = parser.finish()
    events += ev
    builder.add(ev)
    return builder.result(), parser.stopped, events


CASES = [
    ("Hello world", "Hello world", []),
    ("  Indented answer \n", "  Indented answer \n", []),
    (W, None, [("get_weather", '{"location": "Oslo"}')]),
    ("Let me check.\n" + W + "\n" + F, "Let me check.",
     [("get_weather", '{"location": "Oslo"}'),
      ("write_file", '{"path": "a.py", "content": "print(\\"}1{\\")\\n"}')]),
    ('<tool_call>\n{"arguments": {"q": [1, 2]}, "name": "late"}\n</tool_call>', None,
     [("late", '{"q": [1, 2]}')]),
    ('<tool_call>\n{"name": "noargs"}\n</tool_call>', None, [("noargs", "{}")]),
    ('<tool_call>\n{"name": "cut", "arguments": {"a": "hel', None, [("cut", '{"a": "hel')]),
    ('<tool_call>\n{"na', '<tool_call>\n{"na', []),  # cut before the name: it stays text
    ("a <tool_c", "a <tool_c", []),  # a marker prefix at the end is text
    ("text <tool_call> not json", "text <tool_call> not json", []),
    ('{"status": "ok"}', '{"status": "ok"}', []),  # JSON answers are content
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse_and_streaming_agree_under_any_chunking(text, content, calls):
    parsed, stopped = parse_tool_calls(text)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == calls
    assert not stopped
    rng = random.Random(text)
    for _ in range(40):
        streamed, _, events = _chunked(text, rng)
        assert streamed == parsed
        # deltas shape: a call starts once, arguments only after its start, indices 0, 1, ...
        started = [e.index for e in events if isinstance(e, ToolCallStarted)]
        assert started == list(range(len(calls)))
        for e in events:
            if isinstance(e, ToolCallArgumentsDelta):
                assert e.index in started[:e.index + 1]
            if isinstance(e, ContentDelta):
                assert e.text


def test_arguments_are_the_models_exact_json_text():
    text = ('<tool_call>\n{"name": "f", "arguments": {\n  "a": "x\\"y",\n  "b": [1, {}]\n}}'
            '\n</tool_call>')
    parsed, _ = parse_tool_calls(text)
    args = parsed.tool_calls[0].arguments
    assert json.loads(args) == {"a": 'x"y', "b": [1, {}]}
    assert args in text


def test_bare_call_only_when_enabled():
    bare = '{"name": "get_weather", "arguments": {"location": "Oslo"}}'
    assert parse_tool_calls(bare, bare_call=True)[0].tool_calls == [
        ParsedToolCall("get_weather", '{"location": "Oslo"}')]
    assert parse_tool_calls(bare)[0].content == bare
    assert parse_tool_calls('{"status": 1}', bare_call=True)[0].content == '{"status": 1}'
    assert parse_tool_calls("Hi {x}", bare_call=True)[0].content == "Hi {x}"


def test_a_repeated_call_ends_the_output():
    a = W
    b = W.replace("Oslo", "Bergen")
    a_again = W.replace('"location": "Oslo"', '"location":"Oslo" ')  # same call, other blanks
    text = "\n".join([a, b, a_again, b, a])
    parsed, stopped = parse_tool_calls(text)
    assert stopped and [json.loads(c.arguments)["location"] for c in parsed.tool_calls] == [
        "Oslo", "Bergen"]
    rng = random.Random(1)
    for _ in range(20):
        streamed, st, events = _chunked(text, rng)
        assert (streamed, st) == (parsed, stopped)
        assert not any(isinstance(e, ToolCallStarted) and e.index == 2 for e in events)
    kept, stopped = parse_tool_calls(text, stop_at_repeated_call=False)
    assert not stopped and len(kept.tool_calls) == 5


# ---- tool_choice and prompts -------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": {"type": "object", "properties": {
                                          "location": {"type": "string"}},
                                          "required": ["location"]}, "strict": True}},
    {"type": "function", "function": {"name": "get_time"}},
]


def test_resolve_tool_choice():
    assert resolve_tool_choice(None, None) == ToolChoice("none")
    assert resolve_tool_choice(TOOLS, None) == ToolChoice("auto")
    assert resolve_tool_choice(TOOLS, "required") == ToolChoice("required")
    assert resolve_tool_choice(TOOLS, "none") == ToolChoice("none")
    named = {"type": "function", "function": {"name": "get_time"}}
    assert resolve_tool_choice(TOOLS, named) == ToolChoice("function", "get_time")
    assert resolve_tool_choice(TOOLS, {"type": "function", "name": "get_time"}) == \
        ToolChoice("function", "get_time")  # the Responses API shape
    for bad in ({"type": "function", "function": {"name": "nope"}}, "sometimes"):
        with pytest.raises(OpenAIError) as e:
            resolve_tool_choice(TOOLS, bad)
        assert e.value.param == "tool_choice"


class _Template:
    def __init__(self, source: str, uses_tools: bool):
        self.source, self.uses_tools = source, uses_tools


QWEN_LIKE = _Template("{% if tools %}...<tool_call>...{% endif %}", True)
PLAIN = _Template("{% for m in messages %}{{ m.content }}{% endfor %}", False)

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo and Bergen?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"location": "Bergen"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12 C"},
    {"role": "tool", "tool_call_id": "call_2", "content": "9 C"},
]


def test_template_with_tools_section_renders_tools_itself():
    plan = plan_tool_calling(TOOLS, None, None, QWEN_LIKE)
    assert plan.template_renders_tools
    msgs, tools = plan.prompt(HISTORY)
    assert msgs == HISTORY and tools == TOOLS
    assert plan_tool_calling(TOOLS, "none", None, QWEN_LIKE).prompt(HISTORY)[1] is None


def test_own_tool_prompt_and_history_for_templates_without_tools():
    plan = plan_tool_calling(TOOLS, "required", False, PLAIN)
    assert not plan.template_renders_tools and not plan.parallel_tool_calls
    msgs, tools = plan.prompt(HISTORY)
    assert tools is None
    system = msgs[0]["content"]
    assert system.startswith("Be brief.\n\n# Tools")
    for t in TOOLS:  # every signature, as JSON
        assert json.dumps(t) in system
    assert '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n' \
           '</tool_call>' in system
    assert "must call" in system
    # history: the calls in the same format as the model must write them, results as a user turn
    assert msgs[2] == {"role": "assistant", "content":
                       '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Oslo"}}'
                       '\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": '
                       '{"location": "Bergen"}}\n</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "<tool_response>\n12 C\n</tool_response>\n"
                                                  "<tool_response>\n9 C\n</tool_response>"}
    assert len(msgs) == 4
    # tool_choice none: no tools offered, history still readable
    msgs, _ = plan_tool_calling(TOOLS, "none", None, PLAIN).prompt(HISTORY)
    assert "# Tools" not in msgs[0]["content"] and "<tool_response>" in msgs[3]["content"]


def test_tool_prompt_names_the_forced_function():
    text = tool_system_prompt(TOOLS, ToolChoice("function", "get_time"))
    assert "`get_time`" in text
    assert "directly" in tool_system_prompt(TOOLS, ToolChoice("auto"))


def test_history_as_text_without_system_message():
    msgs = history_as_text([{"role": "tool", "content": "x"}])
    assert msgs == [{"role": "user", "content": "<tool_response>\nx\n</tool_response>"}]


# ---- specs per mode ----------------------------------------------------------------------------


@pytest.mark.parametrize("choice,ptc,allow_answer,names,max_calls", [
    (None, None, True, ["get_weather", "get_time"], None),
    ("required", None, False, ["get_weather", "get_time"], None),
    ("required", False, False, ["get_weather", "get_time"], 1),
    ({"type": "function", "function": {"name": "get_time"}}, None, False, ["get_time"], 1),
])
def test_spec_per_tool_choice(choice, ptc, allow_answer, names, max_calls):
    plan = plan_tool_calling(TOOLS, choice, ptc, PLAIN)
    spec = structured_output_spec(plan, None, tool_constraints(TOOLS))
    assert spec.allow_answer == allow_answer
    assert [t.name for t in spec.tools] == names
    assert spec.max_tool_calls == max_calls
    assert spec.tools[-1].parameters.strict is False  # get_time is not strict
    if choice is None:
        assert spec.allow_bare_call and plan.bare_call


def test_no_spec_without_constraints_and_json_answer_with_tools():
    plan = plan_tool_calling(TOOLS, "none", None, PLAIN)
    assert structured_output_spec(plan, None, tool_constraints(TOOLS)) is None
    answer = response_format_constraint({"type": "json_object"})
    spec = structured_output_spec(plan_tool_calling(TOOLS, None, None, PLAIN), answer,
                                  tool_constraints(TOOLS))
    assert spec.answer == answer and spec.allow_answer and not spec.allow_bare_call


def test_fail_closed_params_point_at_the_schema():
    bad = {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                  "schema": {"not": {}}}}
    with pytest.raises(OpenAIError) as e:
        response_format_constraint(bad)
    assert (e.value.status, e.value.param, e.value.code) == (
        400, "response_format.json_schema.schema", "invalid_json_schema")
    # non-strict: the unsupported keyword is ignored, the rest still guides
    bad["json_schema"]["strict"] = False
    assert response_format_constraint(bad).strict is False
    tools = TOOLS + [{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "object", "properties": {
            "p": {"type": "string", "pattern": "(?<=a)b"}}}}}]
    with pytest.raises(OpenAIError) as e:
        tool_constraints(tools)
    assert e.value.param == "tools[2].function.parameters"
    with pytest.raises(OpenAIError) as e:
        tool_constraints(tools, param_format="tools[{i}].parameters")  # the Responses shape
    assert e.value.param == "tools[2].parameters"


def test_json_object_needs_the_word_json():
    check_json_mentioned(["Reply in JSON please"])
    with pytest.raises(OpenAIError) as e:
        check_json_mentioned(["hello", None])
    assert e.value.param == "messages"
