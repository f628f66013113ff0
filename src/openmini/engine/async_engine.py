"""``AsyncEngine``: the engine loop on a background thread, per-request async streams.

The HTTP server (an asyncio event loop) calls ``generate()``; commands go to the engine
thread through a thread-safe inbox; outputs come back to each request's ``asyncio.Queue``
through ``loop.call_soon_threadsafe``. Torch releases the GIL inside its kernels, so the
event loop stays responsive while the engine computes.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import AsyncIterator

from openmini.config import EngineConfig
from openmini.engine.engine import Engine
from openmini.engine.errors import EngineDeadError
from openmini.engine.protocol import EngineStats
from openmini.outputs import RequestOutput
from openmini.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class _Stream:
    """Where the engine thread delivers one request's outputs."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    """Implements ``openmini.engine.protocol.EngineClient`` over an ``Engine``.

    Args:
        engine: a loaded engine; the loop thread starts at once.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.chat_template = engine.chat_template
        self.max_model_len = engine.max_model_len
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._dead: BaseException | None = None
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="openmini-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "AsyncEngine":
        """Load the model named by ``config`` and start the engine thread."""
        return cls(Engine(config))

    # ---- public API -------------------------------------------------------------------------

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                       request_id: str, prompt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs (see ``EngineClient.generate``).

        Raises:
            ValueError / ContextLengthExceededError: before anything is queued.
            EngineDeadError: the engine loop is not running.
        """
        if self._stopped or self._dead is not None:
            raise EngineDeadError("The engine is not running.")
        self.engine.check_request(prompt_token_ids, sampling_params)
        if request_id in self._streams:
            raise ValueError(f"Duplicate request id {request_id!r}.")
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._inbox.put(("add", request_id, list(prompt_token_ids), sampling_params, prompt))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        """Abort at the next loop iteration (before the next engine step)."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest engine step."""
        return self._stats

    @property
    def is_running(self) -> bool:
        return not self._stopped and self._dead is None and self._thread.is_alive()

    def shutdown(self, timeout: float = 300.0) -> None:
        """Stop the loop after the current step; unfinished requests get ``EngineDeadError``.

        Waits for the step in progress (bounded by ``max_num_batched_tokens``): leaving the
        thread inside a torch kernel while the interpreter exits aborts the process."""
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout)

    # ---- engine thread ----------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, prompt = cmd
                stream = self._streams.get(rid)
                if stream is None:  # the caller already went away
                    continue
                try:
                    self.engine.add_request(rid, ids, params, prompt)
                except Exception as exc:  # validation raced with a config change
                    stream.put(exc)
            elif cmd[0] == "abort":
                out = self.engine.abort_request(cmd[1])
                stream = self._streams.get(cmd[1])
                if out is not None and stream is not None:
                    stream.put(out)

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_inbox()
            if not self.engine.has_unfinished_requests():
                self._stats = self.engine.stats()
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug or OOM: fail every in-flight request, keep going
                logger.exception("engine step failed")
                self._fail_all(exc)
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    stream.put(out)
            self._stats = self.engine.stats()
        self._fail_all(EngineDeadError("The engine was shut down."))

    def _fail_all(self, exc: BaseException) -> None:
        for rid, stream in list(self._streams.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # pragma: no cover - best effort cleanup
                logger.exception("abort after failure")
            stream.put(exc)
