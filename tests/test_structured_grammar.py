"""Structured outputs at the grammar level (no model): fail-closed schema checks, the grammar
of each tool mode, and brute-force validity.

Brute force: random walks through a compiled grammar over the tiny tokenizer's whole
vocabulary (any allowed token, chosen at random, then steered to an end), for many schemas
($ref/$defs with recursion, enum, const, anyOf, nullable, additionalProperties false,
required, nested arrays/objects, string formats). Every walk that ends must be valid for the
schema (``jsonschema`` is the reference); every token the mask allows must be accepted and
no other must be. This is what "the grammar guarantees a valid output" means for any model.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import random
import re
import uuid
from typing import Literal, Optional

import jsonschema
import pytest
from pydantic import BaseModel

from openmini.sampling_params import JsonSchemaConstraint, StructuredOutputSpec, ToolCallConstraint
from openmini.structured import StructuredOutputError, check_json_schema, check_tool, spec_to_lark
from openmini.structured.llguidance_backend import LLGuidanceBackend
from openmini.tokenizer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama) -> Tokenizer:
    return Tokenizer.from_hf_dir(tiny_llama.hf_dir)


@pytest.fixture(scope="module")
def backend(tok) -> LLGuidanceBackend:
    # logits wider than the vocabulary, like Qwen's padded LM head
    return LLGuidanceBackend(tok, tok.vocab_size + 37, tok.eos_token_ids)


def c(schema, strict=True) -> JsonSchemaConstraint:
    return JsonSchemaConstraint(json.dumps(schema), strict)


# ---- fail closed -------------------------------------------------------------------------------

UNSUPPORTED_IN_STRICT = [
    {"not": {"type": "string"}},
    {"if": {"type": "string"}, "then": {"minLength": 2}},
    {"type": "array", "uniqueItems": True},
    {"type": "array", "contains": {"type": "integer"}},
    {"type": "object", "propertyNames": {"pattern": "^a"}},
    {"type": "object", "dependentRequired": {"a": ["b"]}},
    {"type": "object", "unevaluatedProperties": False},
    {"type": "string", "format": "uri-reference"},
    {"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]},
]
UNSUPPORTED_ALWAYS = [
    {"type": "string", "pattern": "(?<=a)b"},  # look-behind
    {"type": "string", "pattern": "(a)\\1"},  # back-reference
    {"$ref": "#/$defs/missing"},
    {"$ref": "https://example.com/schema.json"},
    {"type": "integer", "minimum": 5, "maximum": 2},
    {"allOf": [{"type": "string"}, {"type": "integer"}]},
]


@pytest.mark.parametrize("schema", UNSUPPORTED_IN_STRICT + UNSUPPORTED_ALWAYS)
def test_strict_schema_the_engine_cannot_enforce_is_rejected(schema):
    with pytest.raises(StructuredOutputError) as e:
        check_json_schema(c(schema))
    assert str(e.value) and "\n" not in str(e.value) and "%llguidance" not in str(e.value)
    # the same schema as a strict function's parameters
    with pytest.raises(StructuredOutputError):
        check_tool(ToolCallConstraint("f", c({"type": "object", "properties": {"a": schema},
                                              "required": ["a"]})))


@pytest.mark.parametrize("schema", UNSUPPORTED_IN_STRICT)
def test_non_strict_ignores_unknown_keywords_but_still_guides(schema):
    check_json_schema(c(schema, strict=False))


@pytest.mark.parametrize("schema", UNSUPPORTED_ALWAYS)
def test_non_strict_still_fails_on_what_it_cannot_compile(schema):
    with pytest.raises(StructuredOutputError):
        check_json_schema(c(schema, strict=False))


def test_boolean_and_malformed_schemas():
    check_json_schema(JsonSchemaConstraint("true"))
    for text in ("false", "[1]", "not json", '"x"'):
        with pytest.raises(StructuredOutputError):
            check_json_schema(JsonSchemaConstraint(text))


def test_client_x_guidance_cannot_turn_strict_off():
    schema = {"x-guidance": {"lenient": True}, "not": {}}
    with pytest.raises(StructuredOutputError):
        check_json_schema(c(schema))


# ---- brute force: every finished walk validates ------------------------------------------------


class Step(BaseModel):
    explanation: str
    output: str


class Reasoning(BaseModel):
    steps: list[Step]
    final_answer: str
    confidence: Optional[float] = None
    kind: Literal["math", "logic"]


def _strictify(schema: dict) -> dict:
    """What the openai SDK's ``parse()`` sends: additionalProperties false, all required."""
    if isinstance(schema, dict):
        schema = {k: _strictify(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema:
            schema["additionalProperties"] = False
            schema["required"] = list(schema["properties"])
    elif isinstance(schema, list):
        schema = [_strictify(v) for v in schema]
    return schema


TREE = {"$defs": {"node": {"type": "object", "properties": {
    "value": {"type": "integer", "minimum": -5, "maximum": 5},
    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2}},
    "required": ["value", "children"], "additionalProperties": False}},
    "$ref": "#/$defs/node"}

SCHEMAS = {
    "object": {"type": "object"},
    "any": {},
    "flat": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                              "age": {"type": "integer", "minimum": 0},
                                              "ok": {"type": "boolean"}},
             "required": ["name", "age", "ok"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {"a": {"type": "integer"},
                                                  "b": {"type": "string", "maxLength": 4}},
                 "required": ["a"], "additionalProperties": False},
    "enum_const": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]}, "version": {"const": 2},
        "mixed": {"enum": [1, "one", None, True]}},
        "required": ["color", "version", "mixed"], "additionalProperties": False},
    "nullable": {"type": "object", "properties": {
        "a": {"type": ["string", "null"], "maxLength": 5},
        "b": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
        "required": ["a", "b"], "additionalProperties": False},
    "any_of": {"anyOf": [{"type": "object", "properties": {"kind": {"const": "circle"},
                                                           "r": {"type": "number"}},
                          "required": ["kind", "r"], "additionalProperties": False},
                         {"type": "object", "properties": {"kind": {"const": "square"},
                                                           "side": {"type": "integer"}},
                          "required": ["kind", "side"], "additionalProperties": False}]},
    "nested": {"type": "object", "properties": {
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"},
                                              "maxItems": 3}, "minItems": 1, "maxItems": 3},
        "meta": {"type": "object", "properties": {"tags": {"type": "array", "items": {
            "type": "string", "maxLength": 3}, "maxItems": 2}},
            "required": ["tags"], "additionalProperties": False}},
        "required": ["matrix", "meta"], "additionalProperties": False},
    "recursive": TREE,
    "bounds": {"type": "object", "properties": {
        "pct": {"type": "number", "minimum": 0, "maximum": 1},
        "n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "word": {"type": "string", "minLength": 2, "maxLength": 4}},
        "required": ["pct", "n", "code", "word"], "additionalProperties": False},
    "formats": {"type": "object", "properties": {
        "d": {"type": "string", "format": "date"},
        "dt": {"type": "string", "format": "date-time"},
        "t": {"type": "string", "format": "time"},
        "email": {"type": "string", "format": "email"},
        "id": {"type": "string", "format": "uuid"},
        "ip": {"type": "string", "format": "ipv4"}},
        "required": ["d", "dt", "t", "email", "id", "ip"], "additionalProperties": False},
    "tuple": {"type": "array", "prefixItems": [{"type": "string", "maxLength": 3},
                                               {"type": "integer"}], "items": False},
    "all_of": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}},
                          "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "boolean"}},
                          "required": ["b"]}]},
    "pydantic_strict": _strictify(Reasoning.model_json_schema()),
    "array_root": {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 2,
                   "maxItems": 4},
    "string_root": {"type": "string", "maxLength": 10},
}

