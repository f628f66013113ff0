"""``POST /v1/responses`` body -> ``ResponsesRequest`` (OpenAI schema checks).

Follows ``S:CreateResponse`` of the OpenAI spec (shared/API.md section 4). Like the chat
schema, unknown parameters at any depth get 400 ``unknown_parameter``; parameters that
select features this server lacks (built-in tools, reasoning effort, conversations, prompt
templates, image and file input) get a 400 naming the parameter instead of being ignored.
Every error's ``param`` is the JSON path of the offending value (``input[2].content[0]``).
"""

from __future__ import annotations

import re
from typing import Any

from openmini.api import validation as v
from openmini.api.chat_schema import SERVICE_TIERS, parse_metadata
from openmini.serving.errors import invalid_request
from openmini.serving.responses_protocol import ResponsesRequest

MAX_OUTPUT_TOKENS = 32768
"""gpt-4.1-mini's output cap (API.md section 7)."""

MIN_OUTPUT_TOKENS = 16
"""OpenAI's lower bound for ``max_output_tokens``."""

RESPONSE_PARAMETERS = frozenset({
    "model", "input", "instructions", "previous_response_id", "store", "background",
    "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls", "text",
    "max_output_tokens", "max_tool_calls", "truncation", "temperature", "top_p",
    "top_logprobs", "metadata", "user", "include", "service_tier", "safety_identifier",
    "prompt_cache_key", "prompt_cache_retention", "reasoning", "conversation", "prompt",
})
"""Every top-level parameter of the Responses create request."""

INCLUDABLE = ("file_search_call.results", "web_search_call.results",
              "web_search_call.action.sources", "message.input_image.image_url",
              "computer_call_output.output.image_url", "code_interpreter_call.outputs",
              "reasoning.encrypted_content", "message.output_text.logprobs")

ROLES = ("user", "assistant", "system", "developer")
ITEM_TYPES = ("message", "function_call", "function_call_output", "item_reference")
_UNSUPPORTED_ITEM_TYPES = ("reasoning", "file_search_call", "web_search_call",
                           "computer_call", "computer_call_output", "image_generation_call",
                           "code_interpreter_call", "local_shell_call",
                           "local_shell_call_output", "mcp_list_tools", "mcp_approval_request",
                           "mcp_approval_response", "mcp_call", "custom_tool_call",
                           "custom_tool_call_output", "shell_call", "shell_call_output",
                           "apply_patch_call", "apply_patch_call_output", "compaction")
_INPUT_PART_TYPES = ("input_text", "input_image", "input_file", "input_audio")
_ASSISTANT_PART_TYPES = ("output_text", "refusal", "input_text")
_ITEM_STATUSES = ("in_progress", "completed", "incomplete")
_FUNCTION_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_UNSUPPORTED_FEATURES = {
    "conversation": "Conversations are not supported by this server; use "
                    "'previous_response_id' to continue a conversation.",
    "prompt": "Prompt templates ('prompt') are not supported by this server.",
}


