"""The ``/v1/responses`` endpoints (shared/API.md section 4).

Checks run in the chat path's order: API key (401) -> JSON body and schema (400) -> model
id (404) -> conversation rebuild, rendering and context window (400) -> admission queue
(429) -> engine. Streams use the Responses SSE framing ``event: <type>\\ndata: <json>\\n\\n``
with no ``[DONE]`` sentinel.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from openmini.api import validation as v
from openmini.api.admission import AdmissionControl
from openmini.api.auth import check_api_key
from openmini.api.middleware import CLIENT_CLOSED_STATUS
from openmini.api.responses_schema import parse_responses_request
from openmini.api.routes import SSEResponse
from openmini.api.settings import ServerSettings
from openmini.api.streaming import ClientDisconnected, unless_disconnected
from openmini.api.validation import parse_json_body
from openmini.engine.protocol import EngineClient
from openmini.serving.errors import OpenAIError, invalid_request, model_not_found, server_error
from openmini.serving.responses import ResponsesService
from openmini.serving.responses_run import ResponseRun
from openmini.store.base import ResponseStore

logger = logging.getLogger("openmini.api")

INPUT_ITEMS_QUERY = frozenset({"limit", "order", "after", "include", "include[]"})
RETRIEVE_QUERY = frozenset({"include", "include[]", "include_obfuscation", "stream",
                            "starting_after"})


def encode_response_event(event: dict[str, Any]) -> bytes:
    """One Responses SSE event: ``event: <type>`` and ``data: <compact JSON>``."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode("utf-8")


async def response_sse(events: AsyncIterator[dict[str, Any]],
                       on_close: Callable[[], Awaitable[None]]) -> AsyncIterator[bytes]:
    """Encode events; a bug after the headers went out becomes an ``error`` event."""
    seq = -1
    try:
        async for event in events:
            seq = event["sequence_number"]
            yield encode_response_event(event)
    except Exception as exc:  # noqa: BLE001 - keep the server up, tell the client
        logger.exception("response stream failed")
        err = exc if isinstance(exc, OpenAIError) else server_error()
        yield encode_response_event({"type": "error", "sequence_number": seq + 1,
                                     "code": err.code or err.type, "message": err.message,
                                     "param": err.param})
    finally:
        try:
            await events.aclose()
        finally:
            await on_close()


class ResponsesRoutes:
    """Endpoint handlers for the Responses API.

    Construction marks responses an earlier server process left unfinished as failed
    (``ResponsesService.recover``).

    Args:
        engine: the (instrumented) engine client.
        settings: served model name, aliases, keys.
        admission: the bounded waiting queue shared with the chat endpoints.
        store: where responses persist.
        system_fingerprint: handed to the chat path.
    """

    def __init__(self, engine: EngineClient, settings: ServerSettings,
                 admission: AdmissionControl, store: ResponseStore, system_fingerprint: str):
        self.settings = settings
        self.admission = admission
        self.store = store
        self.service = ResponsesService(engine, settings.served_model_name,
                                        system_fingerprint, store)
        self.service.recover()

    def register(self, app: FastAPI) -> None:
        """Add the routes to ``app``."""
        app.add_api_route("/v1/responses", self.create, methods=["POST"])
        app.add_api_route("/v1/responses/{response_id}", self.retrieve, methods=["GET"])
        app.add_api_route("/v1/responses/{response_id}", self.delete, methods=["DELETE"])
        app.add_api_route("/v1/responses/{response_id}/input_items", self.input_items,
                          methods=["GET"])
        app.add_api_route("/v1/responses/{response_id}/cancel", self.cancel, methods=["POST"])

    def _auth(self, request: Request) -> None:
        check_api_key(request.headers, self.settings.api_keys)

    # ---- POST /v1/responses -------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        """POST /v1/responses: foreground (JSON or SSE) or background (``queued``)."""
        self._auth(request)
        req = parse_responses_request(parse_json_body(await request.body()))
        if self.settings.resolve_model(req.model) is None:
            raise model_not_found(req.model)
        prep = self.service.prepare(req)
        self.admission.acquire()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admission.release()

        try:
            if req.background:
                run, queue = self.service.start_background(prep, release, req.stream)
                if queue is None:
                    return JSONResponse(run.snapshot())
                return self._stream(run, queue, cancel_on_close=False)
            if not req.stream:
                try:
                    return JSONResponse(await unless_disconnected(
                        request, self.service.create(prep, release)))
                except ClientDisconnected:
                    return Response(status_code=CLIENT_CLOSED_STATUS)
            try:
                run, queue = await unless_disconnected(
                    request, self.service.start(prep, release, subscribe=True))
            except ClientDisconnected:
                release()
                return Response(status_code=CLIENT_CLOSED_STATUS)
            return self._stream(run, queue, cancel_on_close=True)
        except BaseException:
            release()
            raise

    def _stream(self, run: ResponseRun, queue: Any, cancel_on_close: bool) -> Response:
        events = self.service.events(run, queue, cancel_on_close)

        async def on_close() -> None:  # also when the client left before the first byte
            await events.aclose()
            run.unsubscribe(queue)
            if cancel_on_close and not run.done:
                run.cancel()

        return SSEResponse(response_sse(events, on_close), on_close)

    # ---- stored responses ---------------------------------------------------------------------

    async def retrieve(self, response_id: str, request: Request) -> dict[str, Any]:
        """GET /v1/responses/{id}: the response (live progress while it runs), or 404."""
        self._auth(request)
        query = request.query_params
        v.check_keys(dict(query), RETRIEVE_QUERY)
        if query.get("stream", "false").lower() == "true":
            raise invalid_request("Streaming a stored response ('stream=true') is not "
                                  "supported by this server.", param="stream",
                                  code="unsupported_parameter")
        return self.service.retrieve(response_id)

    async def delete(self, response_id: str, request: Request) -> dict[str, Any]:
        """DELETE /v1/responses/{id}: ``{id, object: "response", deleted: true}``, or 404."""
        self._auth(request)
        return await self.service.delete(response_id)

    async def cancel(self, response_id: str, request: Request) -> dict[str, Any]:
        """POST /v1/responses/{id}/cancel: stop a background response."""
        self._auth(request)
        return await self.service.cancel(response_id)

    async def input_items(self, response_id: str, request: Request) -> dict[str, Any]:
        """GET /v1/responses/{id}/input_items?limit=&order=&after= (a cursor page)."""
        self._auth(request)
        query = request.query_params
        v.check_keys(dict(query), INPUT_ITEMS_QUERY)
        limit = 20
        if "limit" in query:
            try:
                limit = int(query["limit"])
            except ValueError:
                raise v.invalid_type("limit", "an integer", query["limit"]) from None
            v.as_int(limit, "limit", 1, 100)
        order = v.as_enum(query.get("order", "desc"), "order", ("asc", "desc"))
        return self.service.input_items(response_id, limit, order, query.get("after"))
