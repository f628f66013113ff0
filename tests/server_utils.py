"""Start a real uvicorn server for tests: in a background thread (``ServerThread``) or as an
``openmini serve`` subprocess (``ServeProcess``), on a free port."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from openmini.api import ServerSettings, create_app

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """Serve ``create_app(engine, settings)`` with uvicorn on a background thread.

    Use as a context manager or call ``start()`` / ``stop()``; ``configure(app)`` may add
    routes before the server starts. ``base_url`` ends in
    ``/v1`` (what the openai client wants); ``root`` is the bare origin.
    """

    def __init__(self, engine, settings: ServerSettings | None = None, configure=None):
        self.engine = engine
        self.settings = settings or ServerSettings(served_model_name="test-model")
        self.app = create_app(engine, self.settings)
        if configure is not None:  # e.g. add a probe route
            configure(self.app)
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root + "/v1"
        self._server = uvicorn.Server(uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning",
            access_log=False, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class ServeProcess:
    """``python -m openmini.cli serve ARGS`` as a child process on a free port."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = self.root + "/v1"
        cmd = [sys.executable, "-m", "openmini.cli", "serve", "--port", str(self.port), *args]
        full_env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.output = ""

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.root + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, wait, return the exit status (kills after ``timeout``)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.output = self.proc.stdout.read()
        return rc


@contextlib.contextmanager
def running_engine(model, *, max_model_len: int, dtype: str = "float32",
                   num_blocks: int | None = None, kv_cache_memory: int | None = None):
    """An ``AsyncEngine`` on ``model`` (path or name) for a test module; shut down after."""
    from openmini.config import CacheConfig, EngineConfig
    from openmini.engine.async_engine import AsyncEngine

    cache = CacheConfig(num_blocks=num_blocks) if num_blocks else CacheConfig(kv_cache_memory=kv_cache_memory)
    eng = AsyncEngine.from_config(EngineConfig(
        model=str(model), dtype=dtype, max_model_len=max_model_len, cache=cache))
    try:
        yield eng
    finally:
        eng.shutdown()
