"""OpenAI error objects as an exception the api layer turns into an HTTP response.

Shape and wording follow the OpenAI API (``{"error": {"message", "type", "param", "code"}}``;
see shared/API.md section 3): 400 ``invalid_request_error`` with a JSON-path ``param``,
404 ``model_not_found``, 401 auth errors, 429 ``rate_limit_exceeded``.
"""

from __future__ import annotations

from typing import Any


class OpenAIError(Exception):
    """An error the client should see as an OpenAI error body.

    Attributes:
        status: HTTP status code.
        message: human-readable text naming the parameter and the allowed values.
        type: OpenAI error type (``invalid_request_error``, ``server_error``, ...).
        param: JSON path of the offending parameter (``messages[1].content``) or None.
        code: machine-readable code (``unknown_parameter``, ...) or None.
        headers: extra response headers (``Retry-After`` for 429).
    """

    def __init__(self, message: str, *, status: int = 400,
                 type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body: all four keys always present."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def invalid_request(message: str, param: str | None = None,
                    code: str | None = None) -> OpenAIError:
    """A 400 ``invalid_request_error``."""
    return OpenAIError(message, status=400, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    """404 for a model id that is neither the served model nor one of its aliases."""
    return OpenAIError(f"The model `{model}` does not exist or you do not have access to it.",
                       status=404, param="model", code="model_not_found")


def server_error(message: str = "The server had an error while processing your request. "
                 "Sorry about that!", status: int = 500) -> OpenAIError:
    """A 5xx ``server_error`` (a bug or an engine failure, never the client's input)."""
    return OpenAIError(message, status=status, type="server_error")
