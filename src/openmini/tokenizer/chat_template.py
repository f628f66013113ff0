"""Sandboxed Jinja chat templates whose message text never becomes control tokens (C17).

`ChatTemplate.render_ids` renders a HF chat template (same Jinja environment as
``transformers``: ``ImmutableSandboxedEnvironment``, ``trim_blocks``, ``lstrip_blocks``,
``raise_exception``, ``tojson``, ``strftime_now``, ``{% generation %}``, loop controls) and
tokenizes it so that only the template's own scaffolding yields control tokens:

1. Render the real conversation -> text ``R``.
2. Render again with every non-empty message ``content`` replaced by a unique sentinel (a
   private-use character pair around a number), and every control-token string elsewhere
   (tool-call arguments, tool schemas) replaced by a sentinel too. Put the originals back; if
   that gives exactly ``R``, the sentinels mark the *protected spans* of ``R``. A template that
   transforms content (``content | trim``, ``content.split(...)``) does not give ``R``; then a
   second render protects only the control-token strings found inside content (they survive
   such transforms); if even that fails while content holds control-token strings, the
   request is refused with `ChatTemplateError` rather than tokenized unsafely.
3. Encode ``R`` with special tokens parsed. If no control token overlaps a protected span
   (all ordinary content), these are the ids -- identical to ``transformers``'
   ``apply_chat_template(..., tokenize=True)``, BPE merges across content boundaries
   included. Otherwise control tokens are taken only from the scaffolding and the text
   between them (scaffolding + content together, so pre-tokenization sees the same context)
   is encoded as plain text.

Control tokens are the tokenizer's special tokens plus any added token whose text appears
in the template (e.g. Qwen's ``<tool_call>``), the same set ``transformers`` guards with
``sanitize_control_tokens``.

Mid-conversation system messages (C10): if the template raises, later system messages are
folded into user text and the render is retried (see `fold_system_messages`).
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from openmini.tokenizer.chat_messages import (
    ChatTemplateError,
    fold_system_messages,
    normalize_messages,
)
from openmini.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "DEFAULT_CHAT_TEMPLATE"]

#: ChatML, used when a model ships no chat template.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: First code point tried for sentinel delimiters (Supplementary Private Use Area-B).
_SENTINEL_BASE = 0x10FF00

Span = tuple[int, int]


class ChatTemplate:
    """A compiled chat template bound to a tokenizer.

    Args:
        template_str: Jinja source (HF format), or None for `DEFAULT_CHAT_TEMPLATE`.
        tokenizer: supplies ``bos_token``/``eos_token`` variables, encodings and BOS policy.

    Raises:
        ChatTemplateError: the template does not compile.
    """

    def __init__(self, template_str: str | None, tokenizer: Tokenizer):
        self.source = template_str if template_str else DEFAULT_CHAT_TEMPLATE
        self.tokenizer = tokenizer
        env = _make_environment()
        try:
            self._template = env.from_string(self.source)
            variables = meta.find_undeclared_variables(env.parse(self.source))
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"invalid chat template: {exc}") from exc
        #: the template references a ``tools`` variable (renders OpenAI tool schemas itself).
        self.uses_tools = "tools" in variables
        self.control_token_ids = frozenset(
            tokenizer.special_token_ids
            | {i for i, text in tokenizer.added_tokens.items()
               if text in self.source and not text.isspace()})
        strings = sorted({tokenizer.added_tokens[i] for i in self.control_token_ids
                          if i in tokenizer.added_tokens}, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, strings))) if strings else None

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> "ChatTemplate":
        """The tokenizer's own template, or ChatML when it has none."""
        return cls(tokenizer.chat_template, tokenizer)

    # ---- public API ---------------------------------------------------------------------------

    def render_text(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                    add_generation_prompt: bool = True, **extra: Any) -> str:
        """The rendered prompt text (for debugging and logs; BOS not added).

        Raises:
            ChatTemplateError: as `render_ids`.
        """
        now = datetime.now()
        _, text = self._render_folding(normalize_messages(messages), tools,
                                       add_generation_prompt, extra, now)
        return text

    def render_ids(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                   add_generation_prompt: bool = True, **extra: Any) -> list[int]:
        """Prompt token ids of a conversation; message text is always plain text (C17).

        Args:
            messages: OpenAI chat messages (``developer`` is treated as ``system``; text
                parts are joined; see `normalize_messages`).
            tools: OpenAI function tool schemas, passed to the template as ``tools``.
            add_generation_prompt: end with the assistant-turn header.
            **extra: further template variables (e.g. ``enable_thinking``).

        Returns:
            Token ids, starting with exactly one BOS when the tokenizer wants BOS.

        Raises:
            ChatTemplateError: the template rejects the conversation (after folding system
                messages), a message is malformed, or content holding control-token text
                cannot be kept apart from the template's control tokens.
        """
        now = datetime.now()
        msgs, text = self._render_folding(normalize_messages(messages), tools,
                                          add_generation_prompt, extra, now)
        spans = self._protected_spans(msgs, tools, add_generation_prompt, extra, now, text)
        ids = self._encode_protected(text, spans)
        bos = self.tokenizer.bos_token_id
        if self.tokenizer.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    # ---- rendering ----------------------------------------------------------------------------

    def _render(self, messages: Any, tools: Any, add_generation_prompt: bool,
                extra: Mapping[str, Any], now: datetime) -> str:
        """One template render; every failure becomes `ChatTemplateError`."""
        variables: dict[str, Any] = {}
        if self.tokenizer.bos_token is not None:
            variables["bos_token"] = self.tokenizer.bos_token
        if self.tokenizer.eos_token is not None:
            variables["eos_token"] = self.tokenizer.eos_token
        variables.update(extra)
        variables.update(messages=messages, tools=tools,
                         add_generation_prompt=add_generation_prompt,
                         strftime_now=now.strftime)
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any template failure is a client error
            raise ChatTemplateError(f"chat template error: {type(exc).__name__}: {exc}") from exc

    def _render_folding(self, messages: list[dict[str, Any]], tools: Any,
                        add_generation_prompt: bool, extra: Mapping[str, Any], now: datetime
                        ) -> tuple[list[dict[str, Any]], str]:
        """Render; if the template raises, fold later system messages (then all) and retry.

        Returns the messages actually rendered and the text. Raises the first error when no
        folding helps.
        """
        try:
            return messages, self._render(messages, tools, add_generation_prompt, extra, now)
        except ChatTemplateError as first_error:
            for keep_leading in (True, False):
                folded = fold_system_messages(messages, keep_leading)
                if folded is None:
                    continue
                try:
                    return folded, self._render(folded, tools, add_generation_prompt, extra, now)
                except ChatTemplateError:
                    continue
            raise first_error

    # ---- protected spans ----------------------------------------------------------------------

    def _protected_spans(self, messages: list[dict[str, Any]], tools: Any,
                         add_generation_prompt: bool, extra: Mapping[str, Any], now: datetime,
                         text: str) -> list[Span]:
        """Character spans of ``text`` that came from client strings (see module docstring)."""
        open_, close = _choose_delimiters(_strings(messages, tools, extra))
        for whole_content in (True, False):
            prot = _Protector(open_, close, self._control_re)
            p_msgs = [prot.message(m, whole_content) for m in messages]
            p_tools, p_extra = prot.walk(tools), prot.walk(dict(extra))
            if not prot.originals:
                return []  # nothing to protect: ``text`` is rendered from these very inputs
            try:
                rendered = self._render(p_msgs, p_tools, add_generation_prompt, p_extra, now)
            except ChatTemplateError:
                continue
            restored = prot.restore(rendered)
            if restored is not None and restored[0] == text:
                return restored[1]
        raise ChatTemplateError(
            "the chat template transforms message text in a way that prevents keeping "
            "control-token strings in the messages apart from the template's control tokens")

    def _encode_protected(self, text: str, spans: list[Span]) -> list[int]:
        """Ids of ``text`` where no control token comes from inside a protected span."""
        tok, control = self.tokenizer, self.control_token_ids
        ids, offsets = tok.encode_with_offsets(text, parse_special=True)
        starts = [s for s, _ in spans]
        if not any(i in control and _overlaps(off, spans, starts) for i, off in zip(ids, offsets)):
            return list(ids)
        # Anchors: control tokens found inside the scaffolding alone.
        anchors: list[tuple[int, int, int]] = []
        for a, b in _complement(spans, len(text)):
            seg_ids, seg_offsets = tok.encode_with_offsets(text[a:b], parse_special=True)
            anchors.extend((a + s, a + e, i) for i, (s, e) in zip(seg_ids, seg_offsets)
                           if i in control)
        out: list[int] = []
        pos = 0
        for s, e, i in anchors:
            out.extend(self._encode_plain(text[pos:s]))
            out.append(i)
            pos = e
        out.extend(self._encode_plain(text[pos:]))
        return out

    def _encode_plain(self, run: str) -> list[int]:
        """Plain-text ids of a run between scaffolding control tokens; a non-special added
        token the template uses (only possible from client text here) is not matched."""
        if not run:
            return []
        ids = self.tokenizer.encode(run)
        if any(i in self.control_token_ids for i in ids):
            ids = self.tokenizer.encode_without_added_tokens(run)
        return ids


