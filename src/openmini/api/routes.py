"""The HTTP endpoints: chat and text completions, models, health, metrics.

Order of checks for a generation request (API.md section 3): API key (401) -> JSON body
and schema (400) -> model id (404) -> prompt rendering and context window (400) ->
admission queue (429) -> engine. Everything before the engine happens before any byte of
a response is sent, streaming or not.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from openmini.api.admission import AdmissionControl
from openmini.api.auth import check_api_key
from openmini.api.chat_schema import parse_chat_request
from openmini.api.completions_schema import parse_completion_request
from openmini.api.metrics import CONTENT_TYPE, ServerMetrics
from openmini.api.middleware import CLIENT_CLOSED_STATUS
from openmini.api.settings import ServerSettings
from openmini.api.streaming import ClientDisconnected, sse_stream, unless_disconnected
from openmini.api.validation import parse_json_body
from openmini.engine.protocol import EngineClient
from openmini.serving.chat import ChatCompletionService
from openmini.serving.completions import CompletionService
from openmini.serving.errors import model_not_found

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIRoutes:
    """Endpoint handlers bound to one engine and one settings object.

    Args:
        engine: the (instrumented) engine client.
        settings: served model name, aliases, keys, queue size.
        metrics: the app's metrics.
        admission: the bounded waiting queue.
        system_fingerprint: reported on every completion.
    """

    def __init__(self, engine: EngineClient, settings: ServerSettings, metrics: ServerMetrics,
                 admission: AdmissionControl, system_fingerprint: str):
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.admission = admission
        name = settings.served_model_name
        self.chat = ChatCompletionService(engine, name, system_fingerprint)
        self.completions = CompletionService(engine, name, system_fingerprint)

    def register(self, app: FastAPI) -> None:
        """Add every route to ``app``."""
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.text_completions, methods=["POST"])
        app.add_api_route("/v1/models", self.list_models, methods=["GET"])
        app.add_api_route("/v1/models/{model_id:path}", self.get_model, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.metrics_text, methods=["GET"])

    # ---- helpers ----------------------------------------------------------------------------

    def _auth(self, request: Request) -> None:
        check_api_key(request.headers, self.settings.api_keys)

    def _check_model(self, model: str) -> None:
        if self.settings.resolve_model(model) is None:
            raise model_not_found(model)

    def _model_object(self, model_id: str) -> dict[str, Any]:
        """OpenAI's model object, plus ``max_model_len`` (the context window in tokens, as vLLM
        reports it; clients that do not know the field ignore it)."""
        obj: dict[str, Any] = {"id": model_id, "object": "model", "created": self.settings.created,
                               "owned_by": self.settings.owned_by}
        window = getattr(self.engine, "max_model_len", None)
        if isinstance(window, int):
            obj["max_model_len"] = window
        return obj

    async def _run(self, request: Request, stream: bool,
                   create: Callable[[], Awaitable[dict[str, Any]]],
                   start: Callable[[], Awaitable[Any]],
                   chunks: Callable[[Any], Any]) -> Response:
        """Admission, then either a JSON body or an SSE stream; aborts on disconnect."""
        self.admission.acquire()
        if not stream:
            try:
                return JSONResponse(await unless_disconnected(request, create()))
            except ClientDisconnected:
                return Response(status_code=CLIENT_CLOSED_STATUS)
            finally:
                self.admission.release()
        try:
            started = await unless_disconnected(request, start())
        except ClientDisconnected:
            self.admission.release()
            return Response(status_code=CLIENT_CLOSED_STATUS)
        except BaseException:
            self.admission.release()
            raise
        closed = False

        async def on_close() -> None:
            nonlocal closed
            if not closed:
                closed = True
                self.admission.release()
                await _close_started(started)

        return SSEResponse(sse_stream(chunks(started), on_close), on_close)

    # ---- endpoints --------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions (API.md sections 1-3)."""
        self._auth(request)
        req = parse_chat_request(parse_json_body(await request.body()))
        self._check_model(req.model)
        prep = self.chat.prepare(req)
        return await self._run(request, req.options.stream,
                               lambda: self.chat.create(prep),
                               lambda: self.chat.start(prep),
                               lambda s: self.chat.chunks(prep, s))

    async def text_completions(self, request: Request) -> Response:
        """POST /v1/completions (legacy text completions)."""
        self._auth(request)
        req = parse_completion_request(parse_json_body(await request.body()))
        self._check_model(req.model)
        prep = self.completions.prepare(req)
        return await self._run(request, req.options.stream,
                               lambda: self.completions.create(prep),
                               lambda: self.completions.start(prep),
                               lambda s: self.completions.chunks(prep, s))

    async def list_models(self, request: Request) -> dict[str, Any]:
        """GET /v1/models: the served model and its aliases."""
        self._auth(request)
        return {"object": "list",
                "data": [self._model_object(m) for m in self.settings.model_ids]}

    async def get_model(self, model_id: str, request: Request) -> dict[str, Any]:
        """GET /v1/models/{id}: the model, or 404 ``model_not_found``."""
        self._auth(request)
        self._check_model(model_id)
        return self._model_object(model_id)

    async def health(self) -> Response:
        """GET /health: 200 while the engine runs, else 503."""
        running = getattr(self.engine, "is_running", True)
        s = self.engine.stats()
        body = {"status": "ok" if running else "unavailable",
                "model": self.settings.served_model_name,
                "running": s.num_running, "waiting": s.num_waiting,
                "kv_blocks_used": s.kv_blocks_used, "kv_blocks_total": s.kv_blocks_total}
        return JSONResponse(body, status_code=200 if running else 503)

    async def metrics_text(self) -> Response:
        """GET /metrics: Prometheus text format."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that runs ``on_close`` however it ends (even when
    the client leaves before the first chunk, when the body iterator never starts)."""

    def __init__(self, content: Any, on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


async def _close_started(started: Any) -> None:
    """Close a started generation (one stream, or a list of them for several prompts)."""
    streams = started if isinstance(started, list) else [started]
    for s in streams:
        await s.aclose()

