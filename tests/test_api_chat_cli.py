"""``openmini chat``: against a live server (--base-url) and in-process, with scripted input."""

from __future__ import annotations

import io

import pytest

from fake_engine import FakeEngine
from openmini.entrypoints.chat_cli import ChatSession, LocalBackend, main
from server_utils import ServerThread

SCRIPT = ("hello there\n"
          "/system Be brief.\n"
          "second question\n"
          "/model gpt-4.1-mini\n"
          "/model no-such-model\n"
          "/reset\n"
          "third\n"
          "/quit\n"
          "never sent\n")


def prompts_text(engine: FakeEngine) -> list[str]:
    return [engine.tokenizer.decode(p, skip_special_tokens=True) for p in engine.seen_prompts]


@pytest.fixture()
def fake_server():
    with ServerThread(FakeEngine()) as srv:
        yield srv


def test_chat_against_a_server(fake_server):
    out = io.StringIO()
    rc = main(["--base-url", fake_server.base_url, "--temperature", "0", "--max-tokens", "200"],
              stdin=io.StringIO(SCRIPT), stdout=out)
    assert rc == 0
    text = out.getvalue()
    assert "(model: test-model" in text
    assert "(system prompt set)" in text and "(conversation cleared)" in text
    assert "(model: gpt-4.1-mini)" in text
    assert "cannot switch to no-such-model" in text
    prompts = prompts_text(fake_server.engine)
    assert len(prompts) == 3  # "/..." lines and the line after /quit are not sent
    first, second, third = prompts
    assert "user\nhello there" in first and "system" not in first
    # the second turn carries the system prompt and the whole first exchange
    assert second.startswith("system\nBe brief.")
    assert "user\nhello there" in second and "assistant\nEcho of" in second
    assert "user\nsecond question" in second
    # /reset forgot the conversation but kept the system prompt
    assert third.startswith("system\nBe brief.") and "hello there" not in third
    # streamed answers were printed whole
    assert text.count("The end.") == 3


def test_chat_in_process_backend():
    engine = FakeEngine()
    backend = LocalBackend(engine, "fake")
    session = ChatSession(backend, system=None, temperature=0, max_tokens=300)
    out = io.StringIO()
    session.repl(io.StringIO("hi\nand again\n"), out)
    assert [m["role"] for m in session.history] == ["user", "assistant"] * 2
    answers = [m["content"] for m in session.history if m["role"] == "assistant"]
    assert all(a.startswith("Echo of") and a.endswith("The end.") for a in answers)
    assert out.getvalue() == "".join(a + "\n" for a in answers)
    assert not engine.active  # every engine request finished or was closed
    backend.close()


def test_chat_reports_server_errors_and_keeps_going(fake_server):
    out = io.StringIO()
    long_line = "x" * 10000  # over the fake engine's 4096-token window
    rc = main(["--base-url", fake_server.base_url, "--max-tokens", "5"],
              stdin=io.StringIO(long_line + "\nshort\n"), stdout=out)
    assert rc == 0
    assert "context length" in out.getvalue() or "context_length_exceeded" in out.getvalue()
    assert len(fake_server.engine.seen_prompts) == 1  # the short one still went through
