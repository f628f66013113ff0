"""``create_app(engine_client, settings) -> FastAPI``: the OpenAI-compatible HTTP app."""

from __future__ import annotations

import hashlib

from fastapi import FastAPI

import openmini
from openmini.api.admission import AdmissionControl
from openmini.api.errors import install_error_handlers
from openmini.api.metrics import InstrumentedEngineClient, ServerMetrics
from openmini.api.middleware import RequestContextMiddleware
from openmini.api.responses_routes import ResponsesRoutes
from openmini.api.routes import OpenAIRoutes
from openmini.api.settings import ServerSettings
from openmini.engine.protocol import EngineClient
from openmini.store import ResponseStore, SQLiteResponseStore


def system_fingerprint(model_name: str) -> str:
    """``fp_`` + 10 hex digits of (package version, model name): changes when either does."""
    digest = hashlib.sha256(f"{openmini.__version__}|{model_name}".encode()).hexdigest()
    return "fp_" + digest[:10]


def create_app(engine_client: EngineClient, settings: ServerSettings,
               store: ResponseStore | None = None) -> FastAPI:
    """Build the app around an engine client.

    The app does not own the engine or the store: whoever created them closes them
    (``serve_main`` does so after uvicorn has stopped). ``app.state`` exposes ``engine``
    (the instrumented client), ``settings``, ``metrics``, ``admission`` and
    ``response_store``.

    Args:
        engine_client: anything implementing ``openmini.engine.protocol.EngineClient``.
        settings: model name/aliases, API keys and queue limits.
        store: where Responses API state persists; None keeps it in memory (an SQLite
            ``:memory:`` database that lives as long as the app).
    """
    app = FastAPI(title="OpenMini", version=openmini.__version__, docs_url=None,
                  redoc_url=None, openapi_url=None)
    capacity = (None if settings.max_queue is None
                else settings.max_num_seqs + settings.max_queue)
    admission = AdmissionControl(capacity, settings.retry_after_s)
    metrics = ServerMetrics(engine_client.stats, lambda: admission.in_flight)
    engine = InstrumentedEngineClient(engine_client, metrics)
    routes = OpenAIRoutes(engine, settings, metrics, admission,
                          system_fingerprint(settings.served_model_name))
    routes.register(app)
    store = store if store is not None else SQLiteResponseStore(":memory:")
    ResponsesRoutes(engine, settings, admission, store,
                    system_fingerprint(settings.served_model_name)).register(app)
    install_error_handlers(app)
    app.add_middleware(RequestContextMiddleware,
                       count=lambda endpoint, status: metrics.requests.labels(
                           endpoint, str(status)).inc())
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.admission = admission
    app.state.response_store = store
    return app
