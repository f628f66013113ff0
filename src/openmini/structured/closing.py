"""Budget-aware closing: end a constrained output validly before ``max_tokens`` runs out.

A grammar guarantees that every *finished* output is valid, but not that the model ever
finishes: a small model may write digits, an array item or a sentence inside a string
forever, and the output is then cut off by ``max_tokens`` (invalid JSON, ``finish_reason:
"length"``). This module plans a short way from the current grammar state to a state where
the output may end, so the matcher (`GrammarMatcher` in ``llguidance_backend``) can force
that plan once the remaining budget only just covers it.

The plan is found on a copy of the llguidance matcher (the grammar is the oracle, so every
planned token is valid by construction) by a greedy walk over single-byte tokens:

* bytes the grammar forces (keys of required properties, the rest of ``null``, a call's
  closing tag) are taken as the grammar's fast-forward tokens;
* inside a JSON string, the closing quote when the grammar allows it; otherwise a content
  byte that lets the string close next, else one that leads the grammar somewhere new
  (a different allowed-token mask: this walks out of ``pattern`` / ``format`` loops such as
  ``[a-z]+@``), else the first allowed one;
* outside strings, ``}`` / ``]`` when allowed, else the first value start (``0``, ``""``,
  ``null``, ``false``, ``{}``, ``[]``, ...) or separator after which the value is complete,
  with the same fallbacks;
* the end-of-sequence token once the grammar accepts (not needed when it has stopped).

The walk is a heuristic for the *shortest* completion (exact for JSON structure: closing
strings, containers, the shortest value of each required property or item); it never
produces an invalid token, and when it does not fit the budget nothing is forced and the
output ends with ``length`` as before. Whitespace is never planned.

A JSON lexical state (inside a string or not) is kept over the output's bytes to choose the
preference order; it restarts after a tool-call marker (``<tool_call>``), where a call's JSON
begins after free text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import numpy as np

CLOSING_MARGIN_TOKENS = 1
"""Tokens of slack (tokens left minus the plan's length) at which the plan is forced token
by token."""

NEAR_END_TOKENS = 8
"""The least slack at which the model's freedom narrows (the *window*): outside a JSON
string the plan is forced at once, inside a string the model may go on with plain string
tokens (no quote, no backslash, whole UTF-8 characters), which do not lengthen the plan,
until the slack reaches `CLOSING_MARGIN_TOKENS`. The window widens to what one token could
add instead of closing (one more array item or property after ``,``; measured by
`plan_completion`'s ``reopen``) plus the margin. One more tool call is checked exactly
instead, where it can start: at a complete output (`BudgetCloser`)."""

ANOTHER_CALL_FACTOR = 2
"""At a complete output that could go on with one more tool call, the output ends unless
the tokens left exceed this many times the shortest such call: the shortest call uses the
cheapest tool, and the model's choice of another tool (its name is one token) can cost
more arguments than the plan could absorb."""

REPLAN_EVERY_STEPS = 16
"""At most this many steps between plan recomputations while the slack is large; the gap
is an eighth of the slack, so even a model that lengthens the plan by several tokens per
step cannot overrun it unseen. Inside the window the plan is recomputed every step."""

_READY_PROBES = 24
"""Candidate bytes tried per choice for "completes the value next" (each probe costs one
consume + mask + rollback, about 15-40 µs)."""

_VALUE_ORDER = b'0"ntf{[123456789-,:.eE+'
"""Preference outside strings: the shortest JSON values first (``0``, ``""``, ``null``,
``true``, ``false``, ``{}``, ``[]``), then other number bytes and separators."""

_STRING_ORDER = b"1aA0-.:@TZ+/_ zZ9"
"""Preference inside strings (the quote is tried before): bytes that satisfy common
``format`` / ``pattern`` shapes (digits, letters, date/time/e-mail/URI punctuation);
``1`` before ``0`` so dates become ``1111-11-11``, not the invalid year ``0000``."""

_WHITESPACE = b" \t\r\n"


def _byte_order(first: bytes) -> bytes:
    """``first``, then printable ASCII, then UTF-8 lead/continuation bytes, then whitespace
    and control bytes (never ``"`` or ``\\`` unless listed in ``first``)."""
    seen = set(first)
    rest = [b for b in range(0x21, 0x7F) if b not in seen and b not in b'"\\']
    high = [b for b in range(0x80, 0x100) if b not in seen]
    low = [b for b in range(0x00, 0x21) if b not in seen and b not in _WHITESPACE]
    ws = [b for b in _WHITESPACE if b not in seen]
    return first + bytes(rest) + bytes(high) + bytes(ws) + bytes(low)


_ORDER_OUTSIDE = _byte_order(_VALUE_ORDER)
_ORDER_INSIDE = _byte_order(_STRING_ORDER)


@dataclass
class JsonLexState:
    """Whether the bytes so far end inside a JSON string (escape-aware).

    Args:
        reset_after: a marker after which JSON starts afresh (a tool-call tag); free text
            before it may hold quotes. ``b""`` for none.
    """

    reset_after: bytes = b""
    in_string: bool = False
    escaped: bool = False
    _tail: bytes = b""

    def copy(self) -> JsonLexState:
        return JsonLexState(self.reset_after, self.in_string, self.escaped, self._tail)

    def feed(self, data: bytes) -> None:
        """Advance over ``data`` (bytes of accepted tokens)."""
        marker = self.reset_after
        if marker:
            combined = self._tail + data
            k = combined.rfind(marker)
            if k >= 0:  # JSON starts afresh after the marker
                self.in_string = self.escaped = False
                data = combined[k + len(marker):]
            self._tail = combined[-(len(marker) - 1):] if len(marker) > 1 else b""
        for b in data:
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif b == 0x5C:  # backslash
                    self.escaped = True
                elif b == 0x22:  # quote
                    self.in_string = False
            elif b == 0x22:
                self.in_string = True


@dataclass(frozen=True, eq=False)
class ClosingVocab:
    """What the planner needs of the vocabulary.

    Args:
        byte_tokens: per byte value 0..255, a token id whose bytes are exactly that byte
            (-1 when the vocabulary has none).
        eos_token_id: the end-of-sequence id the plan ends with when the grammar accepts.
        mask_words: int32 words of one allowed-token bitmask (``ceil(V / 32)``).
        plain_string_bits: int32 ``[mask_words]`` bitmask of the tokens that are plain
            JSON string content: whole UTF-8 characters, no quote, backslash or control
            character (they cannot leave a string or start an escape).
    """

    byte_tokens: tuple[int, ...]
    eos_token_id: int
    mask_words: int
    plain_string_bits: np.ndarray

    @staticmethod
    def from_token_bytes(tokens: Sequence[bytes], special: set[int], eos_token_id: int,
                         mask_size: int) -> ClosingVocab:
        """Build from each id's bytes (``special`` ids are neither bytes nor content)."""
        table = [-1] * 256
        words = (mask_size + 31) // 32
        plain = np.zeros(words * 32, dtype=np.uint8)
        for i, b in enumerate(tokens):
            if i in special or not b:
                continue
            if len(b) == 1 and table[b[0]] < 0:
                table[b[0]] = i
            plain[i] = _is_plain_string_content(b)
        bits = np.packbits(plain, bitorder="little").view(np.int32)
        return ClosingVocab(tuple(table), eos_token_id, words, bits)


def _is_plain_string_content(data: bytes) -> bool:
    """Whole UTF-8 characters with no ``"``, ``\\`` or control character."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not any(ch in '"\\' or ord(ch) < 0x20 for ch in text)


def _bit(mask: np.ndarray, token_id: int) -> bool:
    """Bit ``token_id`` of an int32 bitmask."""
    return bool((int(mask[token_id >> 5]) >> (token_id & 31)) & 1)


def _fingerprint(mask: np.ndarray) -> int:
    """A hash of an allowed-token bitmask (a proxy for the grammar state)."""
    return hash(mask.tobytes())


class _Probe:
    """A matcher copy with a reusable mask buffer (the planner's working state)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: ClosingVocab):
        self.m = matcher
        self.vocab = vocab
        self.mask = np.zeros(vocab.mask_words, dtype=np.int32)

    def fill(self) -> np.ndarray:
        self.m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        return self.mask

    @staticmethod
    def allows(mask: np.ndarray, token_id: int) -> bool:
        return token_id >= 0 and _bit(mask, token_id)

    def allowed_bytes(self, mask: np.ndarray, order: bytes) -> list[int]:
        return [b for b in order if self.allows(mask, self.vocab.byte_tokens[b])]

    def ready_after(self, byte: int, lex: JsonLexState) -> tuple[bool, int]:
        """Consume ``byte``, report whether the value (or string) can be completed by the
        very next byte, and the mask's fingerprint there; then roll back."""
        tok = self.vocab.byte_tokens[byte]
        if not self.m.consume_token(tok):  # cannot happen for an allowed byte
            return False, 0
        try:
            if self.m.is_stopped() or self.m.is_accepting():
                return True, 0
            post = lex.copy()
            post.feed(bytes([byte]))
            mask = self.fill()
            if post.in_string:
                ready = self.allows(mask, self.vocab.byte_tokens[0x22])
            else:
                ready = any(self.allows(mask, self.vocab.byte_tokens[c]) for c in b"}],:")
            return ready, _fingerprint(mask)
        finally:
            self.m.rollback(1)


def plan_completion(matcher: llguidance.LLMatcher, lex: JsonLexState, vocab: ClosingVocab,
                    tokenizer: llguidance.LLTokenizer, max_tokens: int,
                    reopen: list[int] | None = None) -> list[int] | None:
    """A short token sequence that takes ``matcher`` to where the output may end.

    With ``reopen`` (a list to fill), the walk also measures what the model could add with
    one token instead of letting a container end: wherever the plan closes an object or
    array that could take one more item (``,`` allowed), the plan from that alternative is
    computed too and its total length (tokens from the current state) appended.

    Args:
        matcher: the sequence's matcher (not modified; the walk runs on a copy).
        lex: the JSON lexical state after the output so far (not modified).
        vocab: single-byte tokens and the end-of-sequence id.
        tokenizer: the llguidance token view the matcher was compiled with (decodes
            fast-forward tokens; tokenizes forced bytes it does not fast-forward).
        max_tokens: give up once the plan would be longer than this (tokens).

    Returns:
        Token ids, each accepted by the grammar in turn; the last is ``vocab.eos_token_id``
        unless the grammar stops by itself. ``[]`` when the grammar has already stopped.
        None when no plan of at most ``max_tokens`` tokens was found (or the matcher is in
        an error state).
    """
    if matcher.is_error():
        return None
    probe = _Probe(matcher.deep_copy(), vocab)
    m = probe.m
    lex = lex.copy()
    plan: list[int] = []
    seen: set[int] = set()  # mask fingerprints met since the last structural byte
    while len(plan) <= max_tokens:
        if m.is_stopped():
            return plan if not m.is_error() else None
        if m.is_accepting():
            plan.append(vocab.eos_token_id)
            return plan if len(plan) <= max_tokens else None
        ff = m.compute_ff_tokens()
        if not ff:
            forced = m.compute_ff_bytes()
            if forced:
                ff = tokenizer.tokenize_bytes(forced)
                ff = ff[:m.validate_tokens(ff)]
        if ff:
            if not m.consume_tokens(ff):
                return None
            plan += ff
            lex.feed(tokenizer.decode_bytes(ff))
            seen.clear()
            continue
        byte = _choose_byte(probe, lex, seen)
        if byte is None:
            return None
        if reopen is not None and byte in b"}]" and not lex.in_string:
            _probe_reopen(probe, lex, b",", plan, vocab, tokenizer, max_tokens, reopen)
        tok = vocab.byte_tokens[byte]
        if not m.consume_token(tok):
            return None
        plan.append(tok)
        was_in_string = lex.in_string
        lex.feed(bytes([byte]))
        if was_in_string != lex.in_string or (not lex.in_string and byte in b",:}]"):
            seen.clear()
    return None


def _probe_reopen(probe: _Probe, lex: JsonLexState, alternative: bytes, plan: list[int],
                  vocab: ClosingVocab, tokenizer: llguidance.LLTokenizer, max_tokens: int,
                  out: list[int]) -> None:
    """If the one-byte ``alternative`` is allowed at the walk's current state, append
    ``len(plan) + 1 + len(plan from after it)`` to ``out`` (nothing when none fits)."""
    tok = vocab.byte_tokens[alternative[0]]
    mask = probe.fill()
    if not probe.allows(mask, tok):
        return
    other = probe.m.deep_copy()
    if not other.consume_token(tok):
        return
    after = lex.copy()
    after.feed(alternative)
    rest = plan_completion(other, after, vocab, tokenizer, max_tokens)
    if rest is not None:
        out.append(len(plan) + 1 + len(rest))


def _choose_byte(probe: _Probe, lex: JsonLexState, seen: set[int]) -> int | None:
    """The next planned byte (see the module docstring), or None when no single-byte token
    is allowed."""
    mask = probe.fill()
    seen.add(_fingerprint(mask))
    if lex.in_string:
        if probe.allows(mask, probe.vocab.byte_tokens[0x22]):
            return 0x22
        candidates = probe.allowed_bytes(mask, _ORDER_INSIDE)
    else:
        for closer in b"}],:":  # a complete value: close its container or go on
            if probe.allows(mask, probe.vocab.byte_tokens[closer]):
                return closer
        candidates = probe.allowed_bytes(mask, _ORDER_OUTSIDE)
        solid = [b for b in candidates if b not in _WHITESPACE]
        candidates = solid or candidates  # whitespace only when nothing else is allowed
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    first_new = None
    for byte in candidates[:_READY_PROBES]:
        ready, fingerprint = probe.ready_after(byte, lex)
        if ready:
            return byte
        if first_new is None and fingerprint not in seen:
            first_new = byte
    return first_new if first_new is not None else candidates[0]


FORCE = "force"
"""`BudgetCloser.restriction` kind: only the given token may come next."""
PLAIN = "plain"
"""`BudgetCloser.restriction` kind: the grammar's tokens that are plain string content
(`ClosingVocab.plain_string_bits`), and the given token (the plan's next one)."""


class BudgetCloser:
    """One sequence's closing state: decides, before each token, how the grammar's mask
    must be narrowed so that the output can still close validly within the budget.

    The plan (`plan_completion`) is recomputed now and then (see `REPLAN_EVERY_STEPS`);
    with ``slack = tokens left - len(plan)`` and ``window`` = `NEAR_END_TOKENS` or, when
    larger, the margin plus what one model token could add instead of closing (one more
    array item, property or tool call: a comma before an array of objects with required
    fields can add tens of tokens):

    * ``slack > window``: the grammar's mask as it is;
    * ``slack <= window``: outside a JSON string the plan is forced from here; inside
      one, the model may continue with plain string content (`PLAIN`);
    * ``slack <= CLOSING_MARGIN_TOKENS``: the plan is forced token by token (`FORCE`).

    At a complete output that could go on with one more tool call, the output is ended
    when `ANOTHER_CALL_FACTOR` times the shortest such call would not fit any more.

    A plan longer than the tokens left is never forced (the output then ends with
    ``length``, as when ``max_tokens`` is too small for any valid output), nor is a bare
    end-of-sequence when the output may be free text (cutting text short is a ``length``
    finish, not a ``stop``).

    Args:
        vocab: single-byte tokens, plain string tokens and the end-of-sequence id.
        tokenizer: the llguidance token view the grammar was compiled with.
        max_tokens: the sequence's output budget (tokens, end-of-sequence included).
        marker: bytes after which a tool call's JSON starts (``b""`` for none).
        may_force_end: False when the output may be free text (``TEXT`` answers).
    """

    def __init__(self, vocab: ClosingVocab, tokenizer: llguidance.LLTokenizer,
                 max_tokens: int, marker: bytes = b"", may_force_end: bool = True):
        self.vocab = vocab
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.may_force_end = may_force_end
        self.lex = JsonLexState(reset_after=marker)
        self.num_accepted = 0
        self.num_plans = 0  # plans computed (for tests and stats)
        self._forced: list[int] = []  # the plan being forced, next token first
        self._next_check_at = 0  # num_accepted at which to plan again
        self._last: tuple[int, tuple[str, int] | None] = (-1, None)  # (num_accepted, answer)
        self._window = NEAR_END_TOKENS  # slack at which the model's freedom narrows
        self._string_plan: list[int] | None = None  # a plan that starts by closing the
        # current string, valid while only plain content is added to that string
        self.closed_early = False  # a closing plan was forced: the output is cut short

    @property
    def closing(self) -> bool:
        """True while a plan is being forced."""
        return bool(self._forced)

    def restriction(self, matcher: llguidance.LLMatcher) -> tuple[str, int] | None:
        """How to narrow the next token's mask: None (the grammar's mask), ``(FORCE,
        token)`` or ``(PLAIN, token)``. Calls before the same token get the same answer."""
        if self._last[0] != self.num_accepted:
            self._last = (self.num_accepted, self._decide(matcher))
            if self._last[1] is not None and self._last[1][0] == FORCE:
                self.closed_early = True
        return self._last[1]

    def _decide(self, matcher: llguidance.LLMatcher) -> tuple[str, int] | None:
        if self._forced:
            return FORCE, self._forced[0]
        left = self.max_tokens - self.num_accepted
        if left <= 0 or matcher.is_stopped():
            return None
        if self.num_accepted < self._next_check_at and not (
                self.may_force_end and matcher.is_accepting()):  # a complete output is
            return None  # checked at once: one more tool call may start from it
        plan = self._cached_string_plan(matcher)
        if plan is None:
            reopen: list[int] = []
            plan = plan_completion(matcher, self.lex, self.vocab, self.tokenizer, left, reopen)
            self.num_plans += 1
            if plan is not None:
                self._window = max(NEAR_END_TOKENS, CLOSING_MARGIN_TOKENS + max(
                    [n - len(plan) for n in reopen], default=0))
            quote = self.vocab.byte_tokens[0x22]
            self._string_plan = (plan if plan and self.lex.in_string and plan[0] == quote
                                 else None)
        if plan is None:  # nothing fits now; the model may still close things itself
            self._next_check_at = self.num_accepted + max(1, min(REPLAN_EVERY_STEPS, left // 8))
            return None
        slack = left - len(plan)
        if not plan or (plan == [self.vocab.eos_token_id] and not self.may_force_end):
            self._next_check_at = self.num_accepted + 1
            return None
        if plan == [self.vocab.eos_token_id]:  # complete: may one more tool call start?
            more = self._one_more_call(matcher, left)
            if more is not None:
                self._next_check_at = self.num_accepted + 1
                if ANOTHER_CALL_FACTOR * more + CLOSING_MARGIN_TOKENS > left:  # end here
                    self._forced = plan
                    return FORCE, plan[0]
                return None
        if slack <= CLOSING_MARGIN_TOKENS or (
                slack <= self._window and not self.lex.in_string):
            self._forced = plan
            return FORCE, plan[0]
        if slack <= self._window:
            self._next_check_at = self.num_accepted + 1
            return PLAIN, plan[0]
        self._next_check_at = self.num_accepted + max(
            1, min(REPLAN_EVERY_STEPS, (slack - self._window) // 8))
        return None

    def _one_more_call(self, matcher: llguidance.LLMatcher, left: int) -> int | None:
        """At a complete output that may go on with the call separator (``\\n``, then
        another tool call): the tokens of the shortest such continuation (``left + 1``
        when none fits in ``left``); None when the separator is not allowed."""
        probe = _Probe(matcher.deep_copy(), self.vocab)
        newline = self.vocab.byte_tokens[0x0A]
        if not probe.allows(probe.fill(), newline) or not probe.m.consume_token(newline):
            return None
        after = self.lex.copy()
        after.feed(b"\n")
        rest = plan_completion(probe.m, after, self.vocab, self.tokenizer, left)
        return left + 1 if rest is None else 1 + len(rest)

    def _cached_string_plan(self, matcher: llguidance.LLMatcher) -> list[int] | None:
        """The last plan again when it closes the current string first and only plain
        content was added since: what follows a string does not depend on its content
        once the closing quote is allowed (the whole plan is validated again here)."""
        plan = self._string_plan
        if plan is None or not self.lex.in_string or \
                matcher.validate_tokens(plan) != len(plan):
            return None
        return plan

    def on_accept(self, token_id: int) -> None:
        """Record a token the grammar accepted (forced or chosen by the model)."""
        self.num_accepted += 1
        if self._string_plan is not None and not _bit(self.vocab.plain_string_bits, token_id):
            self._string_plan = None
        if self._forced:
            if self._forced[0] == token_id:
                self._forced.pop(0)
            else:  # cannot happen with a one-token mask; plan afresh
                self._forced = []
        if not self.tokenizer.is_special_token(token_id):
            self.lex.feed(self.tokenizer.decode_bytes([token_id]))
