"""Request validation and error bodies (API.md sections 1 and 3) over real HTTP.

Runs against a live uvicorn server with the deterministic ``FakeEngine`` (validation does
not depend on the model). Every error must be an OpenAI error object with all four keys,
the right status / ``code`` / ``param``, and an ``x-request-id`` header; nothing a client
sends may produce a 5xx.
"""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest
from pydantic import BaseModel, ConfigDict

from fake_engine import FakeEngine
from server_utils import ServerThread

MSG = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def server():
    with ServerThread(FakeEngine(max_model_len=2048)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                         _strict_response_validation=True)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def body(**kw):
    return {"model": "test-model", "messages": MSG, "max_tokens": 8, **kw}


def assert_error(resp: httpx.Response, status: int, code, param) -> dict:
    """Check an error response's shape, status, code and param; return the error object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.headers["x-request-id"].startswith("req_")
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code, err
    assert err["param"] == param, err
    assert isinstance(err["message"], str) and err["message"]
    return err


# ---- bodies that are not JSON objects --------------------------------------------------------


@pytest.mark.parametrize("raw", [b"{bad json", b"", b"[]", b'"text"', b"42", b"null",
                                 b'{"model": NaN}', b'{"temperature": Infinity}',
                                 b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000])
def test_non_object_bodies_are_400(http, raw):
    resp = http.post("/chat/completions", content=raw,
                     headers={"content-type": "application/json"})
    assert_error(resp, 400, resp.json()["error"]["code"], None)
    assert resp.json()["error"]["type"] == "invalid_request_error"


# ---- schema errors: param is the JSON path, code is OpenAI's --------------------------------


@pytest.mark.parametrize("payload,code,param", [
    ({"messages": MSG}, "missing_required_parameter", "model"),
    ({"model": "test-model"}, "missing_required_parameter", "messages"),
    (body(messages=[]), "empty_array", "messages"),
    (body(messages="hi"), "invalid_type", "messages"),
    (body(messages=[{"content": "x"}]), "missing_required_parameter", "messages[0].role"),
    (body(messages=[{"role": "wizard", "content": "x"}]), "invalid_value", "messages[0].role"),
    (body(messages=[MSG[0], {"role": "user"}]), "missing_required_parameter",
     "messages[1].content"),
    (body(messages=[MSG[0], {"role": "user", "content": 5}]), "invalid_type",
     "messages[1].content"),
    (body(messages=[{"role": "user", "content": []}]), "empty_array", "messages[0].content"),
    (body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
     "missing_required_parameter", "messages[0].content[0].text"),
    (body(messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {}}]}]),
     "invalid_value", "messages[0].content[0].type"),
    (body(messages=[{"role": "user", "content": "x", "extra": 1}]), "unknown_parameter",
     "messages[0].extra"),
    (body(messages=[{"role": "tool", "content": "x"}]), "missing_required_parameter",
     "messages[0].tool_call_id"),
    (body(messages=[{"role": "assistant"}]), "missing_required_parameter",
     "messages[0].content"),
    (body(foo=1), "unknown_parameter", "foo"),
    (body(top_k=5), "unknown_parameter", "top_k"),
    (body(temperature="hot"), "invalid_type", "temperature"),
    (body(temperature=True), "invalid_type", "temperature"),
    (body(temperature=2.5), "decimal_above_max_value", "temperature"),
    (body(temperature=-1), "decimal_below_min_value", "temperature"),
    (body(temperature=1e308), "decimal_above_max_value", "temperature"),
    (body(top_p=1.5), "decimal_above_max_value", "top_p"),
    (body(presence_penalty=-3), "decimal_below_min_value", "presence_penalty"),
    (body(frequency_penalty=9), "decimal_above_max_value", "frequency_penalty"),
    (body(n=0), "integer_below_min_value", "n"),
    (body(n=129), "integer_above_max_value", "n"),
    (body(n=1.5), "invalid_type", "n"),
    (body(max_tokens=0), "integer_below_min_value", "max_tokens"),
    (body(max_tokens=10**30), "integer_above_max_value", "max_tokens"),
    (body(max_completion_tokens=-5), "integer_below_min_value", "max_completion_tokens"),
    (body(max_tokens="10"), "invalid_type", "max_tokens"),
    (body(seed=10**30), "integer_above_max_value", "seed"),
    (body(seed="7"), "invalid_type", "seed"),
    (body(stop=["a", "b", "c", "d", "e"]), "array_above_max_length", "stop"),
    (body(stop=[1]), "invalid_type", "stop[0]"),
    (body(stop=7), "invalid_type", "stop"),
    (body(logit_bias={"abc": 1}), "invalid_value", "logit_bias"),
    (body(logit_bias={"5": 101}), "decimal_above_max_value", "logit_bias.5"),
    (body(logit_bias={"99999999": 1}), "invalid_value", "logit_bias"),
    (body(logit_bias=[1]), "invalid_type", "logit_bias"),
    (body(logprobs="yes"), "invalid_type", "logprobs"),
    (body(top_logprobs=3), "invalid_value", "top_logprobs"),
    (body(logprobs=True, top_logprobs=21), "integer_above_max_value", "top_logprobs"),
    (body(stream="yes"), "invalid_type", "stream"),
    (body(stream_options={"include_usage": True}), "invalid_value", "stream_options"),
    (body(stream=True, stream_options={"bogus": True}), "unknown_parameter",
     "stream_options.bogus"),
    (body(metadata={str(i): "v" for i in range(17)}), "object_above_max_properties",
     "metadata"),
    (body(metadata={"k": 1}), "invalid_type", "metadata.k"),
    (body(service_tier="gold"), "invalid_value", "service_tier"),
    (body(user=5), "invalid_type", "user"),
    (body(store="no"), "invalid_type", "store"),
    (body(modalities=["text", "audio"]), "unsupported_value", "modalities[1]"),
    (body(audio={"voice": "alloy", "format": "wav"}), "unsupported_parameter", "audio"),
    (body(reasoning_effort="low"), "unsupported_parameter", "reasoning_effort"),
    (body(web_search_options={}), "unsupported_parameter", "web_search_options"),
    (body(functions=[{"name": "f"}]), "unsupported_parameter", "functions"),
    (body(tools=[{"type": "function", "function": {"name": "f g"}}]), "invalid_value",
     "tools[0].function.name"),
    (body(tools=[{"type": "custom", "function": {"name": "f"}}]), "invalid_value",
     "tools[0].type"),
    (body(tools=[{"type": "function", "function": {"name": "f", "x": 1}}]),
     "unknown_parameter", "tools[0].function.x"),
    (body(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "string"}}}]), "invalid_function_parameters", "tools[0].function.parameters"),
    (body(tools=[{"type": "function", "function": {"name": "f", "strict": True,
                                                   "parameters": {"type": "object", "not": {}}}}]),
     "invalid_function_parameters", "tools[0].function.parameters"),
    (body(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice={
        "type": "function", "function": {"name": "g"}}), "invalid_value",
     "tool_choice.function.name"),
    (body(tool_choice="auto"), "invalid_value", "tool_choice"),
    (body(response_format={"type": "json_object"}), "invalid_value", "messages"),
    (body(response_format={"type": "json_schema"}), "missing_required_parameter",
     "response_format.json_schema"),
    (body(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "strict": True, "schema": {"type": "string", "pattern": "(?<=a)b"}}}),
     "invalid_json_schema", "response_format.json_schema.schema"),
    (body(response_format={"type": "yaml"}), "invalid_value", "response_format.type"),
    (body(prediction={"type": "content"}), "missing_required_parameter",
     "prediction.content"),
])
def test_schema_errors(http, payload, code, param):
    err = assert_error(http.post("/chat/completions", json=payload), 400, code, param)
    assert err["type"] == "invalid_request_error"
    # the message names the offending parameter
    assert param.split(".")[0].split("[")[0] in err["message"] or param in err["message"] \
        or code in ("unsupported_parameter", "unsupported_value")


@pytest.mark.parametrize("part,index", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}, 1),
    ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}, 1),
    ({"type": "file", "file": {"file_id": "file-abc"}}, 1),
])
def test_non_text_parts_name_the_part(client, part, index):
    """C11 on a text-only model: 400 naming messages[0].content[1]."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="test-model", messages=[{
            "role": "user", "content": [{"type": "text", "text": "Describe this"}, part]}])
    assert e.value.status_code == 400
    assert e.value.param == f"messages[0].content[{index}]"
    assert e.value.code == "unsupported_value"


