"""Responses API on the real default model (SmolLM2-135M-Instruct GGUF) over real HTTP:
a three-turn conversation through previous_response_id that needs turn 1 to answer
(checked at the prompt-token level too), C18 with a model-made function call, and
``responses.parse`` with a Pydantic model.

Marked ``real_model`` (set OPENMINI_SKIP_REAL_MODEL=1 to skip). Greedy decoding, short
outputs: a 135M model on two shared CPU cores writes a few tokens per second.
"""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from server_utils import running_engine
from test_responses_api import EndingEngine, check_response_events, read_response_sse

pytestmark = pytest.mark.real_model

CLIENT_TIMEOUT = 600
MODEL = "smollm2-135m-instruct"
WEATHER_TOOL = {
    "type": "function", "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"location": {"type": "string"}},
                   "required": ["location"], "additionalProperties": False},
    "strict": True,
}


@pytest.fixture(scope="module")
def engine(smollm2_gguf):
    with running_engine(smollm2_gguf, max_model_len=2048, kv_cache_memory=128 << 20) as eng:
        yield EndingEngine(eng, eos_bias=None)  # records prompts; sampling unchanged


def test_three_turn_conversation_recalls_turn_one(client, engine):
    kw = dict(model="gpt-4.1-mini", temperature=0, max_output_tokens=20)
    r1 = client.responses.create(input="The secret word is banana.", **kw)
    p1 = engine.last()["prompt_ids"]
    r2 = client.responses.create(input="What is the secret word?",
                                 previous_response_id=r1.id, **kw)
    rec2 = engine.last()
    r3 = client.responses.create(input="Say the secret word once more.",
                                 previous_response_id=r2.id, **kw)
    rec3 = engine.last()
    assert "banana" in r2.output_text.lower(), r2.output_text
    assert "banana" in r3.output_text.lower(), r3.output_text
    # the earlier turns are literally in the prompts, token for token
    assert rec2["prompt_ids"][:len(p1)] == p1
    assert rec3["prompt_ids"][:len(rec2["prompt_ids"])] == rec2["prompt_ids"]
    assert rec3["prompt_ids"] == list(engine.chat_template.render_ids([
        {"role": "user", "content": "The secret word is banana."},
        {"role": "assistant", "content": r1.output_text},
        {"role": "user", "content": "What is the secret word?"},
        {"role": "assistant", "content": r2.output_text},
        {"role": "user", "content": "Say the secret word once more."}]))
    # the prefix cache serves the earlier turns
    assert r2.usage.input_tokens_details.cached_tokens >= (len(p1) // 16) * 16 > 0
    assert r3.usage.input_tokens_details.cached_tokens >= \
        (len(rec2["prompt_ids"]) // 16) * 16
    # without the chain the model does not know the word
    alone = client.responses.create(input="What is the secret word?", **kw)
    assert "banana" not in alone.output_text.lower()


def test_c18_function_call_then_its_output(client, http, engine):
    kw = dict(model=MODEL, temperature=0, tools=[WEATHER_TOOL])
    r1 = client.responses.create(input="What's the weather in Oslo?", tool_choice="required",
                                 max_output_tokens=60, **kw)
    calls = [o for o in r1.output if o.type == "function_call"]
    assert calls, r1.output
    fc = calls[0]
    assert fc.id.startswith("fc_") and fc.call_id.startswith("call_")
    assert fc.name == "get_weather" and fc.status == "completed"
    assert json.loads(fc.arguments) == {"location": "Oslo"}
    assert r1.status == "completed" and r1.tool_choice == "required"
    # the same request streamed: function-call events, same call
    events = read_response_sse(http, {"input": "What's the weather in Oslo?",
                                      "tool_choice": "required", "max_output_tokens": 60,
                                      **kw})
    final = check_response_events(events)
    kinds = [e["type"] for e in events]
    assert "response.function_call_arguments.delta" in kinds
    assert "response.function_call_arguments.done" in kinds
    streamed = [o for o in final["output"] if o["type"] == "function_call"]
    assert [(c["name"], c["arguments"]) for c in streamed] == \
        [(c.name, c.arguments) for c in calls]
    # turn 2: only the tool output; the rest comes from the stored chain
    r2 = client.responses.create(
        previous_response_id=r1.id, max_output_tokens=40,
        input=[{"type": "function_call_output", "call_id": fc.call_id,
                "output": "Sunny, 21 C"}], **kw)
    assert r2.status in ("completed", "incomplete") and r2.output
    text = engine.last()["prompt_text"]
    assert "What's the weather in Oslo?" in text and "Sunny, 21 C" in text
    assert "get_weather" in text and "Oslo" in text[text.index("What's the weather"):]
    items = list(client.responses.input_items.list(r2.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "function_call_output"]
    assert items[1].id == fc.id and items[2].call_id == fc.call_id
    assert r2.usage.input_tokens_details.cached_tokens > 0


class Secret(BaseModel):
    word: str


def test_parse_with_pydantic_text_format(client):
    parsed = client.responses.parse(
        model=MODEL, temperature=0, max_output_tokens=40, text_format=Secret,
        input="The secret word is banana. Reply in JSON with the secret word.")
    assert parsed.status == "completed"
    assert isinstance(parsed.output_parsed, Secret)
    assert parsed.output_parsed.word.lower() == "banana"
    assert parsed.text.format.type == "json_schema" and parsed.text.format.strict is True
