"""OpenAI chat messages -> the plain message dicts HF chat templates expect.

* ``developer`` becomes ``system`` (open models' templates know only ``system``).
* Content given as a list of text parts is joined with ``"\\n"``; ``None`` becomes ``""``.
* A tool call's ``function.arguments`` JSON string becomes a dict (templates write it with
  ``tojson``, as the models were trained).
* `fold_system_messages` moves system messages a template rejects into user text (case C10).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

#: Content part types whose ``text`` is rendered (Chat Completions and Responses API names).
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})

#: Separator between folded system text and the message it joins.
FOLD_SEPARATOR = "\n\n"


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered with the model's chat template (HTTP 400).

    Raised for template syntax and runtime errors (``raise_exception`` included), malformed
    messages and unsupported content parts. ``str(error)`` is a message for the client.
    """


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Copies of ``messages`` in the shape chat templates expect (see module docstring).

    Args:
        messages: a list of OpenAI chat message objects (``role`` + ``content`` ...).

    Raises:
        ChatTemplateError: not a list of objects with a string ``role``, or a content part
            that is not text (its location is named, e.g. ``messages[0].content[1]``).
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError("messages must be a list of message objects")
    out = []
    for i, raw in enumerate(messages):
        if not isinstance(raw, Mapping):
            raise ChatTemplateError(f"messages[{i}] must be an object")
        msg = copy.deepcopy(dict(raw))
        if not isinstance(msg.get("role"), str):
            raise ChatTemplateError(f"messages[{i}].role must be a string")
        if msg["role"] == "developer":
            msg["role"] = "system"
        msg["content"] = _content_text(msg.get("content"), i)
        if isinstance(msg.get("tool_calls"), list):
            msg["tool_calls"] = [_tool_call_for_template(tc) for tc in msg["tool_calls"]]
        out.append(msg)
    return out


def fold_system_messages(messages: list[dict[str, Any]], keep_leading: bool
                         ) -> list[dict[str, Any]] | None:
    """Move system messages into user text for templates that reject them (case C10).

    Each folded system message's text is prepended to the next user message, joined with a
    blank line. A system message with no user message after it goes to the leading system
    message (``keep_leading``; one is created when missing) or else to the last user message.

    Args:
        messages: normalized messages (string contents).
        keep_leading: keep a system message at index 0 and fold only later ones (for
            templates that allow a system message only first); False folds every one (for
            templates without a system role).

    Returns:
        A new list, or None when there is nothing to fold.
    """
    first = 1 if keep_leading and messages and messages[0]["role"] == "system" else 0
    fold = {i for i in range(first, len(messages)) if messages[i]["role"] == "system"}
    if not fold:
        return None
    result: list[dict[str, Any]] = []
    pending: list[str] = []
    for i, msg in enumerate(messages):
        if i in fold:
            pending.append(msg["content"])
            continue
        msg = dict(msg)
        if msg["role"] == "user" and pending:
            msg["content"] = _join([*pending, msg["content"]])
            pending = []
        result.append(msg)
    if pending:
        if keep_leading:
            if result and result[0]["role"] == "system":
                result[0] = {**result[0], "content": _join([result[0]["content"], *pending])}
            else:
                result.insert(0, {"role": "system", "content": _join(pending)})
        else:
            users = [i for i, m in enumerate(result) if m["role"] == "user"]
            if users:
                j = users[-1]
                result[j] = {**result[j], "content": _join([result[j]["content"], *pending])}
            else:
                result.insert(0, {"role": "user", "content": _join(pending)})
    return result


def _join(texts: list[str]) -> str:
    return FOLD_SEPARATOR.join(t for t in texts if t)


def _content_text(content: Any, index: int) -> str:
    """A message's content as one string (text parts joined with a newline)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        texts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                texts.append(part)
            elif (isinstance(part, Mapping) and part.get("type") in TEXT_PART_TYPES
                  and isinstance(part.get("text"), str)):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatTemplateError(
                    f"messages[{index}].content[{j}]: content part of type {kind!r} is not "
                    f"supported here (only text parts)")
        return "\n".join(texts)
    raise ChatTemplateError(f"messages[{index}].content must be a string or a list of parts")


def _tool_call_for_template(tool_call: Any) -> Any:
    """A tool call with ``function.arguments`` parsed from JSON text to a dict when possible."""
    if not isinstance(tool_call, Mapping):
        return tool_call
    tool_call = dict(tool_call)
    fn = tool_call.get("function")
    if isinstance(fn, Mapping):
        fn = dict(fn)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                fn["arguments"] = parsed
        tool_call["function"] = fn
    return tool_call
