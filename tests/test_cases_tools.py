"""Tool calling and structured outputs over real HTTP with the official ``openai`` client
(strict response validation) on the tiny random llama: cases C05-C09, the SDK's
``parse()`` / ``pydantic_function_tool`` / ``stream()`` helpers, multi-turn rendering.

A random model follows no format, so every valid call or JSON answer here comes from the
grammar; streamed results are compared with non-streamed ones (same seed).
"""

from __future__ import annotations

import json
from enum import Enum

import jsonschema
import openai
import pytest
from openai import pydantic_function_tool
from pydantic import BaseModel, Field

from server_utils import running_engine
from sse_checks import read_sse
from test_cases_chat import RecordingEngine

MODEL = "tiny"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.", "strict": True,
    "parameters": {"type": "object", "properties": {
        "location": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["location", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone.",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 6}},
                   "required": ["tz"], "additionalProperties": False}}}
WRITE = {"type": "function", "function": {
    "name": "write_file", "strict": True,
    "parameters": {"type": "object", "properties": {
        "path": {"enum": ["a.py", "b.py"]}, "content": {"enum": ["print(1)", "print(2)"]}},
        "required": ["path", "content"], "additionalProperties": False}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK, WRITE)}


@pytest.fixture(scope="module")
def engine(tiny_llama):
    with running_engine(tiny_llama.hf_dir, max_model_len=2048, num_blocks=512) as eng:
        yield RecordingEngine(eng)


@pytest.fixture(scope="module")
def quiet(engine):
    """logit_bias that keeps the random model from spending its tokens on JSON whitespace
    (the grammar allows up to a line break and 32 blanks at each place); a lone line break,
    the separator between calls, stays."""
    tok = engine.tokenizer
    blanks = [i for i in range(tok.vocab_size) if i not in tok.special_token_ids
              and tok.decode([i]).isspace() and tok.decode([i]) != "\n"]
    return {str(i): -100 for i in blanks}


@pytest.fixture(scope="module")
def no_eos(engine, quiet):
    return {**quiet, **{str(i): -100 for i in engine.tokenizer.eos_token_ids}}


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def check_calls(message) -> list[tuple[str, dict]]:
    """Every call names a listed tool and its arguments validate; ids are distinct."""
    calls = message.tool_calls or []
    assert len({c.id for c in calls}) == len(calls)
    out = []
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        args = json.loads(c.function.arguments)
        jsonschema.validate(args, SCHEMAS[c.function.name])
        out.append((c.function.name, args))
    return out


def tool_deltas(chunks: list[dict]) -> dict[int, dict]:
    """Check every tool-call delta (API.md section 2, C05) and join them per index."""
    calls: dict[int, dict] = {}
    roles = 0
    for ch in chunks:
        for choice in ch["choices"]:
            delta = choice["delta"]
            roles += "role" in delta
            for tc in delta.get("tool_calls") or []:
                assert isinstance(tc["index"], int)
                assert "function" in tc
                if tc["index"] not in calls:
                    # first fragment: index, id, type, name, arguments ""
                    assert tc["index"] == len(calls), "indices are 0, 1, ... in order"
                    assert tc["id"].startswith("call_") and tc["type"] == "function"
                    assert tc["function"]["name"] and tc["function"]["arguments"] == ""
                    calls[tc["index"]] = {"id": tc["id"], "name": tc["function"]["name"],
                                          "arguments": ""}
                else:  # later fragments only append arguments
                    assert set(tc) == {"index", "function"}
                    assert set(tc["function"]) == {"arguments"}
                    calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert roles == 1
    return calls


def as_list(calls) -> list[tuple[str, str]]:
    if isinstance(calls, dict):
        return [(calls[i]["name"], calls[i]["arguments"]) for i in sorted(calls)]
    return [(c.function.name, c.function.arguments) for c in calls or []]


# ---- C05 / C06 / C07 -----------------------------------------------------------------------------


def test_c05_tool_call_deltas_and_stream_equals_non_stream(client, http, quiet):
    kw = dict(model=MODEL, messages=user("What is the weather like in Oslo?"), tools=[WEATHER],
              tool_choice="required", temperature=0, max_tokens=200, logit_bias=quiet)
    ns = client.chat.completions.create(**kw)
    msg = ns.choices[0].message
    assert msg.content is None and ns.choices[0].finish_reason == "tool_calls"
    assert [n for n, _ in check_calls(msg)] == ["get_weather"] * len(msg.tool_calls)
    chunks = read_sse(http, "/chat/completions", {**kw, "stream": True})
    first = chunks[0]["choices"][0]["delta"]
    assert first["role"] == "assistant" and first["content"] is None
    streamed = tool_deltas(chunks)
    assert as_list(streamed) == as_list(msg.tool_calls)
    finish = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finish[-1] == "tool_calls" and set(finish[:-1]) == {None}
    assert chunks[-1]["choices"][0]["delta"] == {}
    # the SDK's stream helper accumulates the same calls
    with client.chat.completions.stream(**kw) as s:
        arg_deltas = [e for e in s if e.type == "tool_calls.function.arguments.delta"]
        final = s.get_final_completion()
    assert arg_deltas and as_list(final.choices[0].message.tool_calls) == as_list(msg.tool_calls)


