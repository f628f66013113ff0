"""``POST /v1/chat/completions`` body -> ``ChatCompletionRequest`` (OpenAI schema checks).

Follows ``S:CreateChatCompletionRequest`` of the OpenAI spec (shared/API.md section 1):
unknown parameters at any depth are rejected like OpenAI does; parameters that select
features this server lacks (audio output, web search, reasoning effort) get a 400
``unsupported_parameter`` instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

from openmini.api import validation as v
from openmini.serving.errors import invalid_request
from openmini.serving.protocol import ChatCompletionRequest, GenerationOptions

MAX_OUTPUT_TOKENS = 32768
"""gpt-4.1-mini's output cap (API.md section 7); larger ``max_tokens`` values get a 400."""

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

CHAT_PARAMETERS = frozenset({
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions",
    "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
    "modalities", "moderation", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
    "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier",
    "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
})
"""Every top-level parameter of the Chat Completions request."""

ROLES = ("system", "assistant", "user", "function", "tool", "developer")
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast")

_MESSAGE_KEYS = {
    "system": {"role", "content", "name"},
    "developer": {"role", "content", "name"},
    "user": {"role", "content", "name"},
    "assistant": {"role", "content", "name", "refusal", "tool_calls", "function_call",
                  "audio", "annotations"},
    "tool": {"role", "content", "tool_call_id"},
    "function": {"role", "content", "name"},
}
_PART_TYPES = {
    "system": ("text",), "developer": ("text",), "tool": ("text",), "function": ("text",),
    "user": ("text", "image_url", "input_audio", "file"),
    "assistant": ("text", "refusal"),
}
_UNSUPPORTED_FEATURES = {
    "audio": "Audio output is not supported by this model.",
    "moderation": "Moderation policies are not supported by this server.",
    "reasoning_effort": "Unsupported parameter: 'reasoning_effort' is not supported with this "
                        "model.",
    "verbosity": "Unsupported parameter: 'verbosity' is not supported with this model.",
    "web_search_options": "Web search is not supported with this model.",
    "functions": "The deprecated 'functions' parameter is not supported; use 'tools'.",
    "function_call": "The deprecated 'function_call' parameter is not supported; use "
                     "'tool_choice'.",
}


def parse_chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """Check a parsed JSON body and build the request.

    Raises:
        OpenAIError: 400 with ``param`` set to the JSON path of the first problem.
    """
    v.check_keys(body, CHAT_PARAMETERS)
    model = v.as_string(v.require(body, "model"), "model")
    messages = parse_messages(v.require(body, "messages"))
    for key, msg in _UNSUPPORTED_FEATURES.items():
        if body.get(key) is not None:
            raise invalid_request(msg, param=key, code="unsupported_parameter")
    opts = parse_options(body)
    extras = _parse_accepted_extras(body)

    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body.get("tool_choice"), tools)
    ptc = body.get("parallel_tool_calls")
    if ptc is not None:
        v.as_bool(ptc, "parallel_tool_calls")
    rf = parse_response_format(body.get("response_format"))
    return ChatCompletionRequest(model=model, messages=messages, options=opts, tools=tools,
                                 tool_choice=tool_choice, parallel_tool_calls=ptc,
                                 response_format=rf, extras=extras)


# ---- tools and response_format ---------------------------------------------------------------

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


