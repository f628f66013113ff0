"""Chat completion chunks -> Responses output items and streaming events.

The Responses layer runs the Chat Completions path in streaming mode and folds its
``chat.completion.chunk`` objects (shared/API.md section 2) into the Responses ``output``
array, emitting the event sequence of API.md section 4 on the way:

* text: ``response.output_item.added`` (message, ``content: []``) ->
  ``response.content_part.added`` -> ``response.output_text.delta``* ->
  ``response.output_text.done`` -> ``response.content_part.done`` ->
  ``response.output_item.done``;
* a function call: ``response.output_item.added`` (``function_call``, ``arguments: ""``) ->
  ``response.function_call_arguments.delta``* -> ``response.function_call_arguments.done``
  -> ``response.output_item.done``.

Every text delta carries ``logprobs`` (an empty list unless
``include: ["message.output_text.logprobs"]``), which the SDK's stream helper requires.
The same builder serves non-streaming requests (the events are simply not sent), so
streamed and non-streamed output are built by one piece of code.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from openmini.serving.responses_items import new_id

Emit = Callable[[str, dict[str, Any]], None]
"""``emit(event_type, payload)``; the payload gets ``type`` and ``sequence_number`` added."""


def responses_usage(chat_usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chat ``usage`` -> Responses ``usage`` (input/output/total tokens, cached input tokens
    from the prefix cache, ``cache_write_tokens`` 0, ``reasoning_tokens`` 0)."""
    if chat_usage is None:
        return None
    details = chat_usage.get("prompt_tokens_details") or {}
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0),
                                 "cache_write_tokens": 0},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["prompt_tokens"] + chat_usage["completion_tokens"],
    }


def _delta_logprobs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat logprob entries -> the ``output_text.delta`` shape (no ``bytes``)."""
    return [{"token": e["token"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]}
                              for t in e.get("top_logprobs") or []]} for e in entries]


class OutputBuilder:
    """Accumulates one response's output from chat chunks.

    Args:
        response: the live response object; its ``output`` list is filled in place, so a
            reader of the object sees the progress.
        emit: receives each event as it happens.

    Tool-call ids of the chat path (``call_…``) become the items' ``call_id``; each
    ``function_call`` item gets its own ``fc_…`` id.
    """

    def __init__(self, response: dict[str, Any], emit: Emit):
        self.response = response
        self.emit = emit
        self.output: list[dict[str, Any]] = response["output"]
        self.finish_reason: str | None = None
        self.chat_usage: dict[str, Any] | None = None
        self._open: dict[str, Any] | None = None  # the item receiving deltas
        self._calls: dict[int, dict[str, Any]] = {}  # chat tool-call index -> item
        self._pending_logprobs: list[dict[str, Any]] = []  # tokens without text yet

    # ---- chunks -------------------------------------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> None:
        """Fold one ``chat.completion.chunk`` in (only choice 0 exists: n is 1)."""
        if chunk.get("usage"):
            self.chat_usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            lp = choice.get("logprobs") or {}
            self._pending_logprobs.extend(lp.get("content") or [])
            text = delta.get("content")
            if text:
                self._text_delta(text)
            for tc in delta.get("tool_calls") or []:
                self._tool_call_delta(tc)
            if choice.get("finish_reason") is not None:
                self.finish_reason = choice["finish_reason"]

    def _text_delta(self, text: str) -> None:
        """A text delta with the logprobs of every token since the previous one (a token
        whose text is held back, e.g. half a UTF-8 character, has no text of its own)."""
        item = self._open
        if item is None or item["type"] != "message":
            item = self._open_message()
        part = item["content"][0]
        logprobs, self._pending_logprobs = self._pending_logprobs, []
        part["text"] += text
        part["logprobs"].extend(copy.deepcopy(logprobs))
        self.emit("response.output_text.delta", {
            "item_id": item["id"], "output_index": self.output.index(item),
            "content_index": 0, "delta": text, "logprobs": _delta_logprobs(logprobs)})

    def _tool_call_delta(self, tc: dict[str, Any]) -> None:
        fn = tc.get("function") or {}
        index = tc.get("index", 0)
        item = self._calls.get(index)
        if item is None:
            self._close_open()
            call_id = tc.get("id") or new_id("call_")
            item = {"id": new_id("fc_"), "type": "function_call", "status": "in_progress",
                    "arguments": "", "call_id": call_id, "name": fn.get("name") or ""}
            self.output.append(item)
            self._calls[index] = item
            self._open = item
            self.emit("response.output_item.added",
                      {"output_index": len(self.output) - 1, "item": copy.deepcopy(item)})
        elif item is not self._open:
            raise RuntimeError("tool-call deltas of an earlier call arrived after a later one")
        args = fn.get("arguments") or ""
        if args:
            item["arguments"] += args
            self.emit("response.function_call_arguments.delta", {
                "item_id": item["id"], "output_index": self.output.index(item),
                "delta": args})

    # ---- items --------------------------------------------------------------------------------

    def _open_message(self) -> dict[str, Any]:
        self._close_open()
        item = {"id": new_id("msg_"), "type": "message", "status": "in_progress",
                "content": [], "role": "assistant"}
        self.output.append(item)
        self._open = item
        index = len(self.output) - 1
        self.emit("response.output_item.added", {"output_index": index,
                                                 "item": copy.deepcopy(item)})
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        item["content"].append(part)
        self.emit("response.content_part.added", {
            "item_id": item["id"], "output_index": index, "content_index": 0,
            "part": {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}})
        return item

    def _close_open(self, status: str = "completed") -> None:
        item, self._open = self._open, None
        if item is None:
            return
        index = self.output.index(item)
        item["status"] = status
        if item["type"] == "message":
            part = item["content"][0]
            part["logprobs"].extend(self._pending_logprobs)
            self._pending_logprobs = []
            self.emit("response.output_text.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0,
                "text": part["text"], "logprobs": _delta_logprobs(part["logprobs"])})
            self.emit("response.content_part.done", {
                "item_id": item["id"], "output_index": index, "content_index": 0,
                "part": copy.deepcopy(part)})
        else:
            self.emit("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": index, "name": item["name"],
                "arguments": item["arguments"]})
        self.emit("response.output_item.done", {"output_index": index,
                                                "item": copy.deepcopy(item)})

    # ---- end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        """Close the open item and set ``status``, ``incomplete_details``, ``usage`` and
        ``completed_at`` of the response. An empty generation still yields one (empty)
        assistant message, so ``output_text`` is defined."""
        truncated = self.finish_reason == "length"
        if not self.output:
            self._open_message()
        self._close_open("incomplete" if truncated else "completed")
        r = self.response
        r["usage"] = responses_usage(self.chat_usage)
        if truncated:
            r["status"] = "incomplete"
            r["incomplete_details"] = {"reason": "max_output_tokens"}
        else:
            r["status"] = "completed"

    def abandon(self, status: str) -> None:
        """End early (cancel or failure): the item being written is closed as
        ``incomplete`` (with its done events) and the response gets ``status``."""
        self._close_open("incomplete")
        self.response["status"] = status
