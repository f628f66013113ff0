"""Per-request context as plain ASGI middleware: ``x-request-id``, access log, request
counter, and a last-resort 500 (so even a bug's response carries ``x-request-id``).

Plain ASGI (not ``BaseHTTPMiddleware``) so that streaming responses and disconnect
detection pass through untouched.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openmini.serving.errors import server_error

ACCESS_LOGGER = "openmini.access"

CLIENT_CLOSED_STATUS = 499
"""Logged (never sent) status of a request whose client went away first (nginx's code)."""


def new_request_id() -> str:
    """``req_`` + 32 hex digits, like OpenAI's ``x-request-id``."""
    return "req_" + uuid.uuid4().hex


class RequestContextMiddleware:
    """Wraps every HTTP request.

    Args:
        app: the inner ASGI app.
        count: ``(endpoint, status)`` callback for the request counter; ``endpoint`` is
            the matched route's path template, or ``"other"``.
    """

    def __init__(self, app: ASGIApp, count: Callable[[str, int], Any] | None = None):
        self.app = app
        self.count = count
        self.log = logging.getLogger(ACCESS_LOGGER)
        self.errors = logging.getLogger("openmini.api")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = new_request_id()
        scope.setdefault("state", {})["request_id"] = rid
        t0 = time.monotonic()
        status = 0
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            self.errors.exception("unhandled error in %s %s (%s)", scope.get("method"),
                                  scope.get("path"), rid)
            if not started:
                err = server_error()
                body = json.dumps(err.body()).encode()
                await send_with_id({"type": "http.response.start", "status": err.status,
                                    "headers": [(b"content-type", b"application/json"),
                                                (b"content-length", str(len(body)).encode())]})
                await send_with_id({"type": "http.response.body", "body": body})
            status = status or 500
        finally:
            if scope.get("state", {}).get("client_disconnected"):
                status = CLIENT_CLOSED_STATUS
            elapsed = time.monotonic() - t0
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            client = scope.get("client") or ("-", 0)
            self.log.info('%s "%s %s" %d %.3fs %s', client[0], scope.get("method"),
                          scope.get("path"), status, elapsed, rid)
            if self.count is not None:
                self.count(endpoint, status)
