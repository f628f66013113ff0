"""``StructuredOutputSpec`` -> an llguidance grammar (Lark syntax with inline ``%json``).

No tokenizer and no torch here: the grammar text is a pure function of the spec, so the
serving layer can check a request's schemas (and fail closed with a 400 naming the schema)
before any engine work, and the engine compiles the same text against its tokenizer.

Grammar shape (llguidance Lark dialect, docs/syntax.md of guidance-ai/llguidance: Earley
parser, ``%json {schema}`` non-terminals, ``[lazy]`` lexemes)::

    start: <answer> | lead call_rest more        (auto: answer or calls)
    start: TEXT | lead call_rest more | call_body  (auto, bare calls allowed: TEXT may not
                                                  start with "{", which starts a bare call)
    start: MARKER call_rest more                 (required / named: calls only)
    lead[lazy]: TEXT MARKER                      (free text up to the first call marker)
    call_rest: AFTER_MARKER call_body CALL_END
    call_body: tool_0 | tool_1 | ...             (one %json per tool: name const + args)
    more: (SEPARATOR MARKER call_rest){0,k-1}    (k = max_tool_calls; * when unlimited)

``<answer>`` is ``TEXT`` (``/(.|\\n)*/``, free text) or ``%json {answer schema}``. With a
free-text answer, the lazy ``lead`` lexeme ends at the first ``MARKER`` (e.g.
``<tool_call>``), after which only a schema-valid call can follow: text can never contain
an unchecked call. JSON allows whitespace only where JSON does, at most
`WHITESPACE_PATTERN` at each place (so even a random model cannot loop on blank lines).
"""

from __future__ import annotations

import json
import re
from typing import Any

from openmini.sampling_params import JsonSchemaConstraint, StructuredOutputSpec, ToolCallConstraint
from openmini.structured.errors import StructuredOutputError

WHITESPACE_PATTERN = r"(\r?\n)?[ \t]{0,32}"
"""JSON whitespace allowed at one place of an answer: an optional line break and up to 32
blanks (enough for pretty-printed JSON nested 16 levels at two spaces)."""

CALL_WHITESPACE_PATTERN = r" ?"
"""JSON whitespace at one place of a tool call: at most one space. Calls are one line in
the format models are trained on (``json.dumps`` / Jinja ``tojson`` separators ``", "`` and
``": "``), so a model is kept in the layout it knows."""

_VALUE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
"""Keywords whose values are JSON data, not schemas (``$ref`` strings there are data)."""


def schema_document(constraint: JsonSchemaConstraint,
                    whitespace: str = WHITESPACE_PATTERN) -> dict[str, Any]:
    """The schema of ``constraint`` as a dict with llguidance's options set.

    ``x-guidance`` (llguidance's per-schema options) is replaced, never taken from the
    client: ``lenient`` is ``not strict`` and whitespace is bounded (``whitespace``, a
    regex for the blanks at one place).

    Raises:
        StructuredOutputError: the text is not JSON, or not a schema (object or boolean),
            or the schema ``false`` (nothing can match it).
    """
    try:
        schema = json.loads(constraint.schema)
    except ValueError as exc:
        raise StructuredOutputError(f"The schema is not valid JSON: {exc}") from None
    if schema is True:
        schema = {}
    if schema is False:
        raise StructuredOutputError("The schema `false` accepts no value.")
    if not isinstance(schema, dict):
        raise StructuredOutputError("A JSON schema must be an object or a boolean.")
    doc = {k: v for k, v in schema.items() if k != "x-guidance"}
    doc["x-guidance"] = {"whitespace_pattern": whitespace,
                         "lenient": not constraint.strict}
    return doc


def tool_call_document(tool: ToolCallConstraint, name_key: str = "name",
                       arguments_key: str = "arguments") -> dict[str, Any]:
    """The schema of one call ``{"<name_key>": NAME, "<arguments_key>": ARGS}``.

    The arguments schema is nested at ``#/properties/<arguments_key>``; its local ``$ref``
    pointers (``#/$defs/X``, ``#``) are rewritten to point there (RFC 6901 JSON Pointer).
    Properties come in that order (llguidance writes properties in schema order); the
    call is one line (`CALL_WHITESPACE_PATTERN`).

    Raises:
        StructuredOutputError: as `schema_document`.
    """
    args = schema_document(tool.parameters, CALL_WHITESPACE_PATTERN)
    options = args.pop("x-guidance")
    prefix = "#/properties/" + _pointer_token(arguments_key)
    return {"type": "object",
            "properties": {name_key: {"const": tool.name},
                           arguments_key: _rebase_refs(args, prefix)},
            "required": [name_key, arguments_key], "additionalProperties": False,
            "x-guidance": options}


