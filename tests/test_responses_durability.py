"""Stored responses survive a kill -9 of a real ``openmini serve`` process (issue 5).

A server with a temporary ``--data-dir`` stores finished responses (plain, streamed,
chained through previous_response_id, with function-call items) while a background
response is mid-generation; the process is killed with SIGKILL; a new process on the same
data dir returns every finished response byte-identical, lists the same input items,
continues the conversation, and reports the interrupted background response as failed
(not in_progress forever). A graceful SIGTERM also settles running background work.

The tiny random model never emits EOS under greedy decoding, so responses end at
``max_output_tokens`` (status ``incomplete``): terminal, stored, and fast.
"""

from __future__ import annotations

import json
import signal
import time

import httpx
import openai

from server_utils import ServeProcess

MODEL = "tiny"


def start(tiny_llama, data_dir) -> ServeProcess:
    proc = ServeProcess(["--model", str(tiny_llama.hf_dir), "--dtype", "float32",
                         "--served-model-name", MODEL, "--kv-cache-memory", "16MiB",
                         "--max-model-len", "1024", "--data-dir", str(data_dir),
                         "--log-level", "warning"])
    proc.wait_ready()
    return proc


def kill_9(proc: ServeProcess) -> None:
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait(timeout=30)


def sse_events(http: httpx.Client, payload: dict) -> list[dict]:
    with http.stream("POST", "/responses", json={**payload, "stream": True}) as resp:
        assert resp.status_code == 200
        raw = resp.read().decode()
    return [json.loads(line[len("data: "):]) for line in raw.split("\n")
            if line.startswith("data: ")]


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def all_items(http: httpx.Client, rid: str) -> list[dict]:
    page = http.get(f"/responses/{rid}/input_items", params={"limit": 100, "order": "asc"})
    assert page.status_code == 200
    return page.json()["data"]


def test_kill_9_then_restart_keeps_every_finished_response(tiny_llama, tmp_path):
    data = tmp_path / "data"
    proc = start(tiny_llama, data)
    try:
        http = httpx.Client(base_url=proc.base_url, timeout=120)
        base = {"model": MODEL, "temperature": 0, "max_output_tokens": 16}
        finished = []
        r1 = http.post("/responses", json={**base, "input": "Say hi", "instructions": "Be nice",
                                           "metadata": {"n": "1"}}).json()
        finished.append(r1)
        r2 = http.post("/responses", json={**base, "input": "Again",
                                           "previous_response_id": r1["id"]}).json()
        finished.append(r2)
        finished.append(sse_events(http, {**base, "input": "Stream me"})[-1]["response"])
        finished.append(http.post("/responses", json={**base, "input": [
            {"role": "user", "content": "Weather in Oslo?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": "{\"location\": \"Oslo\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]}).json())
        unstored = http.post("/responses", json={**base, "input": "x", "store": False}).json()
        assert all(r["status"] == "incomplete" for r in finished + [unstored])
        stored = {r["id"]: (http.get(f"/responses/{r['id']}").json(), all_items(http, r["id"]))
                  for r in finished}
        for r in finished:
            assert stored[r["id"]][0] == r
        bg = http.post("/responses", json={**base, "input": "long", "background": True,
                                           "max_output_tokens": 1000}).json()
        wait_for(lambda: len(http.get(f"/responses/{bg['id']}").json()["output"]) > 0)
        assert http.get(f"/responses/{bg['id']}").json()["status"] == "in_progress"
        http.close()
    finally:
        kill_9(proc)

    proc = start(tiny_llama, data)
    try:
        client = openai.OpenAI(base_url=proc.base_url, api_key="x", max_retries=0,
                               _strict_response_validation=True)
        http = httpx.Client(base_url=proc.base_url, timeout=120)
        for rid, (body, items) in stored.items():
            assert http.get(f"/responses/{rid}").json() == body
            assert all_items(http, rid) == items
            client.responses.retrieve(rid)  # and the SDK accepts it
        assert http.get(f"/responses/{unstored['id']}").status_code == 404
        failed = client.responses.retrieve(bg["id"])
        assert failed.status == "failed" and failed.error.code == "server_error"
        # the conversation goes on from the restored state
        r3 = client.responses.create(model=MODEL, input="Third", previous_response_id=r2["id"],
                                     temperature=0, max_output_tokens=16)
        assert r3.usage.input_tokens > r2["usage"]["input_tokens"] + r2["usage"]["output_tokens"]
        assert [i["id"] for i in all_items(http, r3.id)[:len(stored[r2["id"]][1])]] == \
            [i["id"] for i in stored[r2["id"]][1]]
        # a graceful stop settles running background work too
        bg2 = client.responses.create(model=MODEL, input="long again", background=True,
                                      max_output_tokens=1000)
        wait_for(lambda: client.responses.retrieve(bg2.id).status == "in_progress")
        http.close()
    finally:
        rc = proc.terminate()
    assert rc == 0, proc.output

    proc = start(tiny_llama, data)
    try:
        client = openai.OpenAI(base_url=proc.base_url, api_key="x", max_retries=0,
                               _strict_response_validation=True)
        again = client.responses.retrieve(bg2.id)
        assert again.status == "failed" and again.error.code == "server_error"
        assert "shut down" in again.error.message  # settled by the stopping server itself
        assert "stopped before" in failed.error.message  # settled by start-up recovery
        assert client.responses.retrieve(r3.id).status == "incomplete"
    finally:
        assert proc.terminate() == 0
