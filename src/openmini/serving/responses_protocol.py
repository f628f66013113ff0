"""A validated ``POST /v1/responses`` body, as a plain dataclass (the api layer fills it).

Field names, defaults and item shapes follow the OpenAI Responses API (shared/API.md
section 4). Values are type- and range-checked when this object exists; what is left to
the serving layer is everything that needs state or the model (previous_response_id,
item references, chat-template rendering, the context window).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ResponsesRequest:
    """A checked Responses request.

    Attributes:
        model: the model id as sent.
        input: the new input items in their stored shape, without ``id`` unless the client
            gave one: ``{"type": "message", "role", "content": [parts]}`` (user / system /
            developer parts are ``input_text``; assistant parts ``output_text`` /
            ``refusal``), ``{"type": "function_call", "call_id", "name", "arguments"}``,
            ``{"type": "function_call_output", "call_id", "output"}`` and
            ``{"type": "item_reference", "id"}``. A string ``input`` is one user message.
        instructions: a system message for this response only (not carried over).
        previous_response_id: continue the conversation of this stored response.
        store: keep the response (default True).
        background: run on after the HTTP request returns (requires ``store``).
        stream: answer with server-sent events.
        tools: flat function tools ``{"type": "function", "name", "description",
            "parameters", "strict"}`` as echoed in the response.
        tool_choice: ``"none" | "auto" | "required" | {"type": "function", "name"}``.
        parallel_tool_calls: allow several calls in one response.
        text_format: ``{"type": "text"}`` | ``{"type": "json_object"}`` |
            ``{"type": "json_schema", "name", "schema", "strict", "description"?}``.
        max_output_tokens: output budget in tokens, or None (up to the context window).
        truncation: ``"disabled"`` (too long -> 400) or ``"auto"`` (drop oldest items).
        temperature / top_p: as sent, or None for the defaults (1, 1).
        metadata: up to 16 string pairs, echoed.
        user: end-user id, echoed.
        include: the ``include`` values, as sent.
        extras: other accepted parameters echoed in the response (``service_tier``,
            ``safety_identifier``, ``prompt_cache_key``, ``top_logprobs``).
    """

    model: str
    input: list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    stream: bool = False
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    text_format: dict[str, Any] = field(default_factory=lambda: {"type": "text"})
    max_output_tokens: int | None = None
    truncation: str = "disabled"
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    user: str | None = None
    include: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
