"""Validated OpenAI requests, as plain dataclasses (the api layer fills them from JSON).

Field names and defaults follow the OpenAI API (shared/API.md section 1 for Chat
Completions; the legacy ``/v1/completions`` request for ``CompletionRequest``). Values are
already type- and range-checked when these objects exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationOptions:
    """Sampling and stopping options shared by both endpoints.

    Attributes:
        max_tokens: output budget in tokens; None means up to the context window.
        temperature: 0..2 (OpenAI default 1).
        top_p: 0..1 (0 means keep only the most likely token).
        n: completions per prompt, 1..128.
        stop: up to 4 strings; the returned text never contains them.
        presence_penalty / frequency_penalty: -2..2.
        logit_bias: token id -> bias in -100..100.
        logprobs: None (not requested) or how many alternatives per position (0..20).
        seed: sampler seed or None.
        stream: answer as server-sent events.
        include_usage: (stream only) send a final chunk with the usage.
    """

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False


@dataclass
class ChatCompletionRequest:
    """A checked ``POST /v1/chat/completions`` body.

    Attributes:
        model: the model id as sent (an alias or the served name).
        messages: OpenAI messages normalized for the chat template: ``role`` (``developer``
            is kept; the handler maps it), ``content`` as a string (text parts joined)
            or None, plus ``name`` / ``tool_calls`` / ``tool_call_id`` where given.
        options: sampling and stopping.
        tools: function tools as sent (None when absent).
        tool_choice: ``"none" | "auto" | "required" | {...}`` or None when absent.
        parallel_tool_calls: as sent, or None.
        response_format: the ``response_format`` object, or None.
        extras: accepted-but-ignored parameters (``store``, ``metadata``, ``user``, ...).
    """

    model: str
    messages: list[dict[str, Any]]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompletionRequest:
    """A checked legacy ``POST /v1/completions`` body.

    Attributes:
        model: the model id as sent.
        prompts: one entry per prompt: a string, or a list of token ids.
        options: sampling and stopping (``logprobs`` here is 0..5 alternatives).
        echo: prepend the prompt to the returned text.
        extras: accepted-but-ignored parameters (``user``, ...).
    """

    model: str
    prompts: list[str | list[int]]
    options: GenerationOptions = field(default_factory=GenerationOptions)
    echo: bool = False
    extras: dict[str, Any] = field(default_factory=dict)
