"""Server operations over real HTTP with the deterministic ``FakeEngine``: models, health,
metrics, API keys, the bounded queue (429), client disconnects, ``x-request-id``, the access
log and legacy text completions."""

from __future__ import annotations

import json
import logging
import socket
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fake_engine import FakeEngine
from openmini.api import ServerSettings
from server_utils import ServerThread

MSG = [{"role": "user", "content": "Hello"}]


def wait_until(cond, timeout: float = 20.0, what: str = "condition") -> None:
    """Poll ``cond`` until true (a wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server():
    with ServerThread(FakeEngine()) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0,
                         _strict_response_validation=True)


def metric(server, name: str, **labels) -> float:
    """Current value of one sample from GET /metrics (0 when absent)."""
    with httpx.Client() as http:
        text = http.get(server.root + "/metrics").text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ---- models, health --------------------------------------------------------------------------


def test_models(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["test-model", "gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"]
    for mid in ids:
        m = client.models.retrieve(mid)
        assert (m.id, m.object, m.owned_by) == (mid, "model", "openmini")
        assert m.max_model_len == 4096  # vLLM's extra field: FakeEngine's context window
    assert [m.max_model_len for m in client.models.list().data] == [4096] * 3
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_aliases_resolve_to_the_served_model(client):
    for alias in ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14", "test-model"):
        r = client.chat.completions.create(model=alias, messages=MSG, max_tokens=3)
        assert r.model == "test-model"


def test_health(server):
    resp = httpx.get(server.root + "/health")
    assert resp.status_code == 200
    assert resp.json()["status"] == "ok"
    assert resp.headers["x-request-id"].startswith("req_")


# ---- metrics ---------------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latencies(server, client):
    ok = metric(server, "openmini_requests_total", endpoint="/v1/chat/completions", status="200")
    bad = metric(server, "openmini_requests_total", endpoint="/v1/chat/completions",
                 status="400")
    prompt = metric(server, "openmini_prompt_tokens_total")
    completion = metric(server, "openmini_completion_tokens_total")
    cost = metric(server, "openmini_equivalent_cost_usd_total")
    ttft = metric(server, "openmini_time_to_first_token_seconds_count")
    itl = metric(server, "openmini_inter_token_latency_seconds_count")

    r = client.chat.completions.create(model="test-model", messages=MSG, max_tokens=7)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="test-model", messages=MSG, temperature=7)

    assert metric(server, "openmini_requests_total", endpoint="/v1/chat/completions",
                  status="200") == ok + 1
    assert metric(server, "openmini_requests_total", endpoint="/v1/chat/completions",
                  status="400") == bad + 1
    assert metric(server, "openmini_prompt_tokens_total") == prompt + r.usage.prompt_tokens
    assert metric(server, "openmini_completion_tokens_total") == \
        completion + r.usage.completion_tokens
    cached = r.usage.prompt_tokens_details.cached_tokens
    expected_cost = ((r.usage.prompt_tokens - cached) * 0.40 + cached * 0.10
                     + r.usage.completion_tokens * 1.60) / 1e6
    assert metric(server, "openmini_equivalent_cost_usd_total") - cost == \
        pytest.approx(expected_cost)
    assert metric(server, "openmini_time_to_first_token_seconds_count") == ttft + 1
    # the fake engine emits one token per step: one interval per token after the first
    assert metric(server, "openmini_inter_token_latency_seconds_count") == \
        itl + r.usage.completion_tokens - 1
    for gauge in ("openmini_queue_depth", "openmini_running_sequences",
                  "openmini_kv_blocks_used", "openmini_prefix_cache_hit_rate"):
        assert f"\n{gauge} " in httpx.get(server.root + "/metrics").text


def test_cached_tokens_reported(client):
    """usage.prompt_tokens_details.cached_tokens comes from RequestOutput.num_cached_tokens."""
    long = [{"role": "user", "content": "The same long prefix. " * 20}]
    client.chat.completions.create(model="test-model", messages=long, max_tokens=2)
    r = client.chat.completions.create(model="test-model", messages=long, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens > 0
    assert r.usage.prompt_tokens_details.cached_tokens % 16 == 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 0


# ---- x-request-id and the access log ---------------------------------------------------------


def test_every_response_has_a_request_id_and_one_access_log_line(server, caplog):
    caplog.set_level(logging.INFO, logger="openmini.access")
    root = server.root
    responses = [
        httpx.post(root + "/v1/chat/completions",
                   json={"model": "test-model", "messages": MSG, "max_tokens": 2}),
        httpx.post(root + "/v1/chat/completions", json={"model": "test-model"}),
        httpx.post(root + "/v1/chat/completions", content=b"{"),
        httpx.get(root + "/nowhere"),
        httpx.get(root + "/health"),
        httpx.get(root + "/metrics"),
        httpx.get(root + "/v1/models"),
    ]
    with httpx.stream("POST", root + "/v1/chat/completions",
                      json={"model": "test-model", "messages": MSG, "max_tokens": 2,
                            "stream": True}) as s:
        s.read()
        responses.append(s)
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(i.startswith("req_") and len(i) == 36 for i in ids)
    assert len(set(ids)) == len(ids)
    wait_until(lambda: all(any(i in rec.getMessage() for rec in caplog.records) for i in ids),
               what="access log lines")
    for i, r in zip(ids, responses):
        lines = [rec.getMessage() for rec in caplog.records if i in rec.getMessage()]
        assert len(lines) == 1
        assert f" {r.status_code} " in lines[0]


# ---- API keys --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server():
    settings = ServerSettings(served_model_name="test-model", api_keys=("sk-test-123",))
    with ServerThread(FakeEngine(), settings) as srv:
        yield srv


def test_api_keys(keyed_server):
    url = keyed_server.base_url + "/chat/completions"
    payload = {"model": "test-model", "messages": MSG, "max_tokens": 2}
    missing = httpx.post(url, json=payload)
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] is None
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert "API key" in missing.json()["error"]["message"]
    assert missing.headers["x-request-id"]

    wrong = openai.OpenAI(base_url=keyed_server.base_url, api_key="sk-wrong-999",
                          max_retries=0, _strict_response_validation=True)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.chat.completions.create(**payload)
    assert e.value.code == "invalid_api_key"
    assert "sk-wrong-999" not in e.value.message  # the key is masked
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()

    right = openai.OpenAI(base_url=keyed_server.base_url, api_key="sk-test-123",
                          max_retries=0, _strict_response_validation=True,
                          default_headers={"OpenAI-Organization": "org-1",
                                           "OpenAI-Project": "proj-1"})
    assert right.chat.completions.create(**payload).choices[0].message.role == "assistant"
    assert [m.id for m in right.models.list().data][0] == "test-model"
    # health and metrics stay open for probes and scrapers
    assert httpx.get(keyed_server.root + "/health").status_code == 200
    assert httpx.get(keyed_server.root + "/metrics").status_code == 200


# ---- bounded queue ---------------------------------------------------------------------------


def test_full_queue_gives_429_with_retry_after():
    engine = FakeEngine(step_delay=0.01, endless=True)
    settings = ServerSettings(served_model_name="test-model", max_num_seqs=1, max_queue=1)
    payload = {"model": "test-model", "messages": MSG, "max_tokens": 3000, "stream": True}
    with ServerThread(engine, settings) as srv, httpx.Client(timeout=30) as http:
        url = srv.base_url + "/chat/completions"
        held = []
        for _ in range(2):  # capacity = max_num_seqs + max_queue = 2
            cm = http.stream("POST", url, json=payload)
            resp = cm.__enter__()
            assert resp.status_code == 200
            lines = resp.iter_lines()  # keep it referenced: closing it closes the connection
            assert next(lines).startswith("data: ")
            held.append((cm, lines))
        over = http.post(url, json={**payload, "stream": False})
        assert over.status_code == 429
        assert over.headers["retry-after"] == "1"
        assert over.json()["error"]["code"] == "rate_limit_exceeded"
        sdk = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0,
                            _strict_response_validation=True)
        with pytest.raises(openai.RateLimitError):
            sdk.chat.completions.create(model="test-model", messages=MSG, max_tokens=2)
        for cm, _ in held:
            cm.__exit__(None, None, None)
        wait_until(lambda: not engine.active, what="streams aborted")
        wait_until(lambda: srv.app.state.admission.in_flight == 0, what="queue drained")
        r = sdk.chat.completions.create(model="test-model", messages=MSG, max_tokens=2)
        assert r.usage.completion_tokens == 2


# ---- client disconnects (C13 at the HTTP level) ----------------------------------------------


def _raw_request(port: int, payload: dict) -> socket.socket:
    body = json.dumps(payload).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    return sock


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_the_request(stream, caplog):
    caplog.set_level(logging.INFO, logger="openmini.access")
    engine = FakeEngine(step_delay=0.005, endless=True)
    with ServerThread(engine) as srv:
        sock = _raw_request(srv.port, {"model": "test-model", "messages": MSG,
                                       "max_tokens": 4000, "stream": stream})
        wait_until(lambda: engine.active, what="the request to start")
        if stream:
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.close()
        wait_until(lambda: not engine.active, what="the engine request to be aborted")
        wait_until(lambda: srv.app.state.admission.in_flight == 0, what="admission release")
        # the next request is unaffected
        r = openai.OpenAI(base_url=srv.base_url, api_key="x").chat.completions.create(
            model="test-model", messages=MSG, max_tokens=5)
        assert r.usage.completion_tokens == 5
    if not stream:
        wait_until(lambda: any('" 499 ' in rec.getMessage() for rec in caplog.records),
                   what="the 499 access log line")


# ---- legacy text completions -----------------------------------------------------------------


def test_legacy_completions(client):
    r = client.completions.create(model="test-model", prompt="Say hi", max_tokens=5,
                                  temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    text = r.choices[0].text

    echo = client.completions.create(model="test-model", prompt="Say hi", max_tokens=5,
                                     temperature=0, echo=True)
    assert echo.choices[0].text == "Say hi" + text

    lp = client.completions.create(model="test-model", prompt="Say hi", max_tokens=5,
                                   temperature=0, logprobs=2)
    assert "".join(lp.choices[0].logprobs.tokens) == text
    assert all(len(t) == 2 for t in lp.choices[0].logprobs.top_logprobs)
    assert lp.choices[0].logprobs.text_offset[0] == 0

    multi = client.completions.create(model="test-model", prompt=["a", "b"], n=2,
                                      max_tokens=3, temperature=1, seed=5)
    assert [c.index for c in multi.choices] == [0, 1, 2, 3]
    assert multi.usage.completion_tokens == 12

    # streamed legacy chunks carry finish_reason null until the last one, as OpenAI's do,
    # which the SDK's Completion type (finish_reason required) cannot validate strictly
    lenient = client.with_options()
    lenient._strict_response_validation = False
    chunks = list(lenient.completions.create(model="test-model", prompt="Say hi", max_tokens=5,
                                             temperature=0, stream=True,
                                             stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][:-1] == [None] * 5
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5

    ids = client.completions.create(model="test-model", prompt=[72, 105], max_tokens=3,
                                    temperature=0)
    assert ids.usage.prompt_tokens == 2


# ---- engine failures -------------------------------------------------------------------------


class FailingEngine(FakeEngine):
    """Fails every request after its third step (a crashed engine step)."""

    async def generate(self, prompt_token_ids, sampling_params, request_id, prompt=None):
        k = 0
        async for out in super().generate(prompt_token_ids, sampling_params, request_id, prompt):
            k += 1
            if k > 3:
                raise RuntimeError("engine step failed")
            yield out


def test_engine_failure_is_a_server_error_not_a_hang():
    engine = FailingEngine(endless=True)
    with ServerThread(engine) as srv, httpx.Client(base_url=srv.base_url) as http:
        payload = {"model": "test-model", "messages": MSG, "max_tokens": 50}
        resp = http.post("/chat/completions", json=payload)
        assert resp.status_code == 500
        assert resp.json()["error"]["type"] == "server_error"
        assert resp.headers["x-request-id"]
        with http.stream("POST", "/chat/completions", json={**payload, "stream": True}) as s:
            assert s.status_code == 200
            events = s.read().decode().strip().split("\n\n")
        assert "[DONE]" not in events[-1]
        assert json.loads(events[-1][len("data: "):])["error"]["type"] == "server_error"
        sdk = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.APIError):
            for _ in sdk.chat.completions.create(**payload, stream=True):
                pass
        wait_until(lambda: not engine.active, what="cleanup")
        assert srv.app.state.admission.in_flight == 0