_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
"""RFC 3339 section 5.6 ``date-time`` (jsonschema checks it only with an extra package)."""
_TIME = re.compile(r"^\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
"""RFC 3339 ``full-time`` (leap second 60 and lower-case z allowed, unlike jsonschema's
default checker)."""


def _validate(instance, schema) -> None:
    """jsonschema (Draft 2020-12) with format checks (``date-time`` added)."""
    checker = jsonschema.FormatChecker()
    checker.checks("date-time")(lambda s: not isinstance(s, str) or bool(_DATE_TIME.match(s)))
    checker.checks("time")(lambda s: not isinstance(s, str) or bool(_TIME.match(s)))
    jsonschema.Draft202012Validator(schema, format_checker=checker).validate(instance)


_CLOSERS = ('"', "@", "]", "}")
"""Steering order: end a string, finish an e-mail address, close an array, an object."""


def _walk(backend, tok, spec, rng: random.Random, free_steps: int, max_steps: int = 400):
    """Random tokens for ``free_steps``, then steer to an end (EOS, else mostly the first
    allowed kind of `_CLOSERS`, else a random one-character token). Returns (text, ended)
    and checks mask/accept agreement on the way."""
    m = backend.new_matcher(spec)
    V = tok.vocab_size
    eos = set(tok.eos_token_ids)
    ids: list[int] = []
    for step in range(max_steps):
        mask = m.allowed_token_mask()
        assert not mask[V:].any(), "tokens past the vocabulary must never be allowed"
        allowed = mask[:V].nonzero().squeeze(1).tolist()
        assert allowed, "a live grammar always allows some token"
        if step >= free_steps:
            if eos & set(allowed):
                return tok.decode(ids), True
            texts = {t: tok.decode([t]) for t in allowed if t not in eos}
            pool = []
            for closer in _CLOSERS:  # the first kind of closing character that is allowed
                pool = [t for t, s in texts.items() if s.strip() == closer]
                if pool:
                    break
            if not pool or rng.random() < 0.2:
                pool = [t for t, s in texts.items() if len(s) == 1] or list(texts)
        else:
            pool = allowed
        t = rng.choice(pool)
        if step == 0 and len(allowed) < V:  # a disallowed token is rejected
            bad = next(i for i in range(V) if not mask[i])
            probe = backend.new_matcher(spec)
            assert not probe.accept_token(bad)
        assert m.accept_token(t), f"the mask allowed {t} but the grammar rejected it"
        if t in eos:
            return tok.decode(ids), True
        ids.append(t)
        if m.is_terminated():
            return tok.decode(ids), True
    return tok.decode(ids), False


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_random_walks_always_validate(backend, tok, name):
    schema = SCHEMAS[name]
    spec = StructuredOutputSpec(answer=c(schema))
    rng = random.Random(name)
    ended = 0
    for walk in range(12):
        text, done = _walk(backend, tok, spec, rng, free_steps=rng.randint(0, 40))
        if not done:
            continue
        ended += 1
        value = json.loads(text)  # exactly one JSON value, nothing around it
        _validate(value, schema)
    assert ended >= 9, f"only {ended}/12 walks ended"


def test_format_values_are_real(backend, tok):
    """Formats jsonschema does not check by default are checked here by parsing."""
    spec = StructuredOutputSpec(answer=c(SCHEMAS["formats"]))
    rng = random.Random(5)
    for _ in range(4):
        text, done = _walk(backend, tok, spec, rng, free_steps=60)
        assert done
        v = json.loads(text)
        datetime.date.fromisoformat(v["d"])
        assert _DATE_TIME.match(v["dt"]), v["dt"]
        uuid.UUID(v["id"])
        ipaddress.IPv4Address(v["ip"])
        assert "@" in v["email"]


def test_compile_cache_and_independent_matchers(backend):
    spec = StructuredOutputSpec(answer=c({"type": "object", "properties": {
        "k": {"type": "integer"}}, "required": ["k"]}))
    before = backend.num_cached
    a, b = backend.new_matcher(spec), backend.new_matcher(spec)
    assert backend.num_cached == before + 1  # compiled once
    assert backend.compile(spec) is backend.compile(spec)
    tok_open = backend.tokenizer.encode("{")[0]
    assert a.accept_token(tok_open)
    # b did not move: it still rejects what a now allows
    assert a.allowed_token_mask().tolist() != b.allowed_token_mask().tolist()


# ---- tool-call grammars ------------------------------------------------------------------------

WEATHER = ToolCallConstraint("get_weather", c({
    "type": "object", "properties": {"location": {"type": "string"},
                                     "unit": {"$ref": "#/$defs/unit"}},
    "required": ["location", "unit"], "additionalProperties": False,
    "$defs": {"unit": {"enum": ["c", "f"]}}}))
CLOCK = ToolCallConstraint("get_time", c({"type": "object", "properties": {}}, strict=False))

CALL_W = '<tool_call>\n{"name": "get_weather", "arguments": {"location": "Oslo", "unit": "c"}}' \
         '\n</tool_call>'
CALL_T = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


def _feed(backend, tok, spec, text):
    """Drive a matcher with the plain-text tokens of ``text``: (accepted all, matcher)."""
    m = backend.new_matcher(spec)
    for t in tok.encode(text):
        if not m.allowed_token_mask()[t]:
            return False, m
        assert m.accept_token(t)
    return True, m


@pytest.mark.parametrize("spec_kw,text,ok,terminated", [
    # auto: free text, text then calls, or calls; a marker forces a valid call
    ({}, "Just an answer.", True, False),
    ({}, "Let me check.\n" + CALL_W, True, False),
    ({}, CALL_W + "\n" + CALL_T, True, False),
    ({}, "text <tool_call>\n{\"name\": \"nope\"", False, None),
    ({}, CALL_W + " trailing text", False, None),
    # required: calls only; one call when parallel_tool_calls is false
    ({"allow_answer": False}, "Hello", False, None),
    ({"allow_answer": False}, CALL_W + "\n" + CALL_T, True, False),
    ({"allow_answer": False, "max_tool_calls": 1}, CALL_W, True, True),
    ({"allow_answer": False, "max_tool_calls": 1}, CALL_W + "\n", False, None),
    ({"allow_answer": False, "max_tool_calls": 2}, CALL_W + "\n" + CALL_T, True, True),
    # named: only that function
    ({"allow_answer": False, "max_tool_calls": 1, "tools": (CLOCK,)}, CALL_W, False, None),
    ({"allow_answer": False, "max_tool_calls": 1, "tools": (CLOCK,)}, CALL_T, True, True),
    # tools + response_format: the answer follows its schema, a call its tool's schema
    ({"answer": c({"type": "object", "properties": {"a": {"type": "integer"}},
                   "required": ["a"], "additionalProperties": False})}, '{"a": 1}', True, True),
    ({"answer": c({"type": "object", "properties": {"a": {"type": "integer"}},
                   "required": ["a"], "additionalProperties": False})}, '{"b": 1}', False, None),
    ({"answer": c({"type": "object"})}, CALL_W, True, False),
    ({"answer": c({"type": "object"})}, "free text", False, None),
    # bare calls (Qwen2.5-Coder): free text may not start with "{"
    ({"allow_bare_call": True}, '{"name": "get_time", "arguments": {}}', True, True),
    ({"allow_bare_call": True}, '{"status": "ok"}', False, None),
    ({"allow_bare_call": True}, "An answer with {braces}.", True, False),
])
def test_tool_grammar_modes(backend, tok, spec_kw, text, ok, terminated):
    kw = {"tools": (WEATHER, CLOCK), **spec_kw}
    spec = StructuredOutputSpec(**kw)
    accepted, m = _feed(backend, tok, spec, text)
    assert accepted == ok, spec_to_lark(spec)
    if ok:
        assert m.is_accepting()
        assert m.is_terminated() == terminated
        eos = min(tok.eos_token_ids)
        assert bool(m.allowed_token_mask()[eos])  # a complete output may end


def test_random_walks_through_tool_calls_parse_and_validate(backend, tok):
    """Required mode with parallel calls: every ended walk is a list of valid calls."""
    from openmini.serving.tool_parsers import parse_tool_calls
    spec = StructuredOutputSpec(tools=(WEATHER, CLOCK), allow_answer=False, max_tool_calls=3)
    schemas = {"get_weather": json.loads(WEATHER.parameters.schema),
               "get_time": json.loads(CLOCK.parameters.schema)}
    rng = random.Random(3)
    ended = 0
    for _ in range(10):
        text, done = _walk(backend, tok, spec, rng, free_steps=rng.randint(0, 60))
        if not done:
            continue
        ended += 1
        parsed, _ = parse_tool_calls(text, stop_at_repeated_call=False)
        assert parsed.content is None and 1 <= len(parsed.tool_calls) <= 3, text
        for call in parsed.tool_calls:
            _validate(json.loads(call.arguments), schemas[call.name])
    assert ended >= 8


def test_spec_validation():
    with pytest.raises(ValueError):
        StructuredOutputSpec(allow_answer=False)
    with pytest.raises(ValueError):
        StructuredOutputSpec(tools=(WEATHER,), call_begin="\n<tool_call>")
    with pytest.raises(ValueError):
        StructuredOutputSpec(tools=(WEATHER,), max_tool_calls=0)
    # hashable: it is the compile-cache key
    assert hash(StructuredOutputSpec(tools=(WEATHER,))) == hash(
        StructuredOutputSpec(tools=(WEATHER,)))