def parse_responses_request(body: dict[str, Any]) -> ResponsesRequest:
    """Check a parsed JSON body and build the request.

    Raises:
        OpenAIError: 400 with ``param`` set to the JSON path of the first problem.
    """
    v.check_keys(body, RESPONSE_PARAMETERS)
    model = v.as_string(v.require(body, "model"), "model")
    for key, msg in _UNSUPPORTED_FEATURES.items():
        if body.get(key) is not None:
            raise invalid_request(msg, param=key, code="unsupported_parameter")
    items = parse_input(v.require(body, "input"))
    req = ResponsesRequest(model=model, input=items)
    if body.get("instructions") is not None:
        req.instructions = v.as_string(body["instructions"], "instructions")
    if body.get("previous_response_id") is not None:
        req.previous_response_id = v.as_string(body["previous_response_id"],
                                               "previous_response_id")
    for key in ("store", "background", "stream", "parallel_tool_calls"):
        if body.get(key) is not None:
            setattr(req, key, v.as_bool(body[key], key))
    if req.background and not req.store:
        raise invalid_request("Background mode requires 'store' to be true.",
                              param="background", code="invalid_value")
    _parse_stream_options(body, req.stream)
    req.tools = parse_tools(body.get("tools"))
    req.tool_choice = parse_tool_choice(body.get("tool_choice"), req.tools)
    req.text_format, verbosity = parse_text(body.get("text"))
    if verbosity is not None:
        req.extras["verbosity"] = verbosity
    if body.get("max_output_tokens") is not None:
        req.max_output_tokens = v.as_int(body["max_output_tokens"], "max_output_tokens",
                                         MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)
    if body.get("max_tool_calls") is not None:
        req.extras["max_tool_calls"] = v.as_int(body["max_tool_calls"], "max_tool_calls", 1)
    if body.get("truncation") is not None:
        req.truncation = v.as_enum(body["truncation"], "truncation", ("auto", "disabled"))
    if body.get("temperature") is not None:
        req.temperature = v.as_number(body["temperature"], "temperature", 0, 2)
    if body.get("top_p") is not None:
        req.top_p = v.as_number(body["top_p"], "top_p", 0, 1)
    if body.get("top_logprobs") is not None:
        req.extras["top_logprobs"] = v.as_int(body["top_logprobs"], "top_logprobs", 0, 20)
    if body.get("metadata") is not None:
        req.metadata = parse_metadata(body["metadata"])
    if body.get("user") is not None:
        req.user = v.as_string(body["user"], "user", 512)
    if body.get("include") is not None:
        req.include = [v.as_enum(x, f"include[{i}]", INCLUDABLE)
                       for i, x in enumerate(v.as_array(body["include"], "include"))]
    for key, max_len in (("safety_identifier", 64), ("prompt_cache_key", 512)):
        if body.get(key) is not None:
            req.extras[key] = v.as_string(body[key], key, max_len)
    if body.get("service_tier") is not None:
        req.extras["service_tier"] = v.as_enum(body["service_tier"], "service_tier",
                                               SERVICE_TIERS)
    if body.get("prompt_cache_retention") is not None:
        req.extras["prompt_cache_retention"] = v.as_enum(
            body["prompt_cache_retention"], "prompt_cache_retention", ("in_memory", "24h"))
    _check_reasoning(body.get("reasoning"))
    return req


# ---- input items --------------------------------------------------------------------------


