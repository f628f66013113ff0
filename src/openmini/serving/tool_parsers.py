"""Tool calls in model output text -> neutral dataclasses, incrementally.

One parser serves both paths: the non-streaming result is the streaming parser fed the whole
text (`parse_tool_calls`), so a streamed answer always equals the non-streamed one. The
parser never raises on odd text (it has to survive any stream); with a grammar the text is
well formed anyway. It never imports the HTTP schema.

Formats are per model family (`ToolCallFormat`). ``HERMES`` is the one Qwen2.5's template
trains (``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, calls separated by
a newline); OpenMini's own tool prompt (serving/tools.py) asks other models for it too.

Text rules: text before, between and after calls is content; whitespace next to a call is
dropped; a possible start of the call marker is held back until it is decided. Inside a
call the ``name`` value starts the call (`ToolCallStarted`), the raw text of the
``arguments`` value streams out as `ToolCallArgumentsDelta` (so ``arguments`` is exactly the
JSON text the model wrote).

Two model quirks are handled (both optional):

* bare calls: with ``bare_call``, an output whose first non-blank character is ``{`` is one
  call written without markers (Qwen2.5-Coder does this; the grammar then forbids free text
  starting with ``{``).
* repeated calls: with ``stop_at_repeated_call``, a call identical (same name, equal
  arguments) to an earlier call of the same output ends the output and is dropped (small
  models loop ``A, B, A, B, ...``). Calls after the first are therefore held back until they
  are complete; ``stopped`` tells the caller it may stop generating.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ToolCallFormat:
    """How a model family writes tool calls and reads tool results.

    Attributes:
        name: family name (``hermes``).
        call_begin / call_end / call_separator: around / between calls (the grammar
            forces exactly these; the parser only needs the visible markers).
        name_key / arguments_key: keys of the call object.
        result_begin / result_end: around a tool result when OpenMini renders the
            conversation itself (templates without a tools section).
        bare_call: the family may write one call as plain JSON without markers (then in
            ``auto`` mode free text may not start with ``{``).
    """

    name: str
    call_begin: str
    call_end: str
    call_separator: str = "\n"
    name_key: str = "name"
    arguments_key: str = "arguments"
    result_begin: str = "<tool_response>\n"
    result_end: str = "\n</tool_response>"
    bare_call: bool = False

    @property
    def marker(self) -> str:
        """The visible start of a call (``<tool_call>``)."""
        return self.call_begin.strip()

    @property
    def end_marker(self) -> str:
        """The visible end of a call (``</tool_call>``)."""
        return self.call_end.strip()


HERMES = ToolCallFormat("hermes", call_begin="<tool_call>\n", call_end="\n</tool_call>",
                        bare_call=True)
"""Hermes / Qwen2.5 tool calls (NousResearch Hermes function-calling format); Qwen2.5-Coder
often leaves out the markers, hence ``bare_call``."""

TOOL_CALL_FORMATS = {"hermes": HERMES}


# ---- events and results --------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentDelta:
    """New answer text."""

    text: str


@dataclass(frozen=True)
class ToolCallStarted:
    """Call number ``index`` (0, 1, ...) to function ``name`` begins (arguments follow)."""

    index: int
    name: str


@dataclass(frozen=True)
class ToolCallArgumentsDelta:
    """More raw JSON text of call ``index``'s arguments."""

    index: int
    text: str


Event = ContentDelta | ToolCallStarted | ToolCallArgumentsDelta


@dataclass
class ParsedToolCall:
    """One call: function name and its arguments as JSON text (as the model wrote it)."""

    name: str
    arguments: str = ""


@dataclass
class ParsedOutput:
    """A whole output: ``content`` (None when there are calls and no text) and the calls."""

    content: str | None
    tool_calls: list[ParsedToolCall] = field(default_factory=list)


class ParsedOutputBuilder:
    """Accumulates events into a `ParsedOutput` (what a client that joins deltas sees)."""

    def __init__(self) -> None:
        self._content: list[str] = []
        self.tool_calls: list[ParsedToolCall] = []

    def add(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, ContentDelta):
                self._content.append(ev.text)
            elif isinstance(ev, ToolCallStarted):
                self.tool_calls.append(ParsedToolCall(ev.name))
            else:
                self.tool_calls[ev.index].arguments += ev.text

    def result(self) -> ParsedOutput:
        text = "".join(self._content)
        return ParsedOutput(text if text or not self.tool_calls else None,
                            list(self.tool_calls))


def parse_tool_calls(text: str, fmt: ToolCallFormat = HERMES, bare_call: bool = False,
                     stop_at_repeated_call: bool = True) -> tuple[ParsedOutput, bool]:
    """Parse a complete output (the streaming parser fed everything at once).

    Returns:
        The parsed output, and whether a repeated call ended it (see the module docstring).
    """
    parser = ToolCallStreamParser(fmt, bare_call, stop_at_repeated_call)
    builder = ParsedOutputBuilder()
    builder.add(parser.feed(text))
    builder.add(parser.finish())
    return builder.result(), parser.stopped


# ---- the streaming parser ------------------------------------------------------------------------


class ToolCallStreamParser:
    """Text deltas in, `Event` lists out (see the module docstring for the rules).

    Args:
        fmt: the model family's tool-call format.
        bare_call: an output starting with ``{`` is one call without markers.
        stop_at_repeated_call: a call equal to an earlier one ends the output (dropped).
    """

    def __init__(self, fmt: ToolCallFormat = HERMES, bare_call: bool = False,
                 stop_at_repeated_call: bool = True):
        self.fmt = fmt
        self.bare_call = bare_call
        self.stop_at_repeated_call = stop_at_repeated_call
        self.num_calls = 0
        self.stopped = False  # a repeated call ended the output; later text is ignored
        self._emitted_text = False
        self._bare = False  # the current call has no markers
        self._calls: list[tuple[str, str]] = []  # (name, arguments) of completed calls
        self._held_events: list[Event] = []  # events of the current call (index >= 1)
        self._mode = "text"  # text | call | end (after a call's JSON, before its end marker)
        self._held = ""  # text mode: undecided text (trailing blanks, a marker prefix)
        self._after_call = False  # text mode: drop leading blanks of this text segment
        self._call: _CallScanner | None = None
        self._end_seen = ""  # end mode: end-marker characters seen so far
        self._blanks = ""  # call mode: whitespace dropped before the marker

    def feed(self, text: str) -> list[Event]:
        """Events for the next piece of output text."""
        events: list[Event] = []
        pos = 0
        while pos < len(text) and not self.stopped:
            if self._mode == "text":
                pos = self._feed_text(text, pos, events)
            elif self._mode == "call":
                pos = self._feed_call(text, pos, events)
            else:
                pos = self._feed_end(text, pos, events)
        return _merge(events)

    def finish(self) -> list[Event]:
        """Events at the end of the output (held text; a cut-off call stays as it is)."""
        events: list[Event] = []
        if self.stopped:
            return events
        if self._mode == "text" and self._held:
            held = self._held.rstrip() if self.num_calls or self._after_call else self._held
            if held:
                self._content(events, held)
        elif self._mode == "call" and self._call is not None:
            if self._call.started:
                events.extend(self._held_events)  # a cut-off call stays as far as it went
            else:
                self._abandon_call(events)  # cut off before the name: keep it as text
        self._held, self._held_events = "", []
        return _merge(events)

    def _content(self, events: list[Event], text: str) -> None:
        events.append(ContentDelta(text))
        self._emitted_text = True

    # ---- text mode -----------------------------------------------------------------------------

    def _feed_text(self, text: str, pos: int, events: list[Event]) -> int:
        marker = self.fmt.marker
        buf = self._held + text[pos:]
        self._held = ""
        if self._after_call:
            stripped = buf.lstrip()
            if not stripped:
                self._held = buf
                return len(text)
            buf = stripped
            self._after_call = False
        if self.bare_call and not self._emitted_text and not self.num_calls:
            stripped = buf.lstrip()
            if not stripped:
                self._held = buf
                return len(text)
            if stripped[0] == "{":  # a call without markers
                self._start_call(buf[:len(buf) - len(stripped)], bare=True)
                return len(text) - len(stripped)
        k = buf.find(marker)
        if k >= 0:
            before = buf[:k].rstrip()
            if before:
                self._content(events, before)
            self._start_call(buf[len(before):k])
            # continue with the text after the marker (it is a suffix of ``text``)
            return len(text) - (len(buf) - k - len(marker))
        hold = _longest_prefix_suffix(buf, marker)
        head, tail = buf[:len(buf) - hold], buf[len(buf) - hold:]
        emit = head.rstrip()
        if emit:
            self._content(events, emit)
        self._held = head[len(emit):] + tail
        return len(text)

    # ---- call mode -----------------------------------------------------------------------------

    def _start_call(self, blanks: str, bare: bool = False) -> None:
        """Enter call mode; ``blanks`` (the dropped whitespace before the marker) comes back
        if this turns out not to be a call."""
        self._mode = "call"
        self._call = _CallScanner(self.fmt, self.num_calls)
        self._blanks = blanks
        self._bare = bare
        self._held_events = []

    def _feed_call(self, text: str, pos: int, events: list[Event]) -> int:
        call = self._call
        assert call is not None
        # the first call streams; later ones wait until complete (they may be repeats)
        hold = self.stop_at_repeated_call and call.index > 0
        sink = self._held_events if hold else events
        while pos < len(text):
            status = call.push(text[pos], sink)
            if status == "bad":  # not JSON of a call: the character goes back to text mode
                if call.started:
                    self._close_call(events)
                    self._mode, self._after_call = "text", True
                else:
                    self._abandon_call(events)
                return pos
            pos += 1
            if status == "done":
                if call.started:
                    self._close_call(events)
                    self._mode, self._end_seen = "end", ""
                    if self._bare:
                        self._mode, self._after_call = "text", True
                else:
                    self._abandon_call(events)
                return pos
        return pos

    def _close_call(self, events: list[Event]) -> None:
        """A call is complete: release its held events, or stop at a repeat."""
        call = self._call
        assert call is not None
        call_events = self._held_events  # empty unless this call was held back
        call.close(call_events)
        self._held_events = []
        key = (call.name or "", _normalized_json(call.arguments))
        if self.stop_at_repeated_call and call.index > 0 and key in self._calls:
            self.stopped = True
            self._mode, self._call = "text", None
            return
        events.extend(call_events)
        self._calls.append(key)
        self.num_calls += 1

    def _abandon_call(self, events: list[Event]) -> None:
        """Not a call after all: its raw text becomes content."""
        call = self._call
        assert call is not None
        marker = "" if self._bare else self.fmt.marker
        self._content(events, self._blanks + marker + call.raw)
        self._held_events = []
        self._call = None
        self._mode, self._held = "text", ""

    # ---- after a call's JSON: the end marker ----------------------------------------------

    def _feed_end(self, text: str, pos: int, events: list[Event]) -> int:
        end = self.fmt.end_marker
        while pos < len(text):
            ch = text[pos]
            candidate = self._end_seen + ch
            if end.startswith(candidate):
                self._end_seen = candidate
                pos += 1
                if candidate == end:
                    self._mode, self._after_call, self._call = "text", True, None
                    return pos
            elif not self._end_seen and ch.isspace():
                pos += 1
            else:  # no end marker: whatever follows is text
                self._mode, self._after_call, self._call = "text", True, None
                self._held = self._end_seen
                return pos
        return pos


class _CallScanner:
    """Scans one call's JSON object character by character (after the call marker).

    States: ``start`` (before ``{``), ``key`` / ``key_str`` / ``colon`` / ``value_start`` /
    ``value`` / ``after`` inside the top-level object. Nested values are tracked by depth,
    strings and escapes; the ``name`` value is decoded when complete, the raw characters of
    the ``arguments`` value are streamed (buffered until the name is known).
    """

    def __init__(self, fmt: ToolCallFormat, index: int):
        self.fmt = fmt
        self.index = index
        self.raw = ""  # accepted characters after the marker
        self.started = False  # ToolCallStarted emitted
        self._state = "start"
        self._key_raw = ""
        self._key: str | None = None
        self._value_raw = ""
        self._scalar = False
        self._depth = 0  # nesting inside the current value
        self._in_str = False
        self._esc = False
        self._args = ""
        self._args_done = False
        self.name: str | None = None

    @property
    def arguments(self) -> str:
        """The arguments text so far."""
        return self._args

    def push(self, ch: str, events: list[Event]) -> str:
        """Consume one character: "more", "done" (the object closed) or "bad" (not part of a
        call object; the character is not consumed)."""
        st = self._state
        if st == "value":
            if self._scalar and (ch in ",}" or ch.isspace()):
                self._end_value(events)  # a number / true / false / null ended before ch
                return self.push(ch, events)
            self._value_char(ch, events)
        elif st == "key_str":
            self._key_raw += ch
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._key = _json_string(self._key_raw)
                self._state = "colon"
        elif ch.isspace():
            pass
        elif st == "start" and ch == "{":
            self._state = "key"
        elif st == "key" and ch == '"':
            self._state, self._key_raw = "key_str", '"'
        elif st == "colon" and ch == ":":
            self._state = "value_start"
        elif st == "value_start":
            self._state, self._value_raw, self._depth = "value", "", 0
            self._scalar = ch not in '"{['
            self._value_char(ch, events)
        elif st == "after" and ch == ",":
            self._state = "key"
        elif st in ("after", "key") and ch == "}":
            self.raw += ch
            return "done"
        else:
            return "bad"
        self.raw += ch
        return "more"

    def _value_char(self, ch: str, events: list[Event]) -> None:
        self._value_raw += ch
        if self._key == self.fmt.arguments_key and not self._args_done:
            self._args += ch
            if self.started:
                events.append(ToolCallArgumentsDelta(self.index, ch))
        if self._scalar:
            return
        complete = False
        if self._in_str:
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
                complete = self._depth == 0
        elif ch == '"':
            self._in_str = True
        elif ch in "{[":
            self._depth += 1
        elif ch in "}]":
            self._depth -= 1
            complete = self._depth == 0
        if complete:
            self._end_value(events)

    def _end_value(self, events: list[Event]) -> None:
        """A top-level value is complete."""
        self._state = "after"
        if self._key == self.fmt.name_key and not self.started:
            name = _json_string(self._value_raw)
            if name is not None:
                self.started, self.name = True, name
                events.append(ToolCallStarted(self.index, name))
                if self._args:
                    events.append(ToolCallArgumentsDelta(self.index, self._args))
        elif self._key == self.fmt.arguments_key and self._args:
            self._args_done = True

    def close(self, events: list[Event]) -> None:
        """The call ends: a call that wrote no arguments gets ``{}``."""
        if self.started and not self._args:
            self._args = "{}"
            events.append(ToolCallArgumentsDelta(self.index, "{}"))


# ---- helpers ------------------------------------------------------------------------------------


def _json_string(raw: str) -> str | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


def _normalized_json(text: str) -> str:
    """JSON text in a canonical form (sorted keys, no blanks), or the stripped text."""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except ValueError:
        return text.strip()


def _longest_prefix_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _merge(events: list[Event]) -> list[Event]:
    """Join neighbouring content deltas and argument deltas of the same call."""
    out: list[Event] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, ContentDelta) and isinstance(last, ContentDelta):
            out[-1] = ContentDelta(last.text + ev.text)
        elif (isinstance(ev, ToolCallArgumentsDelta) and isinstance(last, ToolCallArgumentsDelta)
              and ev.index == last.index):
            out[-1] = ToolCallArgumentsDelta(ev.index, last.text + ev.text)
        else:
            out.append(ev)
    return out
