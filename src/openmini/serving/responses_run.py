"""``ResponseRun``: one response being generated, independent of any HTTP request.

A run owns an asyncio task, the live response object (its ``output`` grows as tokens
arrive, so ``GET /v1/responses/{id}`` shows progress), the event sequence number and the
queues of the clients streaming it. Foreground responses cancel their run when the client
goes away (case C13); background runs keep going and only ``cancel`` stops them.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Callable

CANCEL_REQUESTED = "cancelled"
"""``cancel_reason`` of ``POST /v1/responses/{id}/cancel`` and of a client that left."""


class ResponseRun:
    """The live state of one response.

    Args:
        response: the response object (``status`` queued or in_progress, ``output`` []).
        background: created with ``background: true``.
        on_done: called once when the run ends, however it ends (admission release).

    Attributes:
        task: the asyncio task generating the response (set by the service).
        cancel_reason: why ``cancel`` was called; None while nobody asked (a task cancelled
            without a reason is being torn down with the server).
        error: the ``OpenAIError`` a failed run ended with, if any.
    """

    def __init__(self, response: dict[str, Any], background: bool,
                 on_done: Callable[[], None] | None = None):
        self.response = response
        self.background = background
        self.task: asyncio.Task | None = None
        self.cancel_reason: str | None = None
        self.error: Exception | None = None
        self._on_done = on_done
        self._seq = 0
        self._queues: list[asyncio.Queue] = []
        self._done = asyncio.Event()

    @property
    def id(self) -> str:
        return self.response["id"]

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def snapshot(self) -> dict[str, Any]:
        """A deep copy of the response object as it is now."""
        return copy.deepcopy(self.response)

    # ---- events -------------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue:
        """A queue receiving every later event, then None when the run ends."""
        queue: asyncio.Queue = asyncio.Queue()
        if self.done:
            queue.put_nowait(None)
        else:
            self._queues.append(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        if queue in self._queues:
            self._queues.remove(queue)

    def emit(self, event_type: str, payload: dict[str, Any]) -> None:
        """Send ``{type, sequence_number, **payload}`` to every subscriber (numbers count
        from 0 for the run, whether or not anybody listens)."""
        event = {"type": event_type, "sequence_number": self._seq, **payload}
        self._seq += 1
        for queue in self._queues:
            queue.put_nowait(event)

    def emit_response(self, event_type: str) -> None:
        """An event carrying a snapshot of the whole response (created, completed, ...)."""
        self.emit(event_type, {"response": self.snapshot()})

    # ---- lifecycle ----------------------------------------------------------------------------

    def cancel(self, reason: str = CANCEL_REQUESTED) -> None:
        """Ask the task to stop (the engine request is aborted by the task's cleanup)."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def wait(self) -> None:
        """Until the run has ended and its final state is written."""
        await self._done.wait()

    def finish(self) -> None:
        """End every subscriber's stream, mark done, run ``on_done`` (idempotent)."""
        if self.done:
            return
        self._done.set()
        for queue in self._queues:
            queue.put_nowait(None)
        self._queues.clear()
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done()
