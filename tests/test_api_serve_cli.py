"""``openmini serve`` as a real process: arguments, API key from the environment, aliases,
served model name, and a clean exit on SIGTERM."""

from __future__ import annotations

import argparse

import httpx
import openai
import pytest

from openmini.api.server import api_keys_from, build_parser, parse_size
from server_utils import ServeProcess


def test_parse_size():
    assert parse_size("1024") == 1024
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("2G") == 2 * 10**9
    assert parse_size("1.5GiB") == int(1.5 * 2**30)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_api_keys_from_flags_or_env():
    assert api_keys_from(["a", "b"], {"OPENMINI_API_KEY": "c"}) == ("a", "b")
    assert api_keys_from(None, {"OPENMINI_API_KEY": "c, d"}) == ("c", "d")
    assert api_keys_from(None, {}) == ()


def test_defaults():
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.model, args.api_key) == ("127.0.0.1", 8000, None, None)


def test_serve_process_end_to_end_and_sigterm(tiny_llama):
    proc = ServeProcess(["--model", str(tiny_llama.hf_dir), "--dtype", "float32",
                         "--served-model-name", "tiny-served", "--max-num-seqs", "4",
                         "--kv-cache-memory", "8MiB", "--max-model-len", "512",
                         "--model-alias", "my-alias"],
                        env={"OPENMINI_API_KEY": "sk-env-key"})
    try:
        proc.wait_ready()
        client = openai.OpenAI(base_url=proc.base_url, api_key="sk-env-key", max_retries=0,
                               _strict_response_validation=True)
        assert [m.id for m in client.models.list().data] == ["tiny-served", "my-alias"]
        r = client.chat.completions.create(model="my-alias", max_tokens=4,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert r.model == "tiny-served" and r.usage.completion_tokens <= 4
        with pytest.raises(openai.NotFoundError):  # default aliases replaced by --model-alias
            client.chat.completions.create(model="gpt-4.1-mini", max_tokens=2,
                                           messages=[{"role": "user", "content": "Hi"}])
        assert httpx.post(proc.base_url + "/chat/completions", json={}).status_code == 401
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-served", max_tokens=2,
                                           messages=[{"role": "user", "content": "x " * 2000}])
        assert "512" in e.value.message
    finally:
        rc = proc.terminate()
    assert rc == 0, proc.output
    assert "shut down cleanly" in proc.output
    # one access-log line per request, with its request id
    assert proc.output.count('"POST /v1/chat/completions HTTP') == 0  # no uvicorn access log
    assert proc.output.count('"POST /v1/chat/completions" ') == 4


def test_port_in_use_fails_before_model_load(tmp_path, capsys):
    """A taken port -> exit 1 with a one-line error, without touching the (missing) model."""
    import socket

    from openmini.api.server import serve_main

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        rc = serve_main(["--model", str(tmp_path / "missing.gguf"), "--port", str(port),
                         "--data-dir", str(tmp_path / "data")])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert rc == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "missing.gguf" not in err  # the model was never looked at
