"""Budget-aware closing (``openmini.structured.closing``): a constrained output ends validly
within ``max_tokens`` whatever the model prefers.

The "models" here are adversaries over the tiny tokenizer's vocabulary: at every step they
pick, among the tokens the matcher allows, the one that keeps the output open longest
(digits forever, a string that never closes, one more array item, random non-closing
tokens) and they never pick end-of-sequence. Without closing none of them would ever
finish; with a budget every output must end ("stop") within ``max_tokens`` and validate
with ``jsonschema``. When the budget cannot hold even the shortest valid output, nothing is
forced and the output is cut off (``length``) as before.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from openmini import LLM, SamplingParams
from openmini.sampling_params import JsonSchemaConstraint, StructuredOutputSpec, ToolCallConstraint
from openmini.structured.closing import (
    ClosingVocab,
    JsonLexState,
    plan_completion,
)
from test_structured_grammar import backend, tok  # noqa: F401 - shared module fixtures

S = {"type": "string"}


def obj(props, required=None, **kw):
    return {"type": "object", "properties": props,
            "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


TREE = {"$defs": {"node": obj({"name": S, "children": {"type": "array",
                                                       "items": {"$ref": "#/$defs/node"}}})},
        "$ref": "#/$defs/node"}

# name -> (schema, max_tokens): every schema leaves strings, numbers or arrays unbounded
SCHEMAS = {
    "int_root": ({"type": "integer"}, 8),
    "number_root": ({"type": "number", "exclusiveMinimum": 0}, 8),
    "string_root": (S, 8),
    "array_root": ({"type": "array", "items": S}, 12),
    "flat": (obj({"name": S, "age": {"type": "integer", "minimum": 1}, "ok": {"type": "boolean"},
                  "score": {"type": "number"}}), 40),
    "lists": (obj({"tags": {"type": "array", "items": S},
                   "grid": {"type": "array", "items": {"type": "array", "items": {
                       "type": "integer"}}, "minItems": 2}}), 48),
    "nested": (obj({"a": obj({"b": obj({"c": {"type": "array", "items": obj({"d": S})},
                                        "e": S})}), "f": {"type": "integer"}}), 64),
    "recursive": (TREE, 40),
    "free_object": ({"type": "object"}, 16),
    "dict": ({"type": "object", "additionalProperties": {"type": "array", "items": S},
              "minProperties": 0}, 24),
    "nullable": (obj({"x": {"anyOf": [{"type": "null"}, S]},
                      "y": {"type": ["integer", "null"]}}), 32),
    "any_of": ({"anyOf": [obj({"kind": {"const": "circle"}, "r": {"type": "number"}}),
                          obj({"kind": {"const": "square"}, "side": {"type": "integer"}})]}, 40),
    "patterns": (obj({"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]+$"},
                      "word": {"type": "string", "minLength": 3},
                      "ab": {"type": "string", "pattern": "^a+b$"}}), 64),
    "formats": (obj({"d": {"type": "string", "format": "date"},
                     "dt": {"type": "string", "format": "date-time"},
                     "email": {"type": "string", "format": "email"},
                     "id": {"type": "string", "format": "uuid"},
                     "ip": {"type": "string", "format": "ipv4"}}), 160),
    "enum_const": (obj({"c": {"enum": ["red", "green"]}, "v": {"const": 2},
                        "notes": {"type": "array", "items": S, "minItems": 1}}), 48),
}


@pytest.fixture(scope="module")
def texts(tok) -> list[str]:
    return [tok.decode([i]) for i in range(tok.vocab_size)]


def _adversary(kind: str, texts: list[str], eos: set[int], rng: random.Random):
    """A token picker that avoids closing: never EOS, never a quote or closing bracket
    when anything else is allowed; ``kind`` says what it prefers among the rest."""

    def score(t: int) -> tuple:
        if t in eos:
            return (-3,)
        s = texts[t]
        closes = any(ch in s for ch in '"]}')
        if kind == "digits":
            pref = s.strip().isdigit()
        elif kind == "string":
            pref = s.replace(" ", "").isalpha()
        elif kind == "array":
            pref = any(ch in s for ch in ",[{")
        else:  # random
            pref = rng.random() < 0.5
        return (-1 if closes else 0, pref, len(s), -t)

    def pick(allowed: list[int]) -> int:
        return max(allowed, key=score)

    return pick


def _generate(backend, tok, spec, max_tokens, pick):
    """Drive a budgeted matcher with ``pick``: (text, how it ended, matcher). How it ended:
    "stop" (the model ended), "closed" (the budget forced a valid closing; the engine
    reports it as finish_reason "length") or "length" (cut off)."""
    m = backend.new_matcher(spec, max_tokens=max_tokens)
    eos = set(tok.eos_token_ids)
    ids: list[int] = []
    for _ in range(max_tokens):
        mask = m.allowed_token_mask()
        allowed = mask[:tok.vocab_size].nonzero().squeeze(1).tolist()
        assert allowed, "a live grammar always allows some token"
        t = pick(allowed)
        assert m.accept_token(t), "the mask allowed a token the grammar rejected"
        ended = "closed" if m.closed_by_budget else "stop"
        if t in eos:
            return tok.decode(ids), ended, m
        ids.append(t)
        if m.is_terminated():
            return tok.decode(ids), ended, m
    return tok.decode(ids), "length", m


@pytest.mark.parametrize("kind", ["digits", "string", "array", "random"])
@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_adversarial_model_still_ends_with_a_valid_output(backend, tok, texts, name, kind):
    schema, max_tokens = SCHEMAS[name]
    spec = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(schema)))
    pick = _adversary(kind, texts, set(tok.eos_token_ids), random.Random(name + kind))
    text, reason, m = _generate(backend, tok, spec, max_tokens, pick)
    assert reason in ("stop", "closed"), f"cut off: {text!r}"
    jsonschema.validate(json.loads(text), schema)
    assert m.closer.num_accepted <= max_tokens


@pytest.mark.parametrize("max_tokens", [72, 128])  # the tiny vocabulary needs ~63 at least
def test_adversarial_tool_calls_end_with_valid_calls(backend, tok, texts, max_tokens):
    from openmini.serving.tool_parsers import parse_tool_calls
    weather = obj({"location": S, "days": {"type": "integer", "minimum": 1},
                   "unit": {"enum": ["c", "f"]}})
    note = obj({"text": S, "tags": {"type": "array", "items": S}})
    tools = (ToolCallConstraint("get_weather", JsonSchemaConstraint(json.dumps(weather))),
             ToolCallConstraint("add_note", JsonSchemaConstraint(json.dumps(note))))
    schemas = {"get_weather": weather, "add_note": note}
    for spec in (StructuredOutputSpec(tools=tools, allow_answer=False),            # required
                 StructuredOutputSpec(tools=tools[1:], allow_answer=False,
                                      max_tool_calls=1)):                         # named
        for kind in ("string", "digits", "array"):
            pick = _adversary(kind, texts, set(tok.eos_token_ids), random.Random(kind))
            text, reason, _ = _generate(backend, tok, spec, max_tokens, pick)
            assert reason in ("stop", "closed"), f"cut off: {text!r}"
            parsed, _ = parse_tool_calls(text, stop_at_repeated_call=False)
            assert parsed.content is None and parsed.tool_calls, text
            for call in parsed.tool_calls:
                jsonschema.validate(json.loads(call.arguments), schemas[call.name])


def test_budget_too_small_for_any_valid_output_forces_nothing(backend, tok, texts):
    schema = obj({"first_name": S, "last_name": S, "age": {"type": "integer"}})
    spec = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(schema)))
    pick = _adversary("string", texts, set(tok.eos_token_ids), random.Random(0))
    text, reason, m = _generate(backend, tok, spec, 6, pick)
    assert reason == "length"
    assert not m.closer.closing
    with pytest.raises(ValueError):
        json.loads(text)


def test_free_text_is_cut_not_ended(backend, tok, texts):
    """A free-text answer (tools in auto mode) is never ended early by the closer: cutting
    text is a ``length`` finish, not a ``stop``."""
    tool = ToolCallConstraint("f", JsonSchemaConstraint(json.dumps(obj({"x": S}))))
    spec = StructuredOutputSpec(tools=(tool,))
    letters = [t for t in range(len(texts)) if texts[t].strip().isalpha()]
    text, reason, _ = _generate(backend, tok, spec, 12, lambda allowed: letters[0])
    assert reason == "length"


def test_a_call_started_in_auto_mode_is_closed(backend, tok, texts):
    tool = ToolCallConstraint("f", JsonSchemaConstraint(json.dumps(obj({"x": S}))))
    spec = StructuredOutputSpec(tools=(tool,))
    prefix = tok.encode('Sure. <tool_call>\n{"name": "f", "arguments": {"x": "')
    state = {"i": 0}
    fill = _adversary("string", texts, set(tok.eos_token_ids), random.Random(1))

    def pick(allowed):
        if state["i"] < len(prefix):
            state["i"] += 1
            return prefix[state["i"] - 1]
        return fill(allowed)

    text, reason, _ = _generate(backend, tok, spec, len(prefix) + 24, pick)
    assert reason == "closed", text
    from openmini.serving.tool_parsers import parse_tool_calls
    parsed, _ = parse_tool_calls(text)
    assert [c.name for c in parsed.tool_calls] == ["f"]


def test_plan_is_short_and_valid(backend, tok):
    schema = obj({"s": S, "n": {"type": "integer"}, "t": {"type": "array", "items": S,
                                                         "minItems": 2}})
    spec = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(schema)))
    m = backend.new_matcher(spec)
    prefix = '{"s": "hello wor'
    for t in tok.encode(prefix):
        assert m.accept_token(t)
    lex = JsonLexState()
    lex.feed(prefix.encode())
    ll = backend.ll_tokenizer()
    plan = plan_completion(m._matcher, lex, backend._closing_vocab, ll, 100)
    text = prefix + ll.decode_str(plan)
    assert json.loads(text) == {"s": "hello wor", "n": 0, "t": ["", ""]}
    assert m.allowed_token_mask()[tok.encode("x")[0]]  # the matcher itself did not move
    assert plan_completion(m._matcher, lex, backend._closing_vocab, ll, 3) is None


def test_json_lex_state_tracks_strings_escapes_and_markers():
    lex = JsonLexState(reset_after=b"<tool_call>")
    lex.feed(b'{"a": "x\\"y')
    assert lex.in_string
    lex.feed(b'\\\\"')
    assert not lex.in_string
    lex.feed(b'free " text <tool_')  # an odd quote in free text
    assert lex.in_string
    lex.feed(b'call>\n{"k": "v')  # the marker restarts JSON
    assert lex.in_string
    lex.feed(b'"')
    assert not lex.in_string


def test_closing_vocab_maps_single_bytes():
    vocab = ClosingVocab.from_token_bytes([b"ab", b"{", b"\"", b"{"], {3}, 9, 40)
    assert vocab.byte_tokens[ord("{")] == 1 and vocab.byte_tokens[ord('"')] == 2
    assert vocab.byte_tokens[ord("a")] == -1 and vocab.mask_words == 2


# ---- in the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama.hf_dir), dtype="float32", kv_cache_memory=32 << 20)


def _shortest(llm, spec) -> int:
    """Tokens of the closing plan at the start of the output (the least budget that the
    closer can complete)."""
    backend = llm.engine.structured
    m = backend.new_matcher(spec)
    plan = plan_completion(m._matcher, JsonLexState(), backend._closing_vocab,
                           backend.ll_tokenizer(), 1000)
    return len(plan)


def test_engine_closes_a_model_that_loves_digits(llm):
    """The random model with every digit token at +100: strings and numbers never end by
    themselves, yet each output is closed validly inside max_tokens (finish_reason
    "length": cut short by the budget, not ended by the model), down to a budget of exactly
    the shortest output."""
    tok = llm.get_tokenizer()
    digits = {i: 100.0 for i in range(tok.vocab_size) if tok.decode([i]).strip().isdigit()}
    schema = obj({"name": S, "n": {"type": "integer"}, "xs": {"type": "array",
                                                             "items": {"type": "number"}}})
    spec = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(schema)))
    least = _shortest(llm, spec)
    for max_tokens in (least, least + 5, least + 40):
        outs = llm.generate(["a", "b"], SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=3, n=2, logit_bias=digits,
            structured_output=spec))
        for out in outs:
            for c in out.outputs:
                assert c.finish_reason == "length", c.text
                assert len(c.token_ids) <= max_tokens
                jsonschema.validate(json.loads(c.text), schema)


def test_engine_reports_length_when_no_valid_output_fits(llm):
    """max_tokens below the shortest valid output: cut off, ``length``, as OpenAI does."""
    tok = llm.get_tokenizer()
    letters = {i: 100.0 for i in range(tok.vocab_size) if tok.decode([i]).strip().isalpha()}
    schema = obj({"first_name": S, "last_name": S})
    spec = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(schema)))
    least = _shortest(llm, spec)
    out = llm.generate(["a"], SamplingParams(max_tokens=least - 1, temperature=0,
                                             logit_bias=letters,
                                             structured_output=spec))[0].outputs[0]
    assert out.finish_reason == "length"
    assert len(out.token_ids) == least - 1
    with pytest.raises(ValueError):
        json.loads(out.text)


def _follow(script: list[int]):
    """A model that writes ``script`` while the mask allows it; once off script (being
    closed), the first allowed token from then on."""
    state = {"i": 0}

    def pick(allowed):
        i = state["i"]
        state["i"] += 1
        if i < len(script) and script[i] in allowed:
            return script[i]
        state["i"] = len(script)
        return allowed[0]
    return pick


def test_one_more_item_is_accounted_for(backend, tok):
    """An array of objects with required fields: the comma that starts one more item
    lengthens the plan by a whole object. A model that writes item after item (and would
    never close the array) must still be closed in time, at every budget."""
    item = obj({"name": S, "number": {"type": "integer"}, "position": {"enum": ["GK", "FW"]}})
    schema = obj({"team": S, "players": {"type": "array", "items": item}})
    spec = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(schema)))
    script = tok.encode('{"team": "A", "players": [' + ", ".join(
        '{"name": "Li", "number": %d, "position": "GK"}' % i for i in range(60)))

    for max_tokens in range(60, 200, 3):
        text, reason, _ = _generate(backend, tok, spec, max_tokens, _follow(script))
        assert reason in ("stop", "closed"), f"{max_tokens}: {text!r}"
        jsonschema.validate(json.loads(text), schema)


def test_dates_are_real_dates(backend, tok, texts):
    """Closing fills a ``date`` as 1111-11-11 (year 0000 is not a date for Python)."""
    import datetime
    schema = obj({"when": {"type": "string", "format": "date"}})
    spec = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(schema)))
    pick = _adversary("string", texts, set(tok.eos_token_ids), random.Random(3))
    text, reason, _ = _generate(backend, tok, spec, 30, pick)
    assert reason == "closed"
    datetime.date.fromisoformat(json.loads(text)["when"])


def test_model_that_keeps_calling_tools_is_ended_between_calls(backend, tok):
    """Required mode, a model that writes call after call: a complete output is checked
    at once (not on the plan's schedule), so a further call starts only when it can
    finish; every output ends with only complete, valid calls (closed by the budget, so
    reported as "length")."""
    from openmini.serving.tool_parsers import parse_tool_calls
    rem = obj({"text": S, "minutes": {"type": "integer", "minimum": 1}})
    lights = obj({"room": S, "on": {"type": "boolean"}})
    spec = StructuredOutputSpec(allow_answer=False, tools=(
        ToolCallConstraint("set_reminder", JsonSchemaConstraint(json.dumps(rem))),
        ToolCallConstraint("set_lights", JsonSchemaConstraint(json.dumps(lights)))))
    call = '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'
    script = tok.encode("\n".join(
        [call % ("set_reminder", '{"text": "Laundry out", "minutes": 45}'),
         call % ("set_lights", '{"room": "K", "on": true}')] * 6))
    schemas = {"set_reminder": rem, "set_lights": lights}
    for max_tokens in range(70, 400, 11):
        text, reason, _ = _generate(backend, tok, spec, max_tokens, _follow(script))
        assert reason in ("stop", "closed"), f"{max_tokens}: {text!r}"
        parsed, _ = parse_tool_calls(text, stop_at_repeated_call=False)
        assert parsed.tool_calls
        for c in parsed.tool_calls:
            jsonschema.validate(json.loads(c.arguments), schemas[c.name])
