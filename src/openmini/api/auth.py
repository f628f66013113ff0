"""Bearer API keys, with OpenAI's 401 bodies (missing key: code null; wrong key:
``invalid_api_key``)."""

from __future__ import annotations

import hmac
from typing import Mapping

from openmini.serving.errors import OpenAIError


def _mask(key: str) -> str:
    return key[:3] + "*" * 4 + key[-4:] if len(key) > 8 else "*" * len(key)


def check_api_key(headers: Mapping[str, str], api_keys: tuple[str, ...]) -> None:
    """Accept the request when no keys are configured or ``Authorization: Bearer <key>``
    names one of them (constant-time comparison).

    Raises:
        OpenAIError: 401; ``code`` null when no key was sent, ``invalid_api_key`` otherwise.
    """
    if not api_keys:
        return
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise OpenAIError(
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            status=401, code=None)
    if not any(hmac.compare_digest(token.encode(), k.encode()) for k in api_keys):
        raise OpenAIError(f"Incorrect API key provided: {_mask(token)}. Use one of the keys "
                          f"this server was started with (--api-key / OPENMINI_API_KEY).",
                          status=401, code="invalid_api_key")
