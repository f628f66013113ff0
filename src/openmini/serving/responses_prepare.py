"""A Responses request -> the conversation the model sees -> a prepared chat request.

Steps (shared/API.md section 4):

1. Context: the stored input items of ``previous_response_id`` plus its output items
   (messages and function calls), then the new input with ids assigned and
   ``item_reference`` items resolved from the store. Unknown previous id -> 400
   ``previous_response_not_found`` (C18); an id that repeats one of the context -> 400.
2. The neutral chat form (``responses_items``): an ``instructions`` system message (this
   response only, never carried over), the items as chat messages, tools / tool_choice /
   ``text.format`` in their Chat Completions shapes, sampling options.
3. ``ChatCompletionService.prepare`` renders the template, counts tokens and checks the
   window. With ``truncation: "auto"`` the fewest oldest items are dropped until it fits;
   with ``"disabled"`` an overflow is 400 ``context_length_exceeded`` (param ``input``).

Chat-path errors are renamed into Responses terms (``messages`` -> ``input``,
``response_format…`` -> ``text.format…``, ``tools[i].function.x`` -> ``tools[i].x``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

from openmini.serving.chat import ChatCompletionService, PreparedChat
from openmini.serving.errors import OpenAIError, invalid_request
from openmini.serving.protocol import ChatCompletionRequest, GenerationOptions
from openmini.serving.responses_items import (
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    items_to_messages,
    new_id,
    remap_param,
    trim_orphans,
    with_id,
)
from openmini.serving.responses_protocol import ResponsesRequest
from openmini.store.base import UNFINISHED_STATUSES, ResponseStore

LOGPROBS_INCLUDE = "message.output_text.logprobs"


@dataclass
class PreparedResponse:
    """A Responses request ready to run.

    Attributes:
        request: the validated request.
        response: the response object to fill (``status`` in_progress or queued).
        input_items: everything the model sees besides instructions, with ids (stored as
            the response's input items, before any truncation).
        chat: the prepared chat request (prompt token ids, sampling parameters).
        dropped_items: oldest items left out by ``truncation: "auto"``.
    """

    request: ResponsesRequest
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    chat: PreparedChat
    dropped_items: int = 0


def prepare_response(req: ResponsesRequest, store: ResponseStore,
                     chat: ChatCompletionService, model_name: str) -> PreparedResponse:
    """Rebuild the conversation, render it and check the window (no engine work yet).

    Raises:
        OpenAIError: 400 ``previous_response_not_found``; 400 for an unknown or duplicate
            item id or a previous response still running; 400 ``context_length_exceeded``
            (param ``input``) with ``truncation: "disabled"``, or when even the newest item
            alone does not fit; the chat path's 400s (tools, formats, sampling values) with
            Responses parameter names.
    """
    items = conversation_items(req, store)
    prepared, dropped = fit_window(req, items, chat)
    status = "queued" if req.background else "in_progress"
    response = response_object(new_id("resp_"), req, status, model_name)
    return PreparedResponse(req, response, items, prepared, dropped)


def conversation_items(req: ResponsesRequest, store: ResponseStore) -> list[dict[str, Any]]:
    """Step 1 of the module docstring: the chain's items, then the new input."""
    items: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        prev = store.get(req.previous_response_id)
        if prev is None:
            raise OpenAIError(f"Previous response with id '{req.previous_response_id}' not "
                              f"found.", param="previous_response_id",
                              code="previous_response_not_found")
        if prev["status"] in UNFINISHED_STATUSES:
            raise invalid_request(f"Previous response with id '{prev['id']}' is still "
                                  f"{prev['status']}; wait until it has finished.",
                                  param="previous_response_id", code="invalid_value")
        items = store.input_items(prev["id"]) or []
        items += [copy.deepcopy(o) for o in prev.get("output") or []
                  if o.get("type") in ("message", "function_call")]
    seen = {item["id"] for item in items}
    for i, raw in enumerate(req.input):
        if raw["type"] == "item_reference":
            item = store.find_item(raw["id"])
            if item is None:
                raise invalid_request(f"Item with id '{raw['id']}' not found.",
                                      param=f"input[{i}].id", code="invalid_value")
        else:
            item = with_id(raw)
        if item["id"] in seen:
            raise invalid_request(f"Duplicate item found with id {item['id']}. Remove "
                                  f"duplicate items from your input and try again.",
                                  param=f"input[{i}]", code="invalid_value")
        seen.add(item["id"])
        items.append(item)
    return items


def chat_request(req: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    """Step 2: the neutral chat form of the request over ``items`` (always streamed with
    usage, so one code path folds chunks into output for every mode)."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    messages += items_to_messages(items)
    logprobs = None
    if LOGPROBS_INCLUDE in req.include:
        logprobs = req.extras.get("top_logprobs") or 0
    opts = GenerationOptions(
        max_tokens=req.max_output_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        logprobs=logprobs, stream=True, include_usage=True)
    tools = chat_tools(req.tools)
    return ChatCompletionRequest(
        model=req.model, messages=messages, options=opts, tools=tools,
        tool_choice=chat_tool_choice(req.tool_choice, tools is not None),
        parallel_tool_calls=req.parallel_tool_calls if tools else None,
        response_format=chat_response_format(req.text_format), extras={"store": False})


def _prepare_chat(req: ResponsesRequest, items: list[dict[str, Any]],
                  chat: ChatCompletionService) -> PreparedChat:
    try:
        return chat.prepare(chat_request(req, items))
    except OpenAIError as exc:
        raise as_responses_error(exc) from exc


def fit_window(req: ResponsesRequest, items: list[dict[str, Any]],
               chat: ChatCompletionService) -> tuple[PreparedChat, int]:
    """Step 3: prepare the chat request; with ``truncation: "auto"`` drop the fewest oldest
    items that make it fit (binary search: fewer items never render longer).

    Returns:
        The prepared chat request and how many items were dropped.
    """
    try:
        return _prepare_chat(req, items, chat), 0
    except OpenAIError as exc:
        if exc.code != "context_length_exceeded" or req.truncation != "auto":
            raise
        error = exc
    best: tuple[PreparedChat, int] | None = None
    lo, hi = 1, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            best = (_prepare_chat(req, trim_orphans(items[mid:]), chat), mid)
            hi = mid - 1
        except OpenAIError as exc:
            if exc.code != "context_length_exceeded":
                raise
            error = exc
            lo = mid + 1
    if best is None:
        raise error
    return best


def response_object(response_id: str, req: ResponsesRequest, status: str,
                    model_name: str) -> dict[str, Any]:
    """The response object before generation (the field list of API.md section 4 and the
    SDK's ``Response`` model): request settings echoed, ``output`` empty, ``usage`` null."""
    extras = req.extras
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "status": status, "background": req.background, "completed_at": None,
        "error": None, "incomplete_details": None, "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "max_tool_calls": extras.get("max_tool_calls"), "model": model_name,
        "output": [], "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "prompt_cache_key": extras.get("prompt_cache_key"),
        "reasoning": {"effort": None, "summary": None},
        "safety_identifier": extras.get("safety_identifier"),
        "service_tier": "default", "store": req.store,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": {"format": copy.deepcopy(req.text_format),
                 "verbosity": extras.get("verbosity", "medium")},
        "tool_choice": copy.deepcopy(req.tool_choice), "tools": copy.deepcopy(req.tools),
        "top_logprobs": extras.get("top_logprobs", 0),
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": req.truncation, "usage": None, "user": req.user,
        "metadata": dict(req.metadata),
    }


def as_responses_error(exc: OpenAIError) -> OpenAIError:
    """A chat-path error in Responses terms: ``param`` renamed (``remap_param``) and the
    same names replaced in the message."""
    param = remap_param(exc.param)
    message = exc.message
    if exc.param and param and exc.param != param and not exc.param.startswith("messages"):
        message = message.replace(exc.param, param)
    for old, new in (("in the messages", "in the input"), ("your messages", "your input"),
                     ("of the messages", "of the input"), ("'messages'", "'input'"),
                     ("response_format", "text.format")):
        message = message.replace(old, new)
    return OpenAIError(message, status=exc.status, type=exc.type, param=param,
                       code=exc.code, headers=exc.headers)