def test_sdk_error_classes_and_fields(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="test-model", messages=MSG, extra_body={"bogus": 1})
    assert (e.value.code, e.value.param, e.value.type) == (
        "unknown_parameter", "bogus", "invalid_request_error")
    assert e.value.response.headers["x-request-id"].startswith("req_")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-5-ultra", messages=MSG)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-5-ultra")
    assert e.value.code == "model_not_found"


def test_accepted_parameters(client):
    """store, metadata, user, service_tier, safety_identifier, prompt_cache_key, prediction,
    text response_format, developer role and max_completion_tokens are accepted."""
    r = client.chat.completions.create(
        model="gpt-4.1-mini", max_completion_tokens=4, store=True, metadata={"k": "v"},
        user="u-1", service_tier="auto", safety_identifier="sid", prompt_cache_key="pck",
        prediction={"type": "content", "content": "Hello there"},
        response_format={"type": "text"}, modalities=["text"], parallel_tool_calls=None,
        tool_choice="none", seed=1, temperature=0.5, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=-0.5, logit_bias={"65": 5},
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi"}], "name": "ann"}])
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 4


def test_context_length_exceeded(http, server):
    window = server.engine.max_model_len
    big = [{"role": "user", "content": "x" * (3 * window)}]
    for stream in (False, True):
        resp = http.post("/chat/completions", json=body(messages=big, stream=stream))
        err = assert_error(resp, 400, "context_length_exceeded", "messages")
        assert str(window) in err["message"]
    # prompt fits, prompt + max_tokens does not: the message gives both counts
    fits = [{"role": "user", "content": "x" * (window // 2)}]
    err = assert_error(http.post("/chat/completions",
                                 json=body(messages=fits, max_tokens=window)),
                       400, "context_length_exceeded", "messages")
    assert "in the completion" in err["message"]


def test_unknown_route_and_method(http):
    resp = http.get("/does-not-exist")
    assert_error(resp, 404, None, None)
    resp = http.get("/chat/completions")
    assert_error(resp, 405, None, None)


def test_random_garbage_never_500(http):
    """Mutated valid bodies: every response is a 200 or an OpenAI 4xx error, never a 5xx."""
    rng = random.Random(0)
    values = [None, True, False, 0, -1, 2**70, -2**70, 1.5, 1e300, -1e300, "", "x" * 300,
              [], [1, "a"], {}, {"type": "text"}, [{"role": "user"}], "\u0000\ud7ff"]
    keys = ["model", "messages", "temperature", "top_p", "n", "stop", "max_tokens", "seed",
            "logit_bias", "logprobs", "top_logprobs", "stream", "stream_options", "metadata",
            "response_format", "tools", "tool_choice", "prediction", "user", "modalities",
            "messages.0.content", "messages.0.role", "messages.0.name"]
    for _ in range(150):
        b = json.loads(json.dumps(body(max_tokens=3)))
        for _ in range(rng.randint(1, 3)):
            key, val = rng.choice(keys), rng.choice(values)
            if key.startswith("messages.0."):
                if isinstance(b.get("messages"), list) and b["messages"] and \
                        isinstance(b["messages"][0], dict):
                    b["messages"][0][key.split(".")[-1]] = val
            else:
                b[key] = val
        resp = http.post("/chat/completions", json=b)
        assert resp.status_code < 500, (b, resp.text)
        if resp.status_code != 200:
            assert set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_legacy_completions_errors(http):
    ok = {"model": "test-model", "prompt": "Hi", "max_tokens": 2}
    cases = [
        ({**ok, "prompt": None}, "missing_required_parameter", "prompt"),
        ({**ok, "prompt": []}, "empty_array", "prompt"),
        ({**ok, "prompt": [[1, 2], "x"]}, "invalid_type", "prompt[1]"),
        ({**ok, "prompt": [1, -2]}, "integer_below_min_value", "prompt[1]"),
        ({**ok, "prompt": [1, "a"]}, "invalid_type", "prompt[0]"),
        ({**ok, "prompt": [[1, -2]]}, "integer_below_min_value", "prompt[0][1]"),
        ({**ok, "prompt": [[5, 99999]]}, "invalid_value", "prompt"),
        ({**ok, "logprobs": 6}, "integer_above_max_value", "logprobs"),
        ({**ok, "suffix": "x"}, "unsupported_parameter", "suffix"),
        ({**ok, "messages": MSG}, "unknown_parameter", "messages"),
        ({**ok, "best_of": 3}, "unsupported_value", "best_of"),
    ]
    for payload, code, param in cases:
        assert_error(http.post("/completions", json=payload), 400, code, param)


class Probe(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int


async def probe(body: Probe) -> dict:
    return {"count": body.count}


def test_fastapi_validation_errors_become_openai_400s():
    """Routes declared with pydantic bodies (as later endpoints may be) never answer 422."""
    def add_probe(app):
        app.add_api_route("/v1/probe", probe, methods=["POST"])

    with ServerThread(FakeEngine(), configure=add_probe) as srv, httpx.Client() as http:
        url = srv.base_url + "/probe"
        assert http.post(url, json={"count": 3}).json() == {"count": 3}
        assert_error(http.post(url, json={}), 400, "missing_required_parameter", "count")
        assert_error(http.post(url, json={"count": 1, "x": 2}), 400, "unknown_parameter", "x")
        assert_error(http.post(url, json={"count": "many"}), 400, "invalid_value", "count")