# ---- sentinels ----------------------------------------------------------------------------------


class _Protector:
    """Replaces client strings by sentinels ``<open><n><close>`` and puts them back."""

    def __init__(self, open_: str, close: str, control_re: re.Pattern[str] | None):
        self.open, self.close, self.control_re = open_, close, control_re
        self.originals: list[str] = []
        self._pattern = re.compile(re.escape(open_) + r"(\d+)" + re.escape(close))

    def _sentinel(self, original: str) -> str:
        self.originals.append(original)
        return f"{self.open}{len(self.originals) - 1}{self.close}"

    def walk(self, value: Any) -> Any:
        """Copy of ``value`` with control-token strings in every string replaced."""
        if isinstance(value, str):
            if self.control_re is None:
                return value
            return self.control_re.sub(lambda m: self._sentinel(m.group(0)), value)
        if isinstance(value, Mapping):
            return {self.walk(k): self.walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.walk(v) for v in value]
        return value

    def message(self, msg: Mapping[str, Any], whole_content: bool) -> dict[str, Any]:
        """Copy of a message: its whole content replaced (``whole_content``) or walked."""
        out = {}
        for key, value in msg.items():
            if key == "content" and whole_content and isinstance(value, str):
                out[key] = self._sentinel(value) if value else value
            else:
                out[key] = self.walk(value)
        return out

    def restore(self, rendered: str) -> tuple[str, list[Span]] | None:
        """Originals put back -> (text, protected spans); None if a sentinel was mangled."""
        parts: list[str] = []
        spans: list[Span] = []
        length = pos = 0
        for m in self._pattern.finditer(rendered):
            index = int(m.group(1))
            if index >= len(self.originals):
                return None
            between = rendered[pos:m.start()]
            original = self.originals[index]
            parts += [between, original]
            spans.append((length + len(between), length + len(between) + len(original)))
            length += len(between) + len(original)
            pos = m.end()
        parts.append(rendered[pos:])
        if any(self.open in p or self.close in p for p in parts[::2]):
            return None
        return "".join(parts), spans


