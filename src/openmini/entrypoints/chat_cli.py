"""``openmini chat``: a terminal chat that streams tokens.

In-process (loads the model here) or against a running server (``--base-url``, any
OpenAI-compatible endpoint). Commands: ``/reset`` (forget the conversation, keep the
system prompt), ``/system TEXT`` (set the system prompt; ``/system`` alone clears it),
``/model [NAME]`` (show or switch the model), ``/help``, ``/quit``. Ctrl-C stops the
current answer; Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any, Iterator, Protocol, TextIO

HELP = ("/reset  forget the conversation (keeps the system prompt)\n"
        "/system TEXT  set the system prompt (/system alone clears it)\n"
        "/model [NAME]  show or switch the model\n"
        "/help  this text\n"
        "/quit  leave (or Ctrl-D)")


class ChatBackend(Protocol):
    """Where answers come from."""

    model: str

    def stream(self, messages: list[dict[str, Any]], temperature: float,
               max_tokens: int | None) -> Iterator[str]:
        """Yield the answer's text deltas."""
        ...

    def set_model(self, name: str) -> None:
        """Switch models (may load one)."""
        ...

    def close(self) -> None:
        ...


class RemoteBackend:
    """An OpenAI-compatible server through the official ``openai`` client."""

    def __init__(self, base_url: str, api_key: str, model: str | None):
        import openai
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key)
        self.model = model or self.client.models.list().data[0].id

    def stream(self, messages, temperature, max_tokens) -> Iterator[str]:
        kw: dict[str, Any] = {"max_tokens": max_tokens} if max_tokens else {}
        with self.client.chat.completions.create(model=self.model, messages=messages,
                                                 temperature=temperature, stream=True,
                                                 **kw) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    def set_model(self, name: str) -> None:
        self.client.models.retrieve(name)  # raises NotFoundError for unknown ids
        self.model = name

    def close(self) -> None:
        self.client.close()


class LocalBackend:
    """The engine in this process, driven through the serving layer (no HTTP).

    Args:
        engine: an ``EngineClient``; ``loader(name)`` builds a new one for ``/model``.
        model: the name shown for it.
        loader: optional ``name -> EngineClient`` used by ``set_model``.
    """

    def __init__(self, engine: Any, model: str, loader: Any = None):
        self.engine = engine
        self.model = model
        self.loader = loader
        self.loop = asyncio.new_event_loop()

    def stream(self, messages, temperature, max_tokens) -> Iterator[str]:
        from openmini.serving.chat import ChatCompletionService
        from openmini.serving.protocol import ChatCompletionRequest, GenerationOptions

        service = ChatCompletionService(self.engine, self.model, "fp_local")
        req = ChatCompletionRequest(model=self.model, messages=messages, options=GenerationOptions(
            max_tokens=max_tokens, temperature=temperature, stream=True))
        prep = service.prepare(req)
        started = self.loop.run_until_complete(service.start(prep))
        chunks = service.chunks(prep, started)
        try:
            while True:
                try:
                    chunk = self.loop.run_until_complete(chunks.__anext__())
                except StopAsyncIteration:
                    return
                for choice in chunk["choices"]:
                    text = choice["delta"].get("content")
                    if text:
                        yield text
        finally:
            self.loop.run_until_complete(chunks.aclose())
            self.loop.run_until_complete(started.aclose())

    def set_model(self, name: str) -> None:
        if self.loader is None:
            raise ValueError("switching models is not available here")
        new = self.loader(name)
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
        self.engine, self.model = new, name

    def close(self) -> None:
        if hasattr(self.engine, "shutdown"):
            self.engine.shutdown()
        self.loop.close()


class ChatSession:
    """The conversation and the command loop.

    Args:
        backend: where answers come from.
        system: initial system prompt (None for none).
        temperature / max_tokens: sampling settings of every turn.
    """

    def __init__(self, backend: ChatBackend, system: str | None = None,
                 temperature: float = 0.7, max_tokens: int | None = 512):
        self.backend = backend
        self.system = system
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.history: list[dict[str, Any]] = []

    def messages(self) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def command(self, line: str, out: TextIO) -> bool:
        """Run a ``/command``; returns False to quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return False
        if cmd == "/reset":
            self.history.clear()
            print("(conversation cleared)", file=out)
        elif cmd == "/system":
            self.system = arg or None
            print(f"(system prompt {'set' if arg else 'cleared'})", file=out)
        elif cmd == "/model":
            if arg:
                try:
                    self.backend.set_model(arg)
                except Exception as exc:  # noqa: BLE001 - report and keep chatting
                    print(f"(cannot switch to {arg}: {exc})", file=out)
            print(f"(model: {self.backend.model})", file=out)
        else:
            print(HELP, file=out)
        return True

    def turn(self, text: str, out: TextIO) -> None:
        """Send one user message and stream the answer to ``out``."""
        self.history.append({"role": "user", "content": text})
        parts: list[str] = []
        try:
            for delta in self.backend.stream(self.messages(), self.temperature,
                                             self.max_tokens):
                parts.append(delta)
                out.write(delta)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except Exception as exc:  # noqa: BLE001 - show the error, keep the session
            self.history.pop()
            print(f"(error: {exc})", file=out)
            return
        out.write("\n")
        self.history.append({"role": "assistant", "content": "".join(parts)})

    def repl(self, inp: TextIO, out: TextIO) -> None:
        """Read lines until ``/quit`` or end of input."""
        interactive = inp.isatty()
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = inp.readline()
            if not line:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    break
                continue
            self.turn(line, out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="openmini chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="model name/path (in-process) or model id (with --base-url)")
    p.add_argument("--base-url", default=None,
                   help="chat with a running server, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None,
                   help="key for --base-url (default $OPENMINI_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32"],
                   help="in-process only")
    return p


def main(argv: list[str] | None = None, stdin: TextIO | None = None,
         stdout: TextIO | None = None) -> int:
    """Run ``openmini chat``; returns the exit status (1 when the backend cannot start)."""
    args = build_parser().parse_args(argv)
    inp, out = stdin or sys.stdin, stdout or sys.stdout
    try:
        if args.base_url:
            key = (args.api_key or os.environ.get("OPENMINI_API_KEY")
                   or os.environ.get("OPENAI_API_KEY") or "none")
            backend: ChatBackend = RemoteBackend(args.base_url, key, args.model)
        else:
            backend = _local_backend(args.model, args.dtype)
    except Exception as exc:  # noqa: BLE001 - a clean message instead of a traceback
        print(f"openmini chat: {exc}", file=sys.stderr)
        return 1
    print(f"(model: {backend.model}; /help for commands)", file=out)
    try:
        ChatSession(backend, args.system, args.temperature, args.max_tokens).repl(inp, out)
    finally:
        backend.close()
    return 0


def _local_backend(model: str | None, dtype: str) -> LocalBackend:
    from openmini.config import EngineConfig
    from openmini.engine.async_engine import AsyncEngine
    from openmini.loaders.registry import DEFAULT_MODEL

    def load(name: str):
        return AsyncEngine.from_config(EngineConfig(model=name, dtype=dtype))

    name = model or DEFAULT_MODEL
    return LocalBackend(load(name), name, load)


if __name__ == "__main__":
    sys.exit(main())