def spec_to_lark(spec: StructuredOutputSpec) -> str:
    """The llguidance Lark grammar of a spec (see the module docstring for its shape).

    Raises:
        StructuredOutputError: a schema is not JSON / not a schema (see `schema_document`).
            Features the engine cannot enforce are found by `check_grammar`.
    """
    rules: list[str] = []
    answer = None
    if spec.allow_answer:
        if spec.answer is None:
            answer = "TEXT"
        else:
            answer = "answer"
            rules.append(f"answer: %json {_dump(schema_document(spec.answer))}")
    if not spec.tools:
        start = answer
    else:
        marker = spec.call_begin.rstrip()
        more = "" if spec.max_tool_calls == 1 else "more"
        calls = _seq(_lit(marker), "call_rest", more)
        if answer == "TEXT":
            start = "TEXT | " + _seq("lead", "call_rest", more)
            rules.append(f"lead[lazy]: TEXT {_lit(marker)}")
            if spec.allow_bare_call:
                start += " | call_body"
                answer = "TEXT_NO_BRACE"
        elif answer is not None:
            start = f"{answer} | {calls}"
        else:
            start = calls
        after_marker = _lit(spec.call_begin[len(marker):])
        rules.append(f"call_rest: {_seq(after_marker, 'call_body', _lit(spec.call_end))}")
        for i, tool in enumerate(spec.tools):
            doc = tool_call_document(tool, spec.name_key, spec.arguments_key)
            rules.append(f"tool_{i}: %json {_dump(doc)}")
        rules.append("call_body: " + " | ".join(f"tool_{i}" for i in range(len(spec.tools))))
        if more:
            repeat = "*" if spec.max_tool_calls is None else f"{{0,{spec.max_tool_calls - 1}}}"
            step = _seq(_lit(spec.call_separator), _lit(marker), "call_rest")
            rules.append(f"more: ({step}){repeat}")
    if answer == "TEXT":
        rules.append(r"TEXT: /(.|\n)*/")
    elif answer == "TEXT_NO_BRACE":  # free text that does not start with "{" (a bare call)
        rules.append(r"TEXT: /(\s*[^{\s](.|\n)*)?/")
    return "\n".join(["%llguidance {}", f"start: {start}", *rules]) + "\n"


def check_grammar(lark: str) -> None:
    """Compile a grammar without a tokenizer (regexes, formats, keywords, references).

    Raises:
        StructuredOutputError: the message of the grammar engine (e.g. ``Unimplemented keys:
            ["not"]``, a look-around in a ``pattern``).
    """
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(
        llguidance.LLMatcher.grammar_from_lark(lark))
    if error:
        raise StructuredOutputError(clean_error(error))


def check_spec(spec: StructuredOutputSpec) -> None:
    """`spec_to_lark` + `check_grammar`.

    Raises:
        StructuredOutputError: the spec cannot be enforced.
    """
    check_grammar(spec_to_lark(spec))


def check_json_schema(constraint: JsonSchemaConstraint) -> None:
    """Can the grammar engine enforce this schema (as an answer)?

    Raises:
        StructuredOutputError: it cannot (strict: any unsupported keyword or format; both
            modes: bad regexes, unresolvable ``$ref``, unsatisfiable schemas).
    """
    check_spec(StructuredOutputSpec(answer=constraint))


def check_tool(tool: ToolCallConstraint) -> None:
    """Can the grammar engine enforce calls of this tool?

    Raises:
        StructuredOutputError: as `check_json_schema`, for the arguments schema.
    """
    check_spec(StructuredOutputSpec(allow_answer=False, tools=(tool,)))


# ---- helpers ------------------------------------------------------------------------------------


def _dump(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False)


def _lit(text: str) -> str:
    """A Lark string literal ("" for empty text, dropped by `_seq`)."""
    return json.dumps(text, ensure_ascii=False)


def _seq(*parts: str) -> str:
    """A Lark sequence of fragments (rule names, literals); empty literals dropped."""
    kept = [p for p in parts if p not in ("", '""')]
    return " ".join(kept) if kept else '""'


def _pointer_token(key: str) -> str:
    """RFC 6901 escaping of one JSON Pointer reference token."""
    return key.replace("~", "~0").replace("/", "~1")


def _rebase_refs(node: Any, prefix: str) -> Any:
    """Copy of a schema with local ``$ref`` pointers (``#...``) moved under ``prefix``."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = prefix + value[1:]
            elif key in _VALUE_KEYWORDS:
                out[key] = value
            else:
                out[key] = _rebase_refs(value, prefix)
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, prefix) for v in node]
    return node


def clean_error(message: str) -> str:
    """The grammar engine's message without its grammar dump and source position, on one
    line, at most 500 characters."""
    text = message.split("<state>")[0].split("<grammar>")[0]
    kept = []
    for line in text.splitlines():
        if re.match(r"^\s*\d+ \|", line):
            break  # the grammar listing starts
        kept.append(line.strip())
    text = re.sub(r"^at \d+\(\d+\): ", "", " ".join(k for k in kept if k))
    return text[:500]
