"""Tools in the prompt: ``tool_choice``, and how the model is told about its tools.

Inputs are neutral: tools in the Chat Completions shape (``{"type": "function", "function":
{"name", "description"?, "parameters"?, "strict"?}}``) and chat messages as the chat template
takes them (``tool_calls`` with JSON-string arguments, ``tool`` messages), so the Responses
API reuses this module after converting its items.

Two ways to show tools to a model (`ToolCallingPlan.prompt`):

* The model's chat template renders them when it has a tools section in a format we parse
  (Qwen2.5: Hermes ``<tool_call>``); history tool calls and results go through the template.
* Otherwise (SmolLM2, any template without tools) OpenMini writes its own tool section into
  the system prompt (`tool_system_prompt`: the signatures and the exact call format), and
  renders history tool calls as the assistant's text and tool results as user turns, in the
  same format the model is asked to produce.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from openmini.serving.errors import invalid_request
from openmini.serving.tool_parsers import (
    HERMES,
    ParsedOutput,
    ToolCallFormat,
    ToolCallStreamParser,
    parse_tool_calls,
)

TOOL_CHOICE_MODES = ("none", "auto", "required", "function")


@dataclass(frozen=True)
class ToolChoice:
    """The resolved ``tool_choice``.

    Attributes:
        mode: ``none`` (no tools offered), ``auto`` (answer or call), ``required`` (at
            least one call), ``function`` (exactly one call to ``name``).
        name: the forced function's name (mode ``function``).
    """

    mode: str
    name: str | None = None


def resolve_tool_choice(tools: list[dict[str, Any]] | None, tool_choice: Any,
                        param: str = "tool_choice") -> ToolChoice:
    """OpenAI's ``tool_choice`` (default ``none`` without tools, ``auto`` with them).

    Accepts ``"none" | "auto" | "required"``, ``{"type": "function", "function": {"name"}}``
    (Chat Completions) and ``{"type": "function", "name"}`` (Responses).

    Raises:
        OpenAIError: 400 naming ``param`` for a choice that needs tools when there are none,
            or a function name that is not among the tools.
    """
    names = [function_of(t)["name"] for t in tools or []]
    if tool_choice is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise invalid_request(f"Invalid value for '{param}': '{tool_choice}'.", param=param,
                                  code="invalid_value")
        if tool_choice != "none" and not names:
            raise invalid_request(f"Invalid value for '{param}': '{param}' is only allowed "
                                  f"when 'tools' are specified.", param=param,
                                  code="invalid_value")
        return ToolChoice(tool_choice if names else "none")
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else (
        tool_choice.get("name") if isinstance(tool_choice, dict) else None)
    if not isinstance(name, str):
        raise invalid_request(f"Invalid value for '{param}': expected 'none', 'auto', "
                              f"'required' or a function choice.", param=param,
                              code="invalid_value")
    if name not in names:
        raise invalid_request(f"Invalid value for '{param}': no function named '{name}' in "
                              f"'tools'.", param=param, code="invalid_value")
    return ToolChoice("function", name)


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """The ``function`` object of a Chat Completions tool."""
    return tool["function"]


def tool_format_for_template(template: Any) -> tuple[ToolCallFormat, bool]:
    """The tool-call format for a chat template, and whether the template renders tools.

    A template renders tools when it reads the ``tools`` variable (``ChatTemplate.uses_tools``)
    and writes calls in a format we parse (Hermes ``<tool_call>``); any other template gets
    OpenMini's own tool prompt in the Hermes format.
    """
    source = getattr(template, "source", "") or ""
    if getattr(template, "uses_tools", False) and HERMES.marker in source:
        return HERMES, True
    return HERMES, False


@dataclass
class ToolCallingPlan:
    """Everything about tools for one request.

    Attributes:
        tools: every tool of the request (Chat Completions shape).
        choice: the resolved ``tool_choice``.
        parallel_tool_calls: several calls allowed in one answer.
        fmt: the model family's call format.
        template_renders_tools: the chat template shows tools and history calls itself.
        bare_call: the grammar lets the model write one call without markers (set by
            `openmini.serving.structured.structured_output_spec`).
    """

    tools: list[dict[str, Any]] = field(default_factory=list)
    choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True
    fmt: ToolCallFormat = HERMES
    template_renders_tools: bool = False
    bare_call: bool = False

    @property
    def offered(self) -> list[dict[str, Any]]:
        """The tools shown to the model (none for ``tool_choice: none``)."""
        return [] if self.choice.mode == "none" else list(self.tools)

    @property
    def parses_tool_calls(self) -> bool:
        """Output may hold tool calls (they are parsed out of the text)."""
        return bool(self.offered)

    @property
    def callable_tools(self) -> list[dict[str, Any]]:
        """The tools the grammar lets the model call (only the named one for a function
        choice)."""
        if self.choice.mode == "function":
            return [t for t in self.tools if function_of(t)["name"] == self.choice.name]
        return self.offered

    def prompt(self, messages: list[dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """Messages and the template's ``tools`` variable for rendering this request.

        Args:
            messages: chat messages (system/developer/user/assistant/tool).

        Returns:
            ``(messages, tools)``: through the template when it renders tools; else with
            OpenMini's tool section in the system prompt and history calls/results as text.
        """
        offered = self.offered
        if self.template_renders_tools:
            return list(messages), (offered or None)
        msgs = history_as_text(messages, self.fmt)
        if offered:
            msgs = with_system_text(msgs, tool_system_prompt(offered, self.choice, self.fmt))
        return msgs, None

    def parser(self) -> ToolCallStreamParser:
        """A fresh streaming parser for one choice of this request."""
        return ToolCallStreamParser(self.fmt, bare_call=self.bare_call)

    def parse(self, text: str) -> tuple[ParsedOutput, bool]:
        """A whole output: the parsed message and whether a repeated call ended it."""
        return parse_tool_calls(text, self.fmt, bare_call=self.bare_call)

    def finish_reason(self, engine_reason: str | None, num_calls: int,
                      stopped_at_repeat: bool = False) -> str:
        """OpenAI's finish_reason: ``tool_calls`` after calls, except that a named function
        choice ends with ``stop`` (API.md section 2); ``length`` stays ``length``; an
        output the parser ended at a repeated call ends with ``tool_calls``."""
        if stopped_at_repeat:
            return "tool_calls"
        if engine_reason == "length" or num_calls == 0:
            return engine_reason or "stop"
        return "stop" if self.choice.mode == "function" else "tool_calls"


def plan_tool_calling(tools: list[dict[str, Any]] | None, tool_choice: Any,
                      parallel_tool_calls: bool | None, template: Any,
                      tool_choice_param: str = "tool_choice") -> ToolCallingPlan:
    """Build the `ToolCallingPlan` of a request (``tools`` already shape-checked).

    Raises:
        OpenAIError: 400 for a bad ``tool_choice`` (see `resolve_tool_choice`).
    """
    fmt, via_template = tool_format_for_template(template)
    return ToolCallingPlan(
        tools=list(tools or []),
        choice=resolve_tool_choice(tools, tool_choice, tool_choice_param),
        parallel_tool_calls=True if parallel_tool_calls is None else bool(parallel_tool_calls),
        fmt=fmt, template_renders_tools=via_template)


# ---- OpenMini's own tool prompt ----------------------------------------------------------------


def tool_system_prompt(tools: list[dict[str, Any]], choice: ToolChoice,
                       fmt: ToolCallFormat = HERMES) -> str:
    """The system-prompt section that describes the tools and the exact call format.

    Args:
        tools: the offered tools (Chat Completions shape; written as JSON, one per line).
        choice: adds "you must call ..." for ``required`` / ``function``.
        fmt: the call format the grammar will enforce.
    """
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    example = (fmt.call_begin + json.dumps({fmt.name_key: "function_name",
                                            fmt.arguments_key: {"argument": "value"}})
               + fmt.call_end)
    if choice.mode == "function":
        rule = f"Call the function `{choice.name}` now."
    elif choice.mode == "required":
        rule = "You must call at least one of these functions."
    else:
        rule = ("Call a function when it helps to answer the user; otherwise answer the user "
                "directly.")
    return (
        "# Tools\n\n"
        "You can call the functions below. Each one is described as JSON inside "
        "<tools></tools>:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        "To call a function, write a JSON object with its name and its arguments (following "
        "the function's parameters schema) between call tags, exactly like this:\n"
        f"{example}\n"
        "Write one such block per call. Function results come back to you in "
        f"{fmt.result_begin.strip()} tags.\n{rule}")


def with_system_text(messages: list[dict[str, Any]], text: str) -> list[dict[str, Any]]:
    """Messages with ``text`` appended to the leading system message (or a new one first)."""
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0].get("role") in ("system", "developer"):
        first = msgs[0]
        content = first.get("content") or ""
        if isinstance(content, list):
            content = "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
        first["content"] = f"{content}\n\n{text}" if content else text
        return msgs
    return [{"role": "system", "content": text}, *msgs]


def history_as_text(messages: list[dict[str, Any]],
                    fmt: ToolCallFormat = HERMES) -> list[dict[str, Any]]:
    """Assistant tool calls and tool results written as text in the call format.

    * an assistant message with ``tool_calls``: its content, then each call as
      ``call_begin + {"name": ..., "arguments": {...}} + call_end`` (separator between);
    * consecutive ``tool`` messages: one user message with each result inside
      ``result_begin ... result_end``.
    Other messages are copied unchanged.
    """
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "assistant" and m.get("tool_calls"):
            calls = [fmt.call_begin + _call_json(tc, fmt) + fmt.call_end
                     for tc in m["tool_calls"]]
            text = fmt.call_separator.join(calls)
            content = m.get("content") or ""
            msg = {k: v for k, v in m.items() if k != "tool_calls"}
            msg["content"] = f"{content}\n{text}" if content else text
            out.append(msg)
        elif role == "tool":
            result = fmt.result_begin + (m.get("content") or "") + fmt.result_end
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "_tool_results": True})
        else:
            out.append(dict(m))
    for m in out:
        m.pop("_tool_results", None)
    return out


def _call_json(tool_call: dict[str, Any], fmt: ToolCallFormat) -> str:
    """One history call as ``{"name": ..., "arguments": ...}`` (arguments parsed when JSON)."""
    fn = tool_call.get("function") or {}
    args: Any = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass
    return json.dumps({fmt.name_key: fn.get("name", ""), fmt.arguments_key: args},
                      ensure_ascii=False)
