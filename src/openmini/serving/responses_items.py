"""Responses API items <-> the neutral chat form the Chat Completions path renders.

The Responses layer converts a conversation (stored input items, output items of the
``previous_response_id`` chain, the new input) into OpenAI chat messages, its flat
function tools into Chat Completions tools and ``text.format`` into ``response_format``
(shared/API.md sections 1 and 4), so the same template rendering, grammar and sampling
code serves both APIs.

Item mapping (Responses -> chat):

* ``message`` (user / system / developer / assistant) -> ``{role, content}``; the text of
  the parts is joined with newlines (refusal parts count as text).
* ``function_call`` -> an assistant message with ``tool_calls=[{id: call_id, type:
  "function", function: {name, arguments}}]``; consecutive calls (and a call right after
  an assistant text message) join the same assistant turn, as parallel calls do in chat.
* ``function_call_output`` -> ``{role: "tool", tool_call_id: call_id, content: output}``.
"""

from __future__ import annotations

import secrets
from typing import Any

ID_PREFIXES = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_"}


def new_id(prefix: str) -> str:
    """An OpenAI-style id: ``prefix`` + 48 random hex digits (``resp_…``, ``msg_…``)."""
    return prefix + secrets.token_hex(24)


def with_id(item: dict[str, Any]) -> dict[str, Any]:
    """A stored item: ``id`` first (a new one when the client gave none) and
    ``status: "completed"``, the shape ``input_items`` lists."""
    out = {"id": item.get("id") or new_id(ID_PREFIXES[item["type"]])}
    out.update({k: val for k, val in item.items() if k != "id"})
    out["status"] = "completed"
    return out


def item_text(item: dict[str, Any]) -> str:
    """The text of a message item (parts joined with newlines)."""
    texts = []
    for part in item.get("content") or []:
        if part.get("type") == "refusal":
            texts.append(part.get("refusal") or "")
        else:
            texts.append(part.get("text") or "")
    return "\n".join(texts)


def items_to_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Responses items (resolved, no ``item_reference``) -> OpenAI chat messages.

    See the module docstring for the mapping. Items of other types are skipped.
    """
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item["role"], "content": item_text(item)})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
    return messages


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Flat Responses function tools -> Chat Completions tools (None when there are none)."""
    if not tools:
        return None
    out = []
    for t in tools:
        fn: dict[str, Any] = {"name": t["name"]}
        for key in ("description", "parameters", "strict"):
            if t.get(key) is not None:
                fn[key] = t[key]
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(tool_choice: Any, has_tools: bool) -> Any:
    """Responses ``tool_choice`` -> Chat Completions ``tool_choice`` (None without tools)."""
    if not has_tools:
        return None
    if isinstance(tool_choice, dict):
        return {"type": "function", "function": {"name": tool_choice["name"]}}
    return tool_choice


def chat_response_format(text_format: dict[str, Any]) -> dict[str, Any] | None:
    """Responses ``text.format`` (flat) -> Chat Completions ``response_format``
    (``json_schema`` nested under ``json_schema``); None for plain text."""
    kind = text_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": text_format["name"], "schema": text_format["schema"]}
    if text_format.get("strict") is not None:
        spec["strict"] = text_format["strict"]
    if text_format.get("description") is not None:
        spec["description"] = text_format["description"]
    return {"type": "json_schema", "json_schema": spec}


def trim_orphans(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop leading ``function_call_output`` items whose call was truncated away."""
    start = 0
    while start < len(items) - 1 and items[start].get("type") == "function_call_output":
        start += 1
    return items[start:]


def remap_param(param: str | None) -> str | None:
    """A Chat Completions parameter path -> the Responses name of the same thing.

    ``messages…`` -> ``input``, ``tools[i].function.x`` -> ``tools[i].x``,
    ``tool_choice.function.name`` -> ``tool_choice.name``, ``response_format.json_schema.x``
    -> ``text.format.x``, ``max_tokens`` -> ``max_output_tokens``.
    """
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"
    if param.startswith("tools[") and ".function" in param:
        return param.replace(".function", "", 1)
    if param.startswith("tool_choice.function"):
        return "tool_choice" + param[len("tool_choice.function"):]
    if param.startswith("response_format"):
        rest = param[len("response_format"):].replace(".json_schema", "", 1)
        return "text.format" + rest
    if param in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    return param