def _check_name(value: Any, path: str) -> str:
    """A function / schema name: 1-64 characters of ``a-zA-Z0-9_-`` (OpenAI's pattern)."""
    name = v.as_string(value, path, 64)
    if not name or not set(name) <= _NAME_CHARS:
        raise invalid_request(f"Invalid '{path}': string does not match pattern. Expected a "
                              f"string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                              param=path, code="invalid_value")
    return name


def parse_tools(value: Any) -> list[dict[str, Any]] | None:
    """``tools``: 1..128 function tools ``{type: "function", function: {name, description?,
    parameters?, strict?}}`` with distinct names; returned as given (nulls dropped)."""
    if value is None:
        return None
    tools = []
    names: set[str] = set()
    for i, tool in enumerate(v.as_array(value, "tools", 1, 128)):
        path = f"tools[{i}]"
        tool = v.as_object(tool, path)
        v.check_keys(tool, {"type", "function"}, path)
        v.as_enum(v.require(tool, "type", path), f"{path}.type", ("function",))
        fn = v.as_object(v.require(tool, "function", path), f"{path}.function")
        fpath = f"{path}.function"
        v.check_keys(fn, {"name", "description", "parameters", "strict"}, fpath)
        name = _check_name(v.require(fn, "name", fpath), f"{fpath}.name")
        if name in names:
            raise invalid_request(f"Invalid 'tools': duplicate function name '{name}'.",
                                  param="tools", code="invalid_value")
        names.add(name)
        out: dict[str, Any] = {"name": name}
        if fn.get("description") is not None:
            out["description"] = v.as_string(fn["description"], f"{fpath}.description")
        if fn.get("parameters") is not None:
            out["parameters"] = v.as_object(fn["parameters"], f"{fpath}.parameters")
        if fn.get("strict") is not None:
            out["strict"] = v.as_bool(fn["strict"], f"{fpath}.strict")
        tools.append({"type": "function", "function": out})
    return tools


def parse_tool_choice(value: Any, tools: list[dict[str, Any]] | None) -> Any:
    """``tool_choice``: ``none | auto | required`` or ``{type: "function", function: {name}}``
    naming one of ``tools``; anything but ``none`` needs tools."""
    if value is None:
        return None
    if isinstance(value, str):
        v.as_enum(value, "tool_choice", ("none", "auto", "required"))
    else:
        obj = v.as_object(value, "tool_choice")
        v.check_keys(obj, {"type", "function"}, "tool_choice")
        v.as_enum(v.require(obj, "type", "tool_choice"), "tool_choice.type", ("function",))
        fn = v.as_object(v.require(obj, "function", "tool_choice"), "tool_choice.function")
        v.check_keys(fn, {"name"}, "tool_choice.function")
        name = v.as_string(v.require(fn, "name", "tool_choice.function"),
                           "tool_choice.function.name")
        if tools is not None and name not in {t["function"]["name"] for t in tools}:
            raise invalid_request(f"Invalid value for 'tool_choice': no function named "
                                  f"'{name}' in 'tools'.", param="tool_choice.function.name",
                                  code="invalid_value")
        value = {"type": "function", "function": {"name": name}}
    if tools is None and value != "none":
        raise invalid_request("Invalid value for 'tool_choice': 'tool_choice' is only "
                              "allowed when 'tools' are specified.", param="tool_choice",
                              code="invalid_value")
    return value


def parse_response_format(value: Any) -> dict[str, Any] | None:
    """``response_format``: ``{type: "text" | "json_object"}`` or ``{type: "json_schema",
    json_schema: {name, description?, schema?, strict?}}`` (the schema itself is checked
    by the grammar engine in serving)."""
    if value is None:
        return None
    rf = v.as_object(value, "response_format")
    kind = v.as_enum(v.require(rf, "type", "response_format"), "response_format.type",
                     ("text", "json_object", "json_schema"))
    if kind != "json_schema":
        v.check_keys(rf, {"type"}, "response_format")
        return {"type": kind}
    v.check_keys(rf, {"type", "json_schema"}, "response_format")
    path = "response_format.json_schema"
    js = v.as_object(v.require(rf, "json_schema", "response_format"), path)
    v.check_keys(js, {"name", "description", "schema", "strict"}, path)
    out: dict[str, Any] = {"name": _check_name(v.require(js, "name", path), f"{path}.name")}
    if js.get("description") is not None:
        out["description"] = v.as_string(js["description"], f"{path}.description")
    if js.get("schema") is not None:
        out["schema"] = v.as_object(js["schema"], f"{path}.schema")
    if js.get("strict") is not None:
        out["strict"] = v.as_bool(js["strict"], f"{path}.strict")
    return {"type": "json_schema", "json_schema": out}


# ---- messages -----------------------------------------------------------------------------


def parse_messages(value: Any) -> list[dict[str, Any]]:
    """Check ``messages`` and normalize each to ``{role, content: str | None, ...}``.

    Text parts are joined with newlines; image, audio and file parts get a 400 naming the
    part (``messages[0].content[1]``) since the served models read text only.
    """
    out = []
    for i, m in enumerate(v.as_array(value, "messages", min_len=1)):
        path = f"messages[{i}]"
        m = v.as_object(m, path)
        role = v.as_enum(v.require(m, "role", path), f"{path}.role", ROLES)
        v.check_keys(m, _MESSAGE_KEYS[role], path)
        msg: dict[str, Any] = {"role": role}
        content = m.get("content")
        if role == "assistant":
            tool_calls = m.get("tool_calls")
            if content is None and not tool_calls and m.get("function_call") is None:
                raise v.missing(f"{path}.content")
            if tool_calls is not None:
                msg["tool_calls"] = _parse_tool_calls(tool_calls, f"{path}.tool_calls")
            if m.get("function_call") is not None:
                raise invalid_request("The deprecated 'function_call' message field is not "
                                      "supported; use 'tool_calls'.",
                                      param=f"{path}.function_call",
                                      code="unsupported_parameter")
            if m.get("audio") is not None:
                raise invalid_request("Audio messages are not supported by this model.",
                                      param=f"{path}.audio", code="unsupported_parameter")
            if m.get("refusal") is not None:
                v.as_string(m["refusal"], f"{path}.refusal")
            if m.get("annotations") is not None:
                # echoed back from a response message (url citations): accepted, not rendered
                v.as_array(m["annotations"], f"{path}.annotations")
            msg["content"] = (None if content is None
                              else _content_text(content, f"{path}.content", role))
        else:
            if content is None and role != "function":
                raise v.missing(f"{path}.content")
            msg["content"] = "" if content is None else _content_text(content,
                                                                     f"{path}.content", role)
        if role == "tool":
            msg["tool_call_id"] = v.as_string(v.require(m, "tool_call_id", path),
                                              f"{path}.tool_call_id")
        if role == "function":
            msg["role"] = "tool"
            msg["name"] = v.as_string(v.require(m, "name", path), f"{path}.name")
        elif m.get("name") is not None:
            msg["name"] = v.as_string(m["name"], f"{path}.name")
        out.append(msg)
    return out


def _content_text(content: Any, path: str, role: str) -> str:
    """A message's content as one string (string content, or text parts joined by newlines)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise v.invalid_type(path, "a string or an array of content parts", content)
    parts = v.as_array(content, path, min_len=1)
    texts = []
    for j, part in enumerate(parts):
        ppath = f"{path}[{j}]"
        part = v.as_object(part, ppath)
        ptype = v.as_enum(v.require(part, "type", ppath), f"{ppath}.type", _PART_TYPES[role])
        if ptype == "text":
            v.check_keys(part, {"type", "text"}, ppath)
            texts.append(v.as_string(v.require(part, "text", ppath), f"{ppath}.text"))
        elif ptype == "refusal":
            v.check_keys(part, {"type", "refusal"}, ppath)
            texts.append(v.as_string(v.require(part, "refusal", ppath), f"{ppath}.refusal"))
        else:
            kind = {"image_url": "Image", "input_audio": "Audio", "file": "File"}[ptype]
            raise invalid_request(f"Invalid content part '{ppath}': {kind} input is not "
                                  f"supported by this model (it reads text only).",
                                  param=ppath, code="unsupported_value")
    return "\n".join(texts)


def _parse_tool_calls(value: Any, path: str) -> list[dict[str, Any]]:
    calls = []
    for k, call in enumerate(v.as_array(value, path)):
        cpath = f"{path}[{k}]"
        call = v.as_object(call, cpath)
        v.check_keys(call, {"id", "type", "function"}, cpath)
        cid = v.as_string(v.require(call, "id", cpath), f"{cpath}.id")
        v.as_enum(v.require(call, "type", cpath), f"{cpath}.type", ("function",))
        fn = v.as_object(v.require(call, "function", cpath), f"{cpath}.function")
        v.check_keys(fn, {"name", "arguments"}, f"{cpath}.function")
        name = v.as_string(v.require(fn, "name", f"{cpath}.function"), f"{cpath}.function.name")
        args = v.as_string(v.require(fn, "arguments", f"{cpath}.function"),
                           f"{cpath}.function.arguments")
        calls.append({"id": cid, "type": "function",
                      "function": {"name": name, "arguments": args}})
    return calls


# ---- sampling options ---------------------------------------------------------------------


def parse_options(body: dict[str, Any], top_logprobs_max: int = 20) -> GenerationOptions:
    """The sampling/stopping parameters shared with ``/v1/completions``."""
    o = GenerationOptions()
    for key in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both
        if body.get(key) is not None:
            o.max_tokens = v.as_int(body[key], key, 1, MAX_OUTPUT_TOKENS)
    if body.get("temperature") is not None:
        o.temperature = v.as_number(body["temperature"], "temperature", 0, 2)
    if body.get("top_p") is not None:
        o.top_p = v.as_number(body["top_p"], "top_p", 0, 1)
    if body.get("n") is not None:
        o.n = v.as_int(body["n"], "n", 1, 128)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) is not None:
            setattr(o, key, v.as_number(body[key], key, -2, 2))
    o.stop = parse_stop(body.get("stop"))
    o.logit_bias = parse_logit_bias(body.get("logit_bias"))
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if v.as_bool(logprobs, "logprobs"):
            o.logprobs = 0
    top = body.get("top_logprobs")
    if top is not None:
        top = v.as_int(top, "top_logprobs", 0, top_logprobs_max)
        if o.logprobs is None:
            raise invalid_request("Invalid value for 'top_logprobs': 'logprobs' must be set to "
                                  "true when 'top_logprobs' is used.", param="top_logprobs",
                                  code="invalid_value")
        o.logprobs = top
    if body.get("seed") is not None:
        o.seed = v.as_int(body["seed"], "seed", INT64_MIN, INT64_MAX)
    parse_stream(body, o)
    return o


def parse_stream(body: dict[str, Any], o: GenerationOptions) -> None:
    """``stream`` and ``stream_options`` (only allowed together with ``stream: true``)."""
    if body.get("stream") is not None:
        o.stream = v.as_bool(body["stream"], "stream")
    so = body.get("stream_options")
    if so is not None:
        so = v.as_object(so, "stream_options")
        if not o.stream:
            raise invalid_request("The 'stream_options' parameter is only allowed when 'stream' "
                                  "is enabled.", param="stream_options", code="invalid_value")
        v.check_keys(so, {"include_usage", "include_obfuscation"}, "stream_options")
        if so.get("include_usage") is not None:
            o.include_usage = v.as_bool(so["include_usage"], "stream_options.include_usage")
        if so.get("include_obfuscation") is not None:
            v.as_bool(so["include_obfuscation"], "stream_options.include_obfuscation")


def parse_stop(value: Any) -> list[str]:
    """``stop``: null, a string, or up to 4 strings; empty strings are dropped."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    items = v.as_array(value, "stop", 0, 4)
    return [s for i, s in enumerate(items) if v.as_string(s, f"stop[{i}]")]


def parse_logit_bias(value: Any) -> dict[int, float]:
    """``logit_bias``: token-id strings -> -100..100."""
    if value is None:
        return {}
    out = {}
    for key, bias in v.as_object(value, "logit_bias").items():
        if not (key.isascii() and key.isdigit()) or len(key) > 12:
            raise invalid_request(f"Invalid key in 'logit_bias': '{key[:40]}'. Keys must be token "
                                  f"ids (strings of digits).", param="logit_bias",
                                  code="invalid_value")
        out[int(key)] = v.as_number(bias, f"logit_bias.{key}", -100, 100)
    return out


def _parse_accepted_extras(body: dict[str, Any]) -> dict[str, Any]:
    """Parameters that are accepted (and checked) but do not change generation."""
    extras: dict[str, Any] = {}
    if body.get("store") is not None:
        extras["store"] = v.as_bool(body["store"], "store")
    if body.get("metadata") is not None:
        extras["metadata"] = parse_metadata(body["metadata"])
    for key, max_len in (("user", 512), ("safety_identifier", 64), ("prompt_cache_key", 512)):
        if body.get(key) is not None:
            extras[key] = v.as_string(body[key], key, max_len)
    if body.get("service_tier") is not None:
        extras["service_tier"] = v.as_enum(body["service_tier"], "service_tier", SERVICE_TIERS)
    if body.get("prompt_cache_retention") is not None:
        v.as_enum(body["prompt_cache_retention"], "prompt_cache_retention", ("in_memory", "24h"))
    if body.get("prompt_cache_options") is not None:
        v.as_object(body["prompt_cache_options"], "prompt_cache_options")
    modalities = body.get("modalities")
    if modalities is not None:
        for i, m in enumerate(v.as_array(modalities, "modalities")):
            if v.as_enum(m, f"modalities[{i}]", ("text", "audio")) == "audio":
                raise invalid_request("This model does not support audio output; use "
                                      "modalities ['text'].", param=f"modalities[{i}]",
                                      code="unsupported_value")
    prediction = body.get("prediction")
    if prediction is not None:
        prediction = v.as_object(prediction, "prediction")
        v.check_keys(prediction, {"type", "content"}, "prediction")
        v.as_enum(v.require(prediction, "type", "prediction"), "prediction.type", ("content",))
        extras["prediction"] = _content_text(v.require(prediction, "content", "prediction"),
                                             "prediction.content", "system")
    return extras


def parse_metadata(value: Any) -> dict[str, str]:
    """``metadata``: at most 16 pairs, keys <= 64 characters, string values <= 512."""
    meta = v.as_object(value, "metadata")
    if len(meta) > 16:
        raise invalid_request(f"Invalid 'metadata': too many properties. Expected an object "
                              f"with at most 16 properties, but got {len(meta)} instead.",
                              param="metadata", code="object_above_max_properties")
    for key, val in meta.items():
        if len(key) > 64:
            raise invalid_request(f"Invalid 'metadata': key '{key[:64]}…' is longer than 64 "
                                  f"characters.", param="metadata",
                                  code="string_above_max_length")
        v.as_string(val, f"metadata.{key}", 512)
    return dict(meta)
