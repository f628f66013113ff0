"""Exception handlers that turn every failure into an OpenAI error body (API.md section 3).

FastAPI's 422 request-validation errors become 400 ``invalid_request_error`` with a JSON
path ``param``; unknown routes 404, wrong methods 405, each with the OpenAI body.
Unexpected exceptions are handled by ``RequestContextMiddleware`` (so that even a 500
carries ``x-request-id``).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from openmini.serving.errors import OpenAIError, invalid_request


def error_response(err: OpenAIError) -> JSONResponse:
    """The JSON response for an ``OpenAIError`` (status, body and extra headers)."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _loc_to_path(loc: tuple) -> str | None:
    """FastAPI error locations (``("body", "messages", 1, "content")``) -> a JSON path."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    path = ""
    for p in parts:
        path = f"{path}[{p}]" if isinstance(p, int) else (f"{path}.{p}" if path else str(p))
    return path or None


async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
    return error_response(exc)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    param = _loc_to_path(tuple(first.get("loc", ())))
    kind = first.get("type", "")
    if kind == "missing":
        err = invalid_request(f"Missing required parameter: '{param}'.", param=param,
                              code="missing_required_parameter")
    elif kind == "extra_forbidden":
        err = invalid_request(f"Unknown parameter: '{param}'.", param=param,
                              code="unknown_parameter")
    else:
        err = invalid_request(f"Invalid value for '{param}': {first.get('msg', 'invalid')}.",
                              param=param, code="invalid_value")
    return error_response(err)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        msg = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        msg = f"Method not allowed ({request.method} {request.url.path})"
    else:
        msg = str(exc.detail)
    err = OpenAIError(msg, status=exc.status_code,
                      type="invalid_request_error" if exc.status_code < 500 else "server_error")
    return JSONResponse(err.body(), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


def install_error_handlers(app: FastAPI) -> None:
    """Register the OpenAI-style handlers on ``app``."""
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