def _strings(*values: Any) -> Iterable[str]:
    """Every string (keys included) inside nested dicts/lists."""
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            yield v
        elif isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple)):
            stack.extend(v)


def _choose_delimiters(strings: Iterable[str]) -> tuple[str, str]:
    """Two private-use characters that occur in none of ``strings``."""
    used = set()
    for s in strings:
        used.update(c for c in s if ord(c) >= 0xF0000)
    free = (chr(cp) for cp in range(_SENTINEL_BASE, 0x10FFFE) if chr(cp) not in used)
    return next(free), next(free)


def _overlaps(offset: tuple[int, int], spans: list[Span], starts: list[int]) -> bool:
    """Does ``[start, end)`` intersect one of the sorted, disjoint ``spans``?"""
    s, e = offset
    k = bisect.bisect_right(starts, s) - 1
    for j in (k, k + 1):
        if 0 <= j < len(spans) and spans[j][0] < max(e, s + 1) and s < spans[j][1]:
            return True
    return False


def _complement(spans: list[Span], length: int) -> list[Span]:
    """Gaps of ``[0, length)`` between sorted, disjoint ``spans``."""
    gaps, pos = [], 0
    for s, e in spans:
        if s > pos:
            gaps.append((pos, s))
        pos = max(pos, e)
    if pos < length:
        gaps.append((pos, length))
    return gaps


# ---- Jinja environment --------------------------------------------------------------------------


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (HF assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _Namespace(jinja2.utils.Namespace):
    """``namespace()`` that refuses underscore attribute names (no access to internals)."""

    def __init__(*args: Any, **kwargs: Any):  # noqa: N805 - same trick as jinja2.utils.Namespace
        self, rest = args[0], args[1:]
        for name in dict(*rest, **kwargs):
            _check_attribute(name)
        jinja2.utils.Namespace.__init__(self, *rest, **kwargs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attribute(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attribute(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    """Template helper ``raise_exception(msg)`` (HF): aborts the render with ``msg``."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """HF's ``tojson``: ``json.dumps`` without HTML escaping, non-ASCII kept by default."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Template helper ``strftime_now(fmt)``: the current local time formatted."""
    return datetime.now().strftime(fmt)


def _make_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment HF ``apply_chat_template`` renders in (sandboxed, immutable)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env