def test_c06_parallel_calls_numbered(client, http, no_eos):
    base = dict(model=MODEL, messages=user("create a.py printing 1 and b.py printing 2"),
                tools=[WRITE], tool_choice="required", temperature=1.0, max_tokens=300,
                logit_bias=no_eos)  # EOS banned: calls follow each other until one repeats
    for seed in range(10):  # a seed whose first two calls differ
        kw = {**base, "seed": seed}
        ns = client.chat.completions.create(**kw)
        calls = check_calls(ns.choices[0].message)
        assert calls and ns.choices[0].finish_reason == "tool_calls"
        # no call repeats an earlier one: the repeat ended the output
        assert len({json.dumps(a, sort_keys=True) for _, a in calls}) == len(calls)
        if len(calls) >= 2:
            break
    assert len(calls) >= 2
    chunks = read_sse(http, "/chat/completions", {**kw, "stream": True})
    streamed = tool_deltas(chunks)
    assert sorted(streamed) == list(range(len(calls)))
    assert as_list(streamed) == as_list(ns.choices[0].message.tool_calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # usage is the same: both stopped at the repeated call
    chunks = read_sse(http, "/chat/completions", {**kw, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"]["completion_tokens"] == ns.usage.completion_tokens
    # parallel_tool_calls false: exactly one call
    one = client.chat.completions.create(**kw, parallel_tool_calls=False)
    assert one.usage.completion_tokens < ns.usage.completion_tokens
    assert len(check_calls(one.choices[0].message)) == 1
    assert one.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c07_required_always_calls(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=user("Hello!"),
                                       tools=[WEATHER, CLOCK], tool_choice="required",
                                       temperature=1.0, seed=seed, max_tokens=300)
    calls = check_calls(r.choices[0].message)
    assert calls and r.choices[0].finish_reason == "tool_calls"


def test_named_tool_choice_calls_that_function_and_stops(client, http):
    kw = dict(model=MODEL, messages=user("Hello!"), tools=[WEATHER, CLOCK],
              tool_choice={"type": "function", "function": {"name": "get_time"}},
              temperature=0.7, seed=5, max_tokens=200)
    r = client.chat.completions.create(**kw)
    calls = check_calls(r.choices[0].message)
    assert [n for n, _ in calls] == ["get_time"]
    assert r.choices[0].finish_reason == "stop"  # OpenAI's quirk for a named choice
    chunks = read_sse(http, "/chat/completions", {**kw, "stream": True})
    assert as_list(tool_deltas(chunks)) == as_list(r.choices[0].message.tool_calls)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_auto_mode_text_or_valid_calls_and_n_choices(client, http):
    """auto with n = 4: each choice is text or valid calls; streamed == non-streamed."""
    kw = dict(model=MODEL, messages=user("Weather in Oslo?"), tools=[WEATHER, CLOCK],
              temperature=1.0, seed=9, max_tokens=60, n=4)
    r = client.chat.completions.create(**kw)
    chunks = read_sse(http, "/chat/completions", {**kw, "stream": True})
    for choice in r.choices:
        check_calls(choice.message)
        mine = [c for c in chunks if c["choices"][0]["index"] == choice.index]
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in mine)
        assert content == (choice.message.content or "")
        assert as_list(tool_deltas(mine)) == as_list(choice.message.tool_calls)
        assert mine[-1]["choices"][0]["finish_reason"] == choice.finish_reason
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")


def test_tool_choice_none_offers_no_tools(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=user("Hi"), tools=[WEATHER],
                                       tool_choice="none", max_tokens=5)
    ids, params = engine.requests[r.id]
    assert params.structured_output is None
    assert "get_weather" not in engine.tokenizer.decode(ids)
    assert r.choices[0].message.tool_calls is None


# ---- C08 / C09 -------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("payload,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "strict": True, "schema": {"type": "object", "properties": {
            "code": {"type": "string", "pattern": "^(?!x)[a-z]+$"}}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "r", "strict": True, "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ({"tools": [WEATHER, {"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "object", "properties": {
            "x": {"not": {"type": "null"}}}}}}]}, "tools[1].function.parameters"),
])
def test_c08_unenforceable_schema_is_400_naming_it(http, payload, param, stream):
    body = {"model": MODEL, "messages": user("json please"), "stream": stream, **payload}
    resp = http.post("/chat/completions", json=body)
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/json")  # before any SSE
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "cannot enforce" in err["message"]