def parse_input(value: Any) -> list[dict[str, Any]]:
    """``input`` (a string or an array of items) -> items in their stored shape.

    Raises:
        OpenAIError: 400 naming the item or part (``input[1].content[0].type``).
    """
    if isinstance(value, str):
        return [{"type": "message", "role": "user",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise v.invalid_type("input", "a string or an array of input items", value)
    items = []
    for i, raw in enumerate(v.as_array(value, "input", min_len=1)):
        path = f"input[{i}]"
        item = v.as_object(raw, path)
        kind = item.get("type")
        if kind is None:
            kind = "message" if "role" in item else ("item_reference" if "id" in item
                                                      else None)
            if kind is None:
                raise v.missing(f"{path}.type")
        if not isinstance(kind, str):
            raise v.invalid_type(f"{path}.type", "a string", kind)
        if kind in _UNSUPPORTED_ITEM_TYPES:
            raise invalid_request(f"Invalid value for '{path}.type': input items of type "
                                  f"'{kind}' are not supported by this server.",
                                  param=f"{path}.type", code="unsupported_value")
        v.as_enum(kind, f"{path}.type", ITEM_TYPES)
        items.append(_ITEM_PARSERS[kind](item, path))
    return items


def _optional_id(item: dict[str, Any], path: str, out: dict[str, Any]) -> dict[str, Any]:
    if item.get("id") is not None:
        out["id"] = v.as_string(item["id"], f"{path}.id", 128)
    if item.get("status") is not None:
        v.as_enum(item["status"], f"{path}.status", _ITEM_STATUSES)
    return out


def _parse_message(item: dict[str, Any], path: str) -> dict[str, Any]:
    v.check_keys(item, {"type", "role", "content", "id", "status", "phase"}, path)
    role = v.as_enum(v.require(item, "role", path), f"{path}.role", ROLES)
    content = v.require(item, "content", path)
    cpath = f"{path}.content"
    if isinstance(content, str):
        parts = [{"type": "input_text", "text": content}]
    elif isinstance(content, list):
        parts = [_parse_part(v.as_object(p, f"{cpath}[{j}]"), f"{cpath}[{j}]", role)
                 for j, p in enumerate(v.as_array(content, cpath, min_len=1))]
    else:
        raise v.invalid_type(cpath, "a string or an array of content parts", content)
    if role == "assistant":
        parts = [p if p["type"] == "refusal" else
                 {"type": "output_text", "text": p["text"], "annotations": [], "logprobs": []}
                 for p in parts]
    if item.get("phase") is not None:
        v.as_enum(item["phase"], f"{path}.phase", ("commentary", "final_answer"))
    return _optional_id(item, path, {"type": "message", "role": role, "content": parts})


def _parse_part(part: dict[str, Any], path: str, role: str) -> dict[str, Any]:
    allowed = _ASSISTANT_PART_TYPES if role == "assistant" else _INPUT_PART_TYPES
    kind = v.as_enum(v.require(part, "type", path), f"{path}.type", allowed)
    if kind == "input_text":
        v.check_keys(part, {"type", "text", "prompt_cache_breakpoint"}, path)
        return {"type": "input_text", "text": v.as_string(v.require(part, "text", path),
                                                          f"{path}.text")}
    if kind == "output_text":
        v.check_keys(part, {"type", "text", "annotations", "logprobs"}, path)
        return {"type": "output_text",
                "text": v.as_string(v.require(part, "text", path), f"{path}.text")}
    if kind == "refusal":
        v.check_keys(part, {"type", "refusal"}, path)
        return {"type": "refusal", "refusal": v.as_string(v.require(part, "refusal", path),
                                                          f"{path}.refusal")}
    what = {"input_image": "Image", "input_file": "File", "input_audio": "Audio"}[kind]
    raise invalid_request(f"Invalid content part '{path}': {what} input is not supported by "
                          f"this model (it reads text only).", param=path,
                          code="unsupported_value")


def _parse_function_call(item: dict[str, Any], path: str) -> dict[str, Any]:
    v.check_keys(item, {"type", "id", "call_id", "name", "arguments", "status", "namespace"},
                 path)
    out = {"type": "function_call",
           "call_id": v.as_string(v.require(item, "call_id", path), f"{path}.call_id", 128),
           "name": v.as_string(v.require(item, "name", path), f"{path}.name"),
           "arguments": v.as_string(v.require(item, "arguments", path), f"{path}.arguments")}
    return _optional_id(item, path, out)


def _parse_function_call_output(item: dict[str, Any], path: str) -> dict[str, Any]:
    v.check_keys(item, {"type", "id", "call_id", "output", "status"}, path)
    call_id = v.as_string(v.require(item, "call_id", path), f"{path}.call_id", 128)
    output = item.get("output")
    opath = f"{path}.output"
    if output is None:
        raise v.missing(opath)
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(v.as_array(output, opath)):
            ppath = f"{opath}[{j}]"
            p = _parse_part(v.as_object(part, ppath), ppath, "user")
            texts.append(p["text"])
        output = "\n".join(texts)
    else:
        output = v.as_string(output, opath)
    return _optional_id(item, path, {"type": "function_call_output", "call_id": call_id,
                                     "output": output})


def _parse_item_reference(item: dict[str, Any], path: str) -> dict[str, Any]:
    v.check_keys(item, {"type", "id"}, path)
    return {"type": "item_reference",
            "id": v.as_string(v.require(item, "id", path), f"{path}.id", 128)}


_ITEM_PARSERS = {"message": _parse_message, "function_call": _parse_function_call,
                 "function_call_output": _parse_function_call_output,
                 "item_reference": _parse_item_reference}


# ---- tools, tool_choice, text.format ------------------------------------------------------


def parse_tools(value: Any) -> list[dict[str, Any]]:
    """``tools``: flat function tools -> their echoed shape (name, description,
    parameters, strict); other tool types get 400 ``unsupported_value``."""
    if value is None:
        return []
    tools = []
    names: set[str] = set()
    for i, raw in enumerate(v.as_array(value, "tools", 0, 128)):
        path = f"tools[{i}]"
        tool = v.as_object(raw, path)
        kind = v.as_string(v.require(tool, "type", path), f"{path}.type")
        if kind != "function":
            raise invalid_request(f"Invalid value for '{path}.type': tools of type '{kind}' are "
                                  f"not supported by this server; only 'function' tools are.",
                                  param=f"{path}.type", code="unsupported_value")
        v.check_keys(tool, {"type", "name", "description", "parameters", "strict",
                            "defer_loading"}, path)
        name = v.as_string(v.require(tool, "name", path), f"{path}.name")
        if not _FUNCTION_NAME.match(name):
            raise invalid_request(f"Invalid '{path}.name': string does not match pattern. "
                                  f"Expected a string that matches the pattern "
                                  f"'^[a-zA-Z0-9_-]+$' (at most 64 characters).",
                                  param=f"{path}.name", code="invalid_value")
        if name in names:
            raise invalid_request(f"Invalid '{path}.name': duplicate function name '{name}'.",
                                  param=f"{path}.name", code="invalid_value")
        names.add(name)
        out: dict[str, Any] = {"type": "function", "name": name, "description": None,
                               "parameters": None, "strict": None}
        if tool.get("description") is not None:
            out["description"] = v.as_string(tool["description"], f"{path}.description")
        if tool.get("parameters") is not None:
            out["parameters"] = v.as_object(tool["parameters"], f"{path}.parameters")
        if tool.get("strict") is not None:
            out["strict"] = v.as_bool(tool["strict"], f"{path}.strict")
        if tool.get("defer_loading") is not None:
            v.as_bool(tool["defer_loading"], f"{path}.defer_loading")
        tools.append(out)
    return tools


def parse_tool_choice(value: Any, tools: list[dict[str, Any]]) -> Any:
    """``tool_choice`` (default ``"auto"``): a mode string or ``{type: function, name}``."""
    if value is None:
        return "auto"
    if isinstance(value, str):
        choice = v.as_enum(value, "tool_choice", ("none", "auto", "required"))
        if choice == "required" and not tools:
            raise invalid_request("Invalid value for 'tool_choice': 'required' needs at least "
                                  "one tool in 'tools'.", param="tool_choice",
                                  code="invalid_value")
        return choice
    obj = v.as_object(value, "tool_choice")
    kind = v.as_string(v.require(obj, "type", "tool_choice"), "tool_choice.type")
    if kind != "function":
        raise invalid_request(f"Invalid value for 'tool_choice.type': '{kind}' is not supported "
                              f"by this server; use 'none', 'auto', 'required' or a function.",
                              param="tool_choice.type", code="unsupported_value")
    v.check_keys(obj, {"type", "name"}, "tool_choice")
    name = v.as_string(v.require(obj, "name", "tool_choice"), "tool_choice.name")
    if name not in {t["name"] for t in tools}:
        raise invalid_request(f"Invalid value for 'tool_choice.name': no function named "
                              f"'{name}' in 'tools'.", param="tool_choice.name",
                              code="invalid_value")
    return {"type": "function", "name": name}


def parse_text(value: Any) -> tuple[dict[str, Any], str | None]:
    """``text``: ``{format, verbosity}`` -> (format object as echoed, verbosity)."""
    if value is None:
        return {"type": "text"}, None
    text = v.as_object(value, "text")
    v.check_keys(text, {"format", "verbosity"}, "text")
    verbosity = None
    if text.get("verbosity") is not None:
        verbosity = v.as_enum(text["verbosity"], "text.verbosity", ("low", "medium", "high"))
    fmt = text.get("format")
    if fmt is None:
        return {"type": "text"}, verbosity
    fmt = v.as_object(fmt, "text.format")
    kind = v.as_enum(v.require(fmt, "type", "text.format"), "text.format.type",
                     ("text", "json_object", "json_schema"))
    if kind != "json_schema":
        v.check_keys(fmt, {"type"}, "text.format")
        return {"type": kind}, verbosity
    v.check_keys(fmt, {"type", "name", "schema", "strict", "description"}, "text.format")
    name = v.as_string(v.require(fmt, "name", "text.format"), "text.format.name")
    if not _FUNCTION_NAME.match(name):
        raise invalid_request("Invalid 'text.format.name': string does not match pattern. "
                              "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$' "
                              "(at most 64 characters).", param="text.format.name",
                              code="invalid_value")
    out: dict[str, Any] = {"type": "json_schema", "name": name,
                           "schema": v.as_object(v.require(fmt, "schema", "text.format"),
                                                 "text.format.schema"),
                           "strict": None}
    if fmt.get("strict") is not None:
        out["strict"] = v.as_bool(fmt["strict"], "text.format.strict")
    if fmt.get("description") is not None:
        out["description"] = v.as_string(fmt["description"], "text.format.description")
    return out, verbosity


# ---- other parameters ---------------------------------------------------------------------


def _parse_stream_options(body: dict[str, Any], stream: bool) -> None:
    so = body.get("stream_options")
    if so is None:
        return
    so = v.as_object(so, "stream_options")
    if not stream:
        raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' "
                              "is enabled.", param="stream_options", code="invalid_value")
    v.check_keys(so, {"include_obfuscation"}, "stream_options")
    if so.get("include_obfuscation") is not None:
        v.as_bool(so["include_obfuscation"], "stream_options.include_obfuscation")


def _check_reasoning(value: Any) -> None:
    """``reasoning``: accepted only when it asks for nothing (the model does not reason)."""
    if value is None:
        return
    obj = v.as_object(value, "reasoning")
    v.check_keys(obj, {"effort", "summary", "generate_summary", "context", "mode"},
                 "reasoning")
    for key in ("effort", "summary", "generate_summary"):
        if obj.get(key) is not None and obj.get(key) != "none":
            raise invalid_request(f"Unsupported parameter: 'reasoning.{key}' is not supported "
                                  f"with this model.", param=f"reasoning.{key}",
                                  code="unsupported_parameter")
