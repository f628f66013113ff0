"""``response_format`` and tools -> the request's ``StructuredOutputSpec`` (fail closed).

Every schema is checked with the grammar engine before any engine work: a schema it cannot
enforce is a 400 ``invalid_request_error`` whose ``param`` points at the schema
(``response_format.json_schema.schema``, ``tools[0].function.parameters``), never
unconstrained output (case C08). ``strict: true`` fails on any keyword the engine does not
implement; ``strict: false`` (or absent) ignores such keywords and enforces the rest.

Modes (with the `ToolCallingPlan` of serving/tools.py):

=====================  =====================================================================
tool_choice            grammar
=====================  =====================================================================
none / no tools        the answer: free text (no grammar) or the ``response_format`` JSON
auto                   answer (free text, or the JSON) | tool calls of any offered tool
required               one or more calls (one when ``parallel_tool_calls`` is false)
function (named)       exactly one call to that function
=====================  =====================================================================

Inputs are neutral (dicts in the Chat Completions shape, parameter paths as strings), so the
Responses API can call the same functions with its own paths.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from openmini.sampling_params import JsonSchemaConstraint, StructuredOutputSpec, ToolCallConstraint
from openmini.serving.errors import invalid_request
from openmini.serving.tools import ToolCallingPlan, function_of
from openmini.structured import StructuredOutputError, check_json_schema, check_spec, check_tool

JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""``response_format: {"type": "json_object"}``: any JSON object."""

NO_PARAMETERS_SCHEMA = '{"type": "object", "properties": {}, "additionalProperties": false}'
"""A function without ``parameters`` takes none: its arguments are ``{}``."""


def json_schema_constraint(schema: Any, strict: bool, param: str,
                           what: str = "response_format") -> JsonSchemaConstraint:
    """A checked schema constraint.

    Args:
        schema: the JSON Schema (dict or boolean).
        strict: fail on unsupported keywords (else ignore them).
        param: the schema's location for errors (``response_format.json_schema.schema``).
        what: how the message names the schema's owner.

    Raises:
        OpenAIError: 400 ``invalid_json_schema`` at ``param`` when the grammar engine cannot
            enforce the schema.
    """
    if not isinstance(schema, (dict, bool)):
        raise invalid_request(f"Invalid schema for {what} ('{param}'): a JSON schema must be "
                              f"an object.", param=param, code="invalid_json_schema")
    constraint = JsonSchemaConstraint(json.dumps(schema, ensure_ascii=False), bool(strict))
    try:
        check_json_schema(constraint)
    except StructuredOutputError as exc:
        raise invalid_request(f"Invalid schema for {what} ('{param}'): the grammar engine "
                              f"cannot enforce it: {exc}", param=param,
                              code="invalid_json_schema") from None
    return constraint


def response_format_constraint(response_format: dict[str, Any] | None,
                               param: str = "response_format") -> JsonSchemaConstraint | None:
    """The answer constraint of a Chat Completions ``response_format`` (None for text).

    Raises:
        OpenAIError: 400 at ``{param}.json_schema.schema`` for a schema that cannot be
            enforced.
    """
    if not response_format or response_format.get("type") in (None, "text"):
        return None
    if response_format["type"] == "json_object":
        return JsonSchemaConstraint(JSON_OBJECT_SCHEMA, strict=True)
    js = response_format.get("json_schema") or {}
    name = js.get("name", "response")
    return json_schema_constraint(js.get("schema", {}), bool(js.get("strict")),
                                  f"{param}.json_schema.schema",
                                  what=f"response_format '{name}'")


def check_json_mentioned(texts: Iterable[str | None], param: str = "messages") -> None:
    """``json_object`` needs the word "json" in the conversation (as OpenAI requires).

    Raises:
        OpenAIError: 400 at ``param`` when no text mentions JSON.
    """
    if not any("json" in (t or "").lower() for t in texts):
        raise invalid_request("'messages' must contain the word 'json' in some form, to use "
                              "'response_format' of type 'json_object'.", param=param,
                              code="invalid_value")


def tool_constraints(tools: list[dict[str, Any]],
                     param_format: str = "tools[{i}].function.parameters"
                     ) -> list[ToolCallConstraint]:
    """One checked constraint per function tool (Chat Completions shape).

    Args:
        tools: the request's tools.
        param_format: location of tool ``i``'s parameters for errors.

    Raises:
        OpenAIError: 400 ``invalid_function_parameters`` at the parameters of the first tool
            whose schema is not an object schema or cannot be enforced.
    """
    out = []
    for i, tool in enumerate(tools):
        fn = function_of(tool)
        name = fn["name"]
        param = param_format.format(i=i)
        params = fn.get("parameters")
        if params is None:
            schema = NO_PARAMETERS_SCHEMA
        else:
            if not isinstance(params, dict) or params.get("type", "object") != "object":
                raise invalid_request(
                    f"Invalid schema for function '{name}' ('{param}'): schema must be a JSON "
                    f"Schema of 'type: \"object\"'.", param=param,
                    code="invalid_function_parameters")
            schema = json.dumps(params, ensure_ascii=False)
        constraint = ToolCallConstraint(name, JsonSchemaConstraint(schema,
                                                                   bool(fn.get("strict"))))
        try:
            check_tool(constraint)
        except StructuredOutputError as exc:
            raise invalid_request(f"Invalid schema for function '{name}' ('{param}'): the "
                                  f"grammar engine cannot enforce it: {exc}", param=param,
                                  code="invalid_function_parameters") from None
        out.append(constraint)
    return out


def structured_output_spec(plan: ToolCallingPlan, answer: JsonSchemaConstraint | None,
                           tools: list[ToolCallConstraint]) -> StructuredOutputSpec | None:
    """The grammar spec of a request (see the table in the module docstring).

    Args:
        plan: tools, tool_choice, parallel_tool_calls, call format (its ``bare_call`` is
            set here, so that its parser reads what the grammar allows).
        answer: the ``response_format`` constraint (None: free text).
        tools: checked constraints of ``plan.tools`` (same order).

    Returns:
        None when nothing is constrained (free text, no tools offered).

    Raises:
        OpenAIError: 400 (param ``tools``) when the combined grammar cannot be built.
    """
    callable_names = {function_of(t)["name"] for t in plan.callable_tools}
    callable_tools = tuple(t for t in tools if t.name in callable_names)
    if not callable_tools:
        return None if answer is None else StructuredOutputSpec(answer=answer)
    mode = plan.choice.mode
    single = mode == "function" or not plan.parallel_tool_calls
    fmt = plan.fmt
    plan.bare_call = fmt.bare_call and mode == "auto" and answer is None
    spec = StructuredOutputSpec(
        answer=answer, allow_answer=mode == "auto", tools=callable_tools,
        allow_bare_call=plan.bare_call,
        max_tool_calls=1 if single else None, call_begin=fmt.call_begin,
        call_end=fmt.call_end, call_separator=fmt.call_separator, name_key=fmt.name_key,
        arguments_key=fmt.arguments_key)
    try:
        check_spec(spec)
    except StructuredOutputError as exc:
        raise invalid_request(f"The tools cannot be enforced together: {exc}", param="tools",
                              code="invalid_function_parameters") from None
    return spec