def test_c09_json_object(client, http):
    r = client.chat.completions.create(
        model=MODEL, messages=user("Return a JSON object with key status set to ok"),
        response_format={"type": "json_object"}, temperature=0, max_tokens=300)
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=user("Say hi"),
                                       response_format={"type": "json_object"})
    assert e.value.param == "messages" and "json" in e.value.message


def test_non_strict_schema_is_still_guided(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 9}},
              "required": ["n"], "additionalProperties": False,
              "dependentRequired": {"n": []}}  # unsupported keyword: ignored when not strict
    r = client.chat.completions.create(
        model=MODEL, messages=user("n?"), temperature=0, max_tokens=200,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "n", "schema": schema, "strict": False}})
    value = json.loads(r.choices[0].message.content)
    assert isinstance(value["n"], int) and value["n"] <= 9


# ---- SDK helpers ---------------------------------------------------------------------------------


class Color(str, Enum):
    red = "red"
    blue = "blue"


class Item(BaseModel):
    name: str = Field(max_length=6)
    qty: int
    color: Color


class Order(BaseModel):
    items: list[Item] = Field(max_length=2)
    note: str | None = Field(max_length=6)


class GetWeather(BaseModel):
    location: str = Field(max_length=8)
    days: int


def test_sdk_parse_with_pydantic_model(client, quiet):
    r = client.chat.completions.parse(model=MODEL, messages=user("An order, please."),
                                      response_format=Order, temperature=0.5, seed=4,
                                      max_tokens=400, logit_bias=quiet)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Order)
    assert Order.model_validate_json(r.choices[0].message.content) == parsed


def test_sdk_pydantic_function_tool_round_trip(client, quiet):
    r = client.chat.completions.parse(model=MODEL, messages=user("Weather in Oslo for 3 days"),
                                      tools=[pydantic_function_tool(GetWeather)],
                                      tool_choice="required", temperature=0.5, seed=2,
                                      max_tokens=300, logit_bias=quiet)
    calls = r.choices[0].message.tool_calls
    assert calls and all(isinstance(c.function.parsed_arguments, GetWeather) for c in calls)


def test_sdk_stream_helper_with_schema_and_tools(client, quiet):
    with client.chat.completions.stream(model=MODEL, messages=user("Order as JSON"),
                                        response_format=Order, temperature=0.5, seed=4,
                                        max_tokens=400, logit_bias=quiet) as s:
        events = [e.type for e in s]
        final = s.get_final_completion()
    assert "content.delta" in events and "content.done" in events
    assert isinstance(final.choices[0].message.parsed, Order)
    with client.chat.completions.stream(model=MODEL, messages=user("Weather?"),
                                        tools=[pydantic_function_tool(GetWeather)],
                                        tool_choice="required", temperature=0.5, seed=2,
                                        max_tokens=300, logit_bias=quiet) as s:
        events = [e.type for e in s]
        final = s.get_final_completion()
    assert "tool_calls.function.arguments.done" in events
    assert isinstance(final.choices[0].message.tool_calls[0].function.parsed_arguments,
                      GetWeather)


def test_tools_together_with_response_format(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": {
        "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"], "additionalProperties": False}}}
    seen = set()
    for seed in range(6):
        r = client.chat.completions.create(model=MODEL, messages=user("Is it warm in Oslo?"),
                                           tools=[WEATHER], response_format=fmt,
                                           temperature=1.0, seed=seed, max_tokens=300)
        m = r.choices[0].message
        if m.tool_calls:
            check_calls(m)
            assert m.content is None
            seen.add("call")
        else:
            assert json.loads(m.content)["answer"] in ("yes", "no")
            seen.add("answer")
    assert seen  # either way each output followed its schema


# ---- multi-turn ----------------------------------------------------------------------------------


def test_multi_turn_history_renders_calls_and_results(client, engine):
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function",
             "function": {"name": "get_weather",
                          "arguments": '{"location": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "12 degrees, sunny"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER],
                                       max_tokens=5)
    text = engine.tokenizer.decode(engine.requests[r.id][0], skip_special_tokens=False)
    assert '"name": "get_weather"' in text  # the tool's signature in the system prompt
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"location": "Oslo", '
            '"unit": "celsius"}}\n</tool_call>') in text
    assert "<tool_response>\n12 degrees, sunny\n</tool_response>" in text
    assert text.index("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"loc") < \
        text.index("<tool_response>\n12")
