"""Errors of the structured-output layer."""

from __future__ import annotations


class StructuredOutputError(ValueError):
    """A schema or grammar the grammar engine cannot enforce (the request must fail closed:
    HTTP 400, never unconstrained output).

    ``str(error)`` is a message for the client (it names the unsupported feature).
    """
