"""Raw SSE reading and the chunk-shape rules of API.md section 2 (cases C03, C04, C16)."""

from __future__ import annotations

import json
from typing import Any

import httpx


def read_sse(http: httpx.Client, path: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """POST ``payload`` and return the JSON chunks of the event stream, checking framing:
    ``text/event-stream``, only ``data: …\\n\\n`` events, ``data: [DONE]`` last."""
    with http.stream("POST", path, json=payload) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"].startswith("req_")
        raw = resp.read().decode("utf-8")
    events = raw.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    events = events[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events[:3]
    assert events[-1] == "data: [DONE]"
    assert events.count("data: [DONE]") == 1
    return [json.loads(e[len("data: "):]) for e in events[:-1]]


def check_chat_chunks(chunks: list[dict[str, Any]], n: int, include_usage: bool,
                      logprobs: bool = False) -> tuple[dict[int, str], dict[int, str]]:
    """Assert every chat-chunk rule; return per-choice joined content and finish_reason.

    Rules: same ``id`` / ``created`` on every chunk; ``object`` ``chat.completion.chunk``;
    per choice a first delta ``{role: "assistant", content: ""}``, no ``role`` afterwards,
    ``finish_reason`` present everywhere and null except on a last ``delta: {}`` chunk;
    ``usage`` key absent without include_usage, else null everywhere but one last chunk
    with ``choices: []``.
    """
    assert chunks, "no chunks"
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    assert len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["model"] for c in chunks}) == 1
    assert all(c["system_fingerprint"] for c in chunks)
    body = chunks
    if include_usage:
        last = chunks[-1]
        assert last["choices"] == []
        u = last["usage"]
        assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
        assert "cached_tokens" in u["prompt_tokens_details"]
        body = chunks[:-1]
        assert all("usage" in c and c["usage"] is None for c in body)
    else:
        assert all("usage" not in c for c in chunks)
    texts: dict[int, str] = {}
    finish: dict[int, str] = {}
    for c in body:
        assert len(c["choices"]) == 1
        ch = c["choices"][0]
        assert set(ch) >= {"index", "delta", "logprobs", "finish_reason"}
        i = ch["index"]
        assert 0 <= i < n
        assert i not in finish, f"choice {i} got a chunk after its finish_reason"
        delta = ch["delta"]
        if i not in texts:
            assert delta.get("role") == "assistant" and delta.get("content") == "", delta
            assert ch["finish_reason"] is None
            texts[i] = ""
            continue
        assert "role" not in delta
        if ch["finish_reason"] is not None:
            assert delta == {}
            assert ch["finish_reason"] in ("stop", "length")
            finish[i] = ch["finish_reason"]
        else:
            assert isinstance(delta["content"], str)
            texts[i] += delta["content"]
            if logprobs:
                assert ch["logprobs"] is not None and "content" in ch["logprobs"]
            else:
                assert ch["logprobs"] is None
    assert sorted(texts) == list(range(n)) and sorted(finish) == list(range(n))
    return texts, finish
