"""``OutputBuilder``: Chat Completions chunks (API.md section 2) -> Responses output items
and events (section 4), on hand-written chunk sequences with text, parallel tool calls
with fragmented arguments, held-back logprobs, truncation and cancellation; plus the
Responses <-> chat conversions of ``responses_items``."""

from __future__ import annotations

import copy

from openmini.serving.responses_items import (
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    items_to_messages,
    remap_param,
)
from openmini.serving.responses_output import OutputBuilder
from openmini.serving.responses_run import ResponseRun
from test_responses_api import check_response_events

USAGE = {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42,
         "prompt_tokens_details": {"cached_tokens": 16, "audio_tokens": 0}}


def chunk(delta=None, finish=None, logprobs=None, usage=None, choices=True):
    c = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "usage": usage,
         "choices": []}
    if choices:
        c["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish,
                         "logprobs": logprobs}]
    return c


def run_builder(chunks, end="finish"):
    """Events of a run fed with ``chunks``: created, in_progress, ..., terminal."""
    resp = {"id": "resp_test", "object": "response", "status": "in_progress", "output": [],
            "usage": None, "incomplete_details": None}
    run = ResponseRun(resp, background=False)
    queue = run.subscribe()
    run.emit_response("response.created")
    run.emit_response("response.in_progress")
    builder = OutputBuilder(resp, run.emit)
    for c in chunks:
        builder.feed(c)
    if end == "finish":
        builder.finish()
        run.emit_response("response.completed" if resp["status"] == "completed"
                          else "response.incomplete")
    else:
        builder.abandon("failed")
        run.emit_response("response.failed")
    run.finish()
    events = []
    while (e := queue.get_nowait()) is not None:
        events.append(e)
    return events, resp


def call_delta(index, cid=None, name=None, args=""):
    tc = {"index": index, "function": {"arguments": args}}
    if cid:
        tc.update(id=cid, type="function")
        tc["function"]["name"] = name
    return {"tool_calls": [tc]}


def test_text_then_parallel_tool_calls():
    events, resp = run_builder([
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Let me "}), chunk({"content": "check."}),
        chunk(call_delta(0, "call_a", "get_weather")),
        chunk(call_delta(0, args='{"location": ')), chunk(call_delta(0, args='"Oslo"}')),
        chunk(call_delta(1, "call_b", "get_time", '{"tz": "CET"}')),
        chunk({}, finish="tool_calls"), chunk(usage=USAGE, choices=False)])
    final = check_response_events(events)
    assert final == resp and resp["status"] == "completed"
    msg, a, b = resp["output"]
    assert msg["content"][0]["text"] == "Let me check." and msg["status"] == "completed"
    assert (a["call_id"], a["name"], a["arguments"]) == ("call_a", "get_weather",
                                                        '{"location": "Oslo"}')
    assert (b["call_id"], b["name"], b["arguments"]) == ("call_b", "get_time", '{"tz": "CET"}')
    assert a["id"].startswith("fc_") and a["id"] != b["id"]
    assert resp["usage"] == {"input_tokens": 30,
                             "input_tokens_details": {"cached_tokens": 16,
                                                      "cache_write_tokens": 0},
                             "output_tokens": 12, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": 42}
    kinds = [e["type"] for e in events]
    assert kinds.count("response.output_item.added") == 3
    assert kinds.count("response.function_call_arguments.delta") == 3


def test_length_marks_the_last_item_incomplete():
    events, resp = run_builder([chunk({"content": "abc"}), chunk({}, finish="length"),
                                chunk(usage=USAGE, choices=False)])
    check_response_events(events)
    assert events[-1]["type"] == "response.incomplete"
    assert resp["status"] == "incomplete"
    assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["output"][0]["status"] == "incomplete"


def test_empty_generation_still_has_a_message():
    events, resp = run_builder([chunk({"role": "assistant", "content": ""}),
                                chunk({}, finish="stop"), chunk(usage=USAGE, choices=False)])
    check_response_events(events)
    assert [o["type"] for o in resp["output"]] == ["message"]
    assert resp["output"][0]["content"][0]["text"] == ""


def test_failure_closes_the_open_item():
    events, resp = run_builder([chunk({"content": "par"})], end="fail")
    check_response_events(events)
    assert resp["status"] == "failed" and resp["output"][0]["status"] == "incomplete"


def test_logprobs_of_held_back_tokens_join_the_next_delta():
    lp = [{"token": f"t{i}", "logprob": -0.5 * i, "bytes": [65 + i],
           "top_logprobs": [{"token": "x", "logprob": -3.0, "bytes": [120]}]} for i in range(3)]
    events, resp = run_builder([
        chunk({"content": ""}, logprobs={"content": lp[:1], "refusal": None}),
        chunk({"content": "ab"}, logprobs={"content": lp[1:2], "refusal": None}),
        chunk({"content": ""}, logprobs={"content": lp[2:], "refusal": None}),
        chunk({}, finish="stop"), chunk(usage=USAGE, choices=False)])
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert len(deltas) == 1 and [x["token"] for x in deltas[0]["logprobs"]] == ["t0", "t1"]
    assert deltas[0]["logprobs"][0]["top_logprobs"] == [{"token": "x", "logprob": -3.0}]
    part = resp["output"][0]["content"][0]
    assert part["logprobs"] == lp  # the full chat entries, trailing token included
    done = [e for e in events if e["type"] == "response.output_text.done"][0]
    assert [x["token"] for x in done["logprobs"]] == ["t0", "t1", "t2"]


def test_items_to_chat_messages():
    items = [
        {"type": "message", "role": "developer",
         "content": [{"type": "input_text", "text": "rules"}]},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "content": [
            {"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2", "output": "two"},
        {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"},
    ]
    before = copy.deepcopy(items)
    assert items_to_messages(items) == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "c2", "type": "function",
             "function": {"name": "g", "arguments": "{\"x\": 1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
    ]
    assert items == before


def test_tool_and_format_shapes():
    flat = [{"type": "function", "name": "f", "description": None,
             "parameters": {"type": "object"}, "strict": True}]
    assert chat_tools(flat) == [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object"}, "strict": True}}]
    assert chat_tools([]) is None
    assert chat_tool_choice({"type": "function", "name": "f"}, True) == \
        {"type": "function", "function": {"name": "f"}}
    assert chat_tool_choice("required", True) == "required"
    assert chat_tool_choice("auto", False) is None
    assert chat_response_format({"type": "text"}) is None
    assert chat_response_format({"type": "json_object"}) == {"type": "json_object"}
    assert chat_response_format({"type": "json_schema", "name": "n", "schema": {"a": 1},
                                 "strict": True}) == {
        "type": "json_schema", "json_schema": {"name": "n", "schema": {"a": 1}, "strict": True}}
    assert remap_param("messages[3].content") == "input"
    assert remap_param("tools[1].function.parameters") == "tools[1].parameters"
    assert remap_param("tool_choice.function.name") == "tool_choice.name"
    assert remap_param("response_format.json_schema.schema") == "text.format.schema"
    assert remap_param("max_tokens") == "max_output_tokens"
    assert remap_param("temperature") == "temperature" and remap_param(None) is None
