"""Server-sent events and client-disconnect handling.

SSE framing follows the OpenAI streams (API.md section 2): ``data: <json>\\n\\n`` per chunk,
``data: [DONE]\\n\\n`` at the end, and ``data: {"error": {...}}\\n\\n`` (then the end of the
stream) when something fails after the stream started.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request

from openmini.serving.errors import OpenAIError, server_error

T = TypeVar("T")
logger = logging.getLogger("openmini.api")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


def encode_event(payload: dict[str, Any]) -> bytes:
    """One SSE ``data:`` event with compact JSON (UTF-8, non-ASCII kept as is)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":"),
                                  allow_nan=False).encode("utf-8") + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"


async def sse_stream(chunks: AsyncIterator[dict[str, Any]],
                     on_close: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """Encode ``chunks`` as SSE; always runs ``on_close`` (abort + bookkeeping) at the end,
    also when the client goes away and the response task is cancelled."""
    try:
        async for chunk in chunks:
            yield encode_event(chunk)
        yield DONE_EVENT
    except OpenAIError as exc:
        yield encode_event(exc.body())
    except Exception:  # a bug after the headers went out: tell the client, keep the server up
        logger.exception("stream failed")
        yield encode_event(server_error().body())
    finally:
        aclose = getattr(chunks, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            await on_close()


async def _wait_for_disconnect(request: Request) -> None:
    """Return once the ASGI server reports ``http.disconnect`` (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` while watching the connection; cancel it if the client leaves.

    Cancelling the work closes its engine stream, which aborts the engine request and
    frees its KV blocks (case C13, non-streaming and before the first SSE byte).

    Raises:
        ClientDisconnected: the client went away first (``work`` was cancelled).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task.done():
        watcher.cancel()
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - the client is gone; only cleanup matters
        pass
    request.scope.setdefault("state", {})["client_disconnected"] = True
    raise ClientDisconnected()
