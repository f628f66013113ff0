"""Responses API (shared/API.md section 4; cases C15, C18) on the real engine with the tiny
random llama, over real HTTP with the official ``openai`` client (strict response
validation) and raw SSE via httpx.

The tiny model writes gibberish and, left alone, never ends an answer; ``EndingEngine``
adds a logit bias of +4 to its EOS token so greedy answers end after 10-40 tokens
(deterministically), unless the prompt contains ``NOEND`` (EOS banned: long generations
for cancel and disconnect tests); a prompt containing ``FAILNOW`` makes the engine stream
fail after its first output. Each test compares the server with itself (stream vs
non-stream, Responses vs Chat Completions on the same conversation) or with values known
independently (the prompt token ids the engine received, the chat template's rendering).
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import httpx
import openai
import pytest

from openmini.api import ServerSettings, create_app
from openmini.store import SQLiteResponseStore
from server_utils import running_engine

MODEL = "tiny"
MAX_MODEL_LEN = 1024
EOS_BIAS = 4.0
NOEND = "NOEND"
FAIL = "FAILNOW"
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


class EndingEngine:
    """An ``EngineClient`` proxy that records each request (prompt ids, decoded prompt,
    params, final output) and biases EOS by ``eos_bias`` (see the module docstring; None
    leaves sampling unchanged)."""

    def __init__(self, inner, eos_bias: float | None = EOS_BIAS):
        self.inner = inner
        self.eos_bias = eos_bias
        self.chat_template = inner.chat_template
        self.requests: dict[str, dict[str, Any]] = {}
        self.order: list[str] = []

    model_config = property(lambda self: self.inner.model_config)
    tokenizer = property(lambda self: self.inner.tokenizer)
    max_model_len = property(lambda self: self.inner.max_model_len)
    is_running = property(lambda self: self.inner.is_running)

    def generate(self, prompt_token_ids, sampling_params, request_id, prompt=None):
        text = self.tokenizer.decode(list(prompt_token_ids), skip_special_tokens=False)
        bias = -100.0 if NOEND in text else self.eos_bias
        params = sampling_params
        if bias is not None:
            eos = set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids or ())
            lb = dict(sampling_params.logit_bias)
            for i in eos:
                lb.setdefault(i, bias)
            params = dataclasses.replace(sampling_params, logit_bias=lb)
        rec = {"prompt_ids": list(prompt_token_ids), "prompt_text": text, "params": params,
               "last": None}
        self.requests[request_id] = rec
        self.order.append(request_id)
        return self._record(self.inner.generate(prompt_token_ids, params, request_id, prompt),
                            rec)

    @staticmethod
    async def _record(gen, rec):
        async for out in gen:
            rec["last"] = out
            yield out
            if FAIL in rec["prompt_text"]:
                raise RuntimeError("simulated engine failure")

    def abort(self, request_id):
        self.inner.abort(request_id)

    def stats(self):
        return self.inner.stats()

    def last(self) -> dict[str, Any]:
        return self.requests[self.order[-1]]


@pytest.fixture(scope="module")
def engine(tiny_llama):
    with running_engine(tiny_llama.hf_dir, max_model_len=MAX_MODEL_LEN, num_blocks=512) as eng:
        yield EndingEngine(eng)


def wait_until(cond, timeout: float = 60.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def wait_idle(engine, timeout: float = 30.0) -> None:
    """The engine has no running or waiting request (aborted requests freed)."""
    wait_until(lambda: engine.stats().num_running == 0 and engine.stats().num_waiting == 0,
               timeout, "the engine to become idle")


# ---- raw SSE -------------------------------------------------------------------------------


def parse_response_sse(raw: str) -> list[dict[str, Any]]:
    """Events of a Responses stream, checking the framing: ``event: <type>`` then
    ``data: <json>`` whose ``type`` matches, blank line after each, no ``[DONE]``."""
    blocks = raw.split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    events = []
    for block in blocks[:-1]:
        lines = block.split("\n")
        assert len(lines) == 2, block[:200]
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), block[:200]
        assert "[DONE]" not in lines[1]
        event = json.loads(lines[1][len("data: "):])
        assert event["type"] == lines[0][len("event: "):]
        events.append(event)
    return events


def read_response_sse(http: httpx.Client, payload: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", "/responses", json={**payload, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode("utf-8")
    return parse_response_sse(raw)


def check_response_events(events: list[dict[str, Any]], background: bool = False
                          ) -> dict[str, Any]:
    """Assert the event grammar of API.md section 4; return the terminal response.

    created (+ in_progress) first; sequence numbers 0, 1, 2, ...; per output item
    ``output_item.added`` ... ``output_item.done`` with the text / argument events between,
    consistent ids and indices, ``logprobs: []`` on text deltas; a terminal event last whose
    output equals the items of the ``output_item.done`` events and whose text equals the
    joined deltas.
    """
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[0]["type"] == "response.created"
    rid = events[0]["response"]["id"]
    assert rid.startswith("resp_")
    assert events[0]["response"]["status"] == ("queued" if background else "in_progress")
    assert events[1]["type"] == "response.in_progress"
    assert events[-1]["type"] in TERMINAL
    assert sum(e["type"] in TERMINAL for e in events) == 1
    done_items: dict[int, dict[str, Any]] = {}
    open_items: dict[int, dict[str, Any]] = {}
    texts: dict[int, str] = {}
    for e in events[2:-1]:
        t = e["type"]
        if t == "response.output_item.added":
            idx = e["output_index"]
            assert idx == len(done_items) + len(open_items) and not open_items
            item = e["item"]
            assert item["status"] == "in_progress"
            if item["type"] == "message":
                assert item["id"].startswith("msg_") and item["content"] == []
            else:
                assert item["type"] == "function_call" and item["arguments"] == ""
                assert item["id"].startswith("fc_") and item["call_id"]
            open_items[idx] = item
            texts[idx] = ""
        elif t in ("response.content_part.added", "response.output_text.delta",
                   "response.output_text.done", "response.content_part.done",
                   "response.function_call_arguments.delta",
                   "response.function_call_arguments.done"):
            idx = e["output_index"]
            assert idx in open_items and e["item_id"] == open_items[idx]["id"]
            if t == "response.output_text.delta":
                assert e["logprobs"] == [] and e["content_index"] == 0
                texts[idx] += e["delta"]
            elif t == "response.function_call_arguments.delta":
                texts[idx] += e["delta"]
            elif t == "response.output_text.done":
                assert e["text"] == texts[idx]
            elif t == "response.function_call_arguments.done":
                assert e["arguments"] == texts[idx]
        elif t == "response.output_item.done":
            idx = e["output_index"]
            item = open_items.pop(idx)
            assert e["item"]["id"] == item["id"]
            done_items[idx] = e["item"]
        else:
            raise AssertionError(f"unexpected event {t}")
    assert not open_items
    final = events[-1]["response"]
    assert final["id"] == rid
    assert final["output"] == [done_items[i] for i in range(len(done_items))]
    for i, item in done_items.items():
        if item["type"] == "message":
            assert item["content"][0]["text"] == texts[i]
        else:
            assert item["arguments"] == texts[i]
    return final


def output_text(resp: dict[str, Any]) -> str:
    return "".join(c["text"] for o in resp["output"] if o["type"] == "message"
                   for c in o["content"] if c["type"] == "output_text")


# ---- C15: create, usage, stream ----------------------------------------------------------


def test_c15_create_usage_and_same_text_as_chat(client, engine):
    r = client.responses.create(model=MODEL, input="Say hi", temperature=0,
                                max_output_tokens=200)
    rec = engine.last()
    assert r.id.startswith("resp_") and r.object == "response" and r.status == "completed"
    assert r.model == MODEL and r.store is True and r.previous_response_id is None
    assert r.completed_at is not None and r.error is None and r.incomplete_details is None
    assert len(r.output) == 1 and r.output[0].type == "message"
    msg = r.output[0]
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.status == "completed"
    assert msg.content[0].type == "output_text" and msg.content[0].annotations == []
    # C15: usage counts what the engine really did
    u = r.usage
    assert u.input_tokens == len(rec["prompt_ids"])
    assert u.output_tokens == len(rec["last"].outputs[0].token_ids) > 0
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens == rec["last"].num_cached_tokens
    assert u.input_tokens_details.cache_write_tokens == 0
    assert u.output_tokens_details.reasoning_tokens == 0
    # the same conversation through Chat Completions: same prompt ids, same text
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=200,
                                          messages=[{"role": "user", "content": "Say hi"}])
    assert engine.last()["prompt_ids"] == rec["prompt_ids"]
    assert chat.choices[0].message.content == r.output_text
    assert chat.usage.prompt_tokens == u.input_tokens
    assert chat.usage.completion_tokens == u.output_tokens


def test_c15_stream_events_equal_non_stream(client, http):
    payload = {"model": MODEL, "input": "Say hi", "temperature": 0, "max_output_tokens": 200}
    full = client.responses.create(**payload)
    events = read_response_sse(http, payload)
    final = check_response_events(events)
    assert events[-1]["type"] == "response.completed" and final["status"] == "completed"
    assert output_text(final) == full.output_text
    u = final["usage"]
    assert u["input_tokens"] == full.usage.input_tokens
    assert u["output_tokens"] == full.usage.output_tokens
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"]
    assert isinstance(u["input_tokens_details"]["cached_tokens"], int)
    # the prompt was just computed by the non-streamed request: the prefix cache serves it
    assert u["input_tokens_details"]["cached_tokens"] > 0
    # the streamed response was stored exactly as it was sent
    assert http.get(f"/responses/{final['id']}").json() == final


def test_sdk_stream_helper_get_final_response(client):
    kw = dict(model=MODEL, input="Hello", temperature=0, max_output_tokens=200)
    with client.responses.stream(**kw) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.output_text.delta" in kinds
    assert final.status == "completed"
    assert final.output_text == client.responses.create(**kw).output_text
    assert client.responses.retrieve(final.id).output_text == final.output_text


def test_retrieve_is_identical_and_delete(client, http):
    created = http.post("/responses", json={
        "model": MODEL, "input": "Who are you?", "temperature": 0, "max_output_tokens": 200,
        "metadata": {"k": "v"}, "user": "u-1", "instructions": "Be brief."})
    assert created.status_code == 200
    assert http.get(f"/responses/{created.json()['id']}").json() == created.json()
    r = client.responses.create(model=MODEL, input="Who are you?", temperature=0,
                                max_output_tokens=200, metadata={"k": "v"}, user="u-1",
                                instructions="Be brief.")
    got = client.responses.retrieve(r.id)
    assert got == r and got.metadata == {"k": "v"} and got.instructions == "Be brief."
    deleted = http.delete(f"/responses/{r.id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list(r.id)


def test_store_false_is_not_retrievable(client):
    r = client.responses.create(model=MODEL, input="Say hi", temperature=0, store=False,
                                max_output_tokens=200)
    assert r.status == "completed" and r.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input="more", previous_response_id=r.id)
    assert e.value.code == "previous_response_not_found"


def test_max_output_tokens_gives_incomplete(client, http, engine):
    payload = {"model": MODEL, "input": f"{NOEND} Hello", "temperature": 0,
               "max_output_tokens": 16}
    r = client.responses.create(**payload)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 16 == len(engine.last()["last"].outputs[0].token_ids)
    assert r.output[0].status == "incomplete"
    events = read_response_sse(http, payload)
    final = check_response_events(events)
    assert events[-1]["type"] == "response.incomplete"
    assert final["status"] == "incomplete" and output_text(final) == r.output_text
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}


# ---- conversation state: previous_response_id, input items --------------------------------


def test_previous_response_chain_prefix_and_cached_tokens(client, engine):
    r1 = client.responses.create(model=MODEL, input="My favorite color is blue. Remember it.",
                                 temperature=0, max_output_tokens=200)
    p1 = engine.last()["prompt_ids"]
    r2 = client.responses.create(model=MODEL, input="What is my favorite color?",
                                 previous_response_id=r1.id, temperature=0,
                                 max_output_tokens=200)
    rec2 = engine.last()
    assert r2.previous_response_id == r1.id
    # the whole first turn is literally in the second prompt, token for token
    assert rec2["prompt_ids"][:len(p1)] == p1 and len(rec2["prompt_ids"]) > len(p1)
    expected = engine.chat_template.render_ids(
        [{"role": "user", "content": "My favorite color is blue. Remember it."},
         {"role": "assistant", "content": r1.output_text},
         {"role": "user", "content": "What is my favorite color?"}])
    assert rec2["prompt_ids"] == list(expected)
    # the prefix cache served (at least) the full blocks of the first prompt
    cached = r2.usage.input_tokens_details.cached_tokens
    assert cached == rec2["last"].num_cached_tokens
    assert cached >= (len(p1) // 16) * 16 > 0
    # a third turn carries both earlier turns
    r3 = client.responses.create(model=MODEL, input="Thanks", previous_response_id=r2.id,
                                 temperature=0, max_output_tokens=200)
    text3 = engine.last()["prompt_text"]
    assert "favorite color is blue" in text3 and r2.output_text in text3
    assert r1.output_text in text3 and text3.count("What is my favorite color?") == 1
    assert r3.usage.input_tokens_details.cached_tokens > cached


def test_instructions_are_not_carried_over(client, engine):
    r1 = client.responses.create(model=MODEL, input="hi", instructions="ZEBRA rules apply.",
                                 temperature=0, max_output_tokens=200)
    assert "ZEBRA rules apply." in engine.last()["prompt_text"]
    r2 = client.responses.create(model=MODEL, input="ok", previous_response_id=r1.id,
                                 temperature=0, max_output_tokens=200)
    assert "ZEBRA" not in engine.last()["prompt_text"] and r2.instructions is None
    client.responses.create(model=MODEL, input="ok", previous_response_id=r1.id,
                            instructions="OKAPI mode.", temperature=0, max_output_tokens=200)
    text = engine.last()["prompt_text"]
    assert "OKAPI mode." in text and "ZEBRA" not in text
    assert [i.type for i in client.responses.input_items.list(r2.id, order="asc")] == \
        ["message", "message", "message"]


def test_input_items_paging(client, http):
    r1 = client.responses.create(model=MODEL, temperature=0, max_output_tokens=200, input=[
        {"role": "developer", "content": "dev note"},
        {"role": "user", "content": [{"type": "input_text", "text": "part one"},
                                     {"type": "input_text", "text": "part two"}]},
        {"type": "message", "role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "question"}])
    r2 = client.responses.create(model=MODEL, input="follow-up", previous_response_id=r1.id,
                                 temperature=0, max_output_tokens=200)
    everything = list(client.responses.input_items.list(r2.id, limit=2))  # pages to the end
    asc = list(client.responses.input_items.list(r2.id, limit=3, order="asc"))
    assert [i.id for i in everything] == [i.id for i in reversed(asc)]
    assert len(asc) == 6 and len({i.id for i in asc}) == 6
    assert [(i.type, i.role) for i in asc] == [
        ("message", "developer"), ("message", "user"), ("message", "assistant"),
        ("message", "user"), ("message", "assistant"), ("message", "user")]
    assert asc[1].content[0].text == "part one" and asc[1].content[1].text == "part two"
    assert asc[2].content[0].type == "output_text"
    assert asc[4].id == r1.output[0].id and asc[4].content[0].text == r1.output_text
    assert asc[5].content[0].text == "follow-up"
    assert all(i.id.startswith("msg_") for i in asc)
    # raw pages: has_more, first_id, last_id, after
    page = http.get(f"/responses/{r2.id}/input_items", params={"limit": 4}).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [d["id"] for d in page["data"]] == [i.id for i in everything[:4]]
    assert page["first_id"] == everything[0].id and page["last_id"] == everything[3].id
    rest = http.get(f"/responses/{r2.id}/input_items",
                    params={"limit": 4, "after": page["last_id"]}).json()
    assert [d["id"] for d in rest["data"]] == [i.id for i in everything[4:]]
    assert rest["has_more"] is False
    # the first response's own items are what it saw
    assert [i.id for i in client.responses.input_items.list(r1.id, order="asc")] == \
        [i.id for i in asc[:4]]
    for params, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"),
                          ({"order": "up"}, "order"), ({"after": "msg_nope"}, "after"),
                          ({"foo": "1"}, "foo")):
        resp = http.get(f"/responses/{r2.id}/input_items", params=params)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param, params


def test_c18_function_call_items_rebuild_the_conversation(client, engine):
    """C18 at the rebuild level: a stored function_call item, then its output through
    previous_response_id (the model-made call is tested with the real model)."""
    call = {"type": "function_call", "call_id": "call_weather1", "name": "get_weather",
            "arguments": json.dumps({"location": "Oslo"})}
    r1 = client.responses.create(model=MODEL, temperature=0, max_output_tokens=200,
                                 input=[{"role": "user", "content": "What's the weather in Oslo?"},
                                        call])
    r2 = client.responses.create(model=MODEL, temperature=0, max_output_tokens=200,
                                 previous_response_id=r1.id, input=[
                                     {"type": "function_call_output",
                                      "call_id": "call_weather1", "output": "sunny, 21 C"}])
    text = engine.last()["prompt_text"]
    assert "What's the weather in Oslo?" in text and "sunny, 21 C" in text
    assert text.index("What's the weather in Oslo?") < text.index("sunny, 21 C")
    items = list(client.responses.input_items.list(r2.id, order="asc"))
    assert [i.type for i in items] == ["message", "function_call", "message",
                                       "function_call_output"]
    fc, out = items[1], items[3]
    assert fc.id.startswith("fc_") and fc.call_id == "call_weather1"
    assert fc.name == "get_weather" and json.loads(fc.arguments) == {"location": "Oslo"}
    assert out.call_id == "call_weather1" and out.output == "sunny, 21 C"
    # an item reference resolves to the stored item; repeating an item already in the
    # chain is refused like OpenAI does
    client.responses.create(model=MODEL, temperature=0, max_output_tokens=200, input=[
        {"type": "item_reference", "id": items[0].id}, {"type": "item_reference", "id": fc.id},
        {"type": "function_call_output", "call_id": "call_weather1", "output": "rainy"}])
    assert "What's the weather in Oslo?" in engine.last()["prompt_text"]
    assert "rainy" in engine.last()["prompt_text"]
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, previous_response_id=r2.id,
                                input=[{"type": "item_reference", "id": fc.id}])
    assert e.value.param == "input[0]"
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"type": "item_reference", "id": "fc_x"}])
    assert e.value.param == "input[0].id"
    # unknown previous response (C18)
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=MODEL, input=[{"type": "function_call_output",
                                                     "call_id": "call_weather1",
                                                     "output": "x"}],
                                previous_response_id="resp_doesnotexist")
    assert e.value.status_code == 400 and e.value.code == "previous_response_not_found"
    assert e.value.param == "previous_response_id"


def test_truncation(client, engine):
    words = " ".join(f"w{i}" for i in range(100))  # a few hundred tokens per message
    r, turns = None, 0
    while True:  # grow the conversation until it no longer fits (truncation disabled)
        try:
            r = client.responses.create(model=MODEL, input=f"OLD{turns} {words}",
                                        temperature=0, max_output_tokens=16,
                                        previous_response_id=r.id if r else None)
        except openai.BadRequestError as exc:
            e = exc
            break
        turns += 1
    assert turns >= 2
    assert e.code == "context_length_exceeded" and e.param == "input"
    assert str(MAX_MODEL_LEN) in e.message
    t = client.responses.create(model=MODEL, input=f"NEW {words}", previous_response_id=r.id,
                                max_output_tokens=16, truncation="auto", temperature=0)
    text = engine.last()["prompt_text"]
    assert t.truncation == "auto" and "NEW w0" in text and "OLD0" not in text
    assert t.usage.input_tokens + 16 <= MAX_MODEL_LEN
    # nothing left to drop: the newest item alone is too long
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.responses.create(model=MODEL, input=" ".join([words] * 6), truncation="auto")
    assert exc_info.value.code == "context_length_exceeded"


# ---- background mode -----------------------------------------------------------------------


def test_background_queued_then_completed(client, http):
    r = client.responses.create(model=MODEL, input="Say hi", temperature=0,
                                max_output_tokens=200, background=True)
    assert r.status == "queued" and r.background is True and r.output == []
    wait_until(lambda: client.responses.retrieve(r.id).status == "completed",
               what="the background response to complete")
    done = client.responses.retrieve(r.id)
    fg = client.responses.create(model=MODEL, input="Say hi", temperature=0,
                                 max_output_tokens=200)
    assert done.output_text == fg.output_text and done.usage.output_tokens > 0
    with pytest.raises(openai.BadRequestError):  # foreground responses cannot be cancelled
        client.responses.cancel(fg.id)
    assert client.responses.cancel(r.id).status == "completed"  # already finished: as is


def test_background_cancel_aborts_the_engine_request(client, engine):
    r = client.responses.create(model=MODEL, input=f"{NOEND} write a lot", temperature=0,
                                max_output_tokens=900, background=True)
    wait_until(lambda: len(output_text(client.responses.retrieve(r.id).model_dump())) > 0,
               what="progress to show up in GET")
    progress = client.responses.retrieve(r.id)
    assert progress.status == "in_progress" and progress.output[0].status == "in_progress"
    cancelled = client.responses.cancel(r.id)
    assert cancelled.status == "cancelled"
    wait_idle(engine)
    final = client.responses.retrieve(r.id)
    assert final.status == "cancelled" and final.output[0].status == "incomplete"
    assert final.output_text.startswith(progress.output_text)
    assert len(engine.last()["last"].outputs[0].token_ids) < 900


def test_background_survives_client_disconnect(client, server, engine):
    with httpx.Client(base_url=server.base_url, timeout=60) as h:
        with h.stream("POST", "/responses", json={
                "model": MODEL, "input": "Say hello", "temperature": 0,
                "max_output_tokens": 200, "background": True, "stream": True}) as resp:
            lines = resp.iter_lines()
            first = next(lines)
            assert first == "event: response.created"
            created = json.loads(next(lines)[len("data: "):])
    rid = created["response"]["id"]
    assert created["response"]["status"] == "queued"
    wait_until(lambda: client.responses.retrieve(rid).status == "completed",
               what="the background response to complete after the client left")
    fg = client.responses.create(model=MODEL, input="Say hello", temperature=0,
                                 max_output_tokens=200)
    assert client.responses.retrieve(rid).output_text == fg.output_text


def test_background_stream_events(http):
    events = read_response_sse(http, {"model": MODEL, "input": "Say hi", "temperature": 0,
                                      "max_output_tokens": 200, "background": True})
    final = check_response_events(events, background=True)
    assert final["status"] == "completed" and final["background"] is True


def test_foreground_stream_disconnect_cancels(client, server, engine):
    with httpx.Client(base_url=server.base_url, timeout=60) as h:
        with h.stream("POST", "/responses", json={
                "model": MODEL, "input": f"{NOEND} go on", "temperature": 0,
                "max_output_tokens": 900, "stream": True}) as resp:
            rid = None
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[len("data: "):])
                    rid = event.get("response", {}).get("id", rid)
                    if event["type"] == "response.output_text.delta":
                        break
    wait_idle(engine)
    wait_until(lambda: client.responses.retrieve(rid).status == "cancelled",
               what="the abandoned response to be marked cancelled")
    assert len(engine.last()["last"].outputs[0].token_ids) < 900


def test_foreground_non_stream_disconnect_cancels(server, engine):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/responses", timeout=1.0, json={
            "model": MODEL, "input": f"{NOEND} keep going", "temperature": 0,
            "max_output_tokens": 900})
    wait_idle(engine)
    wait_until(lambda: server.app.state.admission.in_flight == 0, what="admission release")
    assert len(engine.last()["last"].outputs[0].token_ids) < 900


def test_restart_marks_unfinished_responses_failed(engine, tmp_path):
    db = tmp_path / "responses.sqlite3"
    store = SQLiteResponseStore(db)
    base = {"object": "response", "created_at": 1, "output": [], "background": True,
            "error": None}
    store.create({**base, "id": "resp_q", "status": "queued"}, [])
    store.create({**base, "id": "resp_p", "status": "in_progress"}, [])
    store.create({**base, "id": "resp_c", "status": "completed"}, [])
    store.close()
    store = SQLiteResponseStore(db)
    create_app(engine, ServerSettings(served_model_name=MODEL), store)
    for rid in ("resp_q", "resp_p"):
        resp = store.get(rid)
        assert resp["status"] == "failed" and resp["error"]["code"] == "server_error"
    assert store.get("resp_c")["status"] == "completed"
    store.close()


def test_generation_failure_gives_failed_response(client, http, engine):
    events = read_response_sse(http, {"model": MODEL, "input": f"{NOEND} {FAIL}",
                                      "max_output_tokens": 200})
    final = check_response_events(events)
    assert events[-1]["type"] == "response.failed" and final["status"] == "failed"
    assert final["error"]["code"] == "server_error" and final["error"]["message"]
    assert client.responses.retrieve(final["id"]).status == "failed"
    resp = http.post("/responses", json={"model": MODEL, "input": f"{NOEND} {FAIL} again",
                                         "max_output_tokens": 200})
    assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"
    wait_idle(engine)


def test_logprobs_include_matches_chat(client, http):
    payload = {"model": MODEL, "input": "Say hi", "temperature": 0, "max_output_tokens": 200,
               "include": ["message.output_text.logprobs"], "top_logprobs": 2}
    r = client.responses.create(**payload)
    lps = r.output[0].content[0].logprobs
    assert len(lps) >= 1 and all(len(lp.top_logprobs) == 2 for lp in lps)
    chat = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=200,
                                          logprobs=True, top_logprobs=2,
                                          messages=[{"role": "user", "content": "Say hi"}])
    expected = [(c.token, round(c.logprob, 4)) for c in chat.choices[0].logprobs.content]
    assert [(lp.token, round(lp.logprob, 4)) for lp in lps] == expected
    events = read_response_sse(http, payload)
    deltas = [(lp["token"], round(lp["logprob"], 4)) for e in events
              if e["type"] == "response.output_text.delta" for lp in e["logprobs"]]
    done = [e for e in events if e["type"] == "response.output_text.done"][0]
    assert [(lp["token"], round(lp["logprob"], 4)) for lp in done["logprobs"]] == expected
    assert deltas == expected[:len(deltas)] and len(deltas) >= len(expected) - 1


def test_chat_path_errors_use_responses_names(http):
    """Checks made by the shared chat path name the Responses parameters."""
    resp = http.post("/responses", json={"model": MODEL, "input": "hello",
                                         "text": {"format": {"type": "json_object"}}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input"
    assert "'messages'" not in resp.json()["error"]["message"]
    bad = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}},
           "required": ["a"], "additionalProperties": False}
    resp = http.post("/responses", json={
        "model": MODEL, "input": "hello", "tool_choice": "required",
        "tools": [{"type": "function", "name": "f", "parameters": bad, "strict": True}]})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "tools[0].parameters"
    resp = http.post("/responses", json={
        "model": MODEL, "input": "hello", "text": {"format": {
            "type": "json_schema", "name": "x", "strict": True, "schema": bad}}})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "text.format.schema"
    assert "response_format" not in resp.json()["error"]["message"]


# ---- request validation --------------------------------------------------------------------


@pytest.mark.parametrize("body, status, param, code", [
    ({"input": "x"}, 400, "model", "missing_required_parameter"),
    ({"model": MODEL}, 400, "input", "missing_required_parameter"),
    ({"model": MODEL, "input": "x", "bogus": 1}, 400, "bogus", "unknown_parameter"),
    ({"model": "nope", "input": "x"}, 404, "model", "model_not_found"),
    ({"model": MODEL, "input": []}, 400, "input", "empty_array"),
    ({"model": MODEL, "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": "https://x/y.png"}]}]},
     400, "input[0].content[0]", "unsupported_value"),
    ({"model": MODEL, "input": [{"type": "reasoning", "summary": []}]},
     400, "input[0].type", "unsupported_value"),
    ({"model": MODEL, "input": [{"role": "robot", "content": "x"}]},
     400, "input[0].role", "invalid_value"),
    ({"model": MODEL, "input": "x", "store": False, "background": True},
     400, "background", "invalid_value"),
    ({"model": MODEL, "input": "x", "tools": [{"type": "web_search_preview"}]},
     400, "tools[0].type", "unsupported_value"),
    ({"model": MODEL, "input": "x", "tool_choice": "required"}, 400, "tool_choice",
     "invalid_value"),
    ({"model": MODEL, "input": "x", "max_output_tokens": 8}, 400, "max_output_tokens",
     "integer_below_min_value"),
    ({"model": MODEL, "input": "x", "temperature": 3}, 400, "temperature",
     "decimal_above_max_value"),
    ({"model": MODEL, "input": "x", "truncation": "sometimes"}, 400, "truncation",
     "invalid_value"),
    ({"model": MODEL, "input": "x", "text": {"format": {"type": "json_schema", "name": "a b",
                                                        "schema": {}}}},
     400, "text.format.name", "invalid_value"),
    ({"model": MODEL, "input": "x", "reasoning": {"effort": "high"}}, 400,
     "reasoning.effort", "unsupported_parameter"),
    ({"model": MODEL, "input": "x", "conversation": "conv_1"}, 400, "conversation",
     "unsupported_parameter"),
])
def test_bad_requests(http, body, status, param, code):
    resp = http.post("/responses", json=body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["code"] == code, err
    assert set(err) == {"message", "type", "param", "code"}


def test_unknown_response_ids(client, http):
    for call in (lambda: client.responses.retrieve("resp_nope"),
                 lambda: client.responses.cancel("resp_nope"),
                 lambda: client.responses.input_items.list("resp_nope")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert http.delete("/responses/resp_nope").status_code == 404
