"""The HTTP layer: OpenAI-compatible routes, request schemas, SSE, errors, auth, metrics.

``create_app(engine_client, settings)`` builds the FastAPI app; ``openmini serve`` runs it
(``openmini.api.server.serve_main``). No torch is imported here.
"""

from openmini.api.app import create_app
from openmini.api.settings import DEFAULT_MODEL_ALIASES, ServerSettings

__all__ = ["create_app", "ServerSettings", "DEFAULT_MODEL_ALIASES"]
