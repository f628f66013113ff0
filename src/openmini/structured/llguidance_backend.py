"""The llguidance grammar backend: compile a spec once (cached), one matcher per sequence.

vLLM v1's split: the *backend* compiles a ``StructuredOutputSpec`` against the tokenizer
(an LRU cache keyed by the spec), each sequence gets its own *matcher* (a copy of the
compiled one) that fills the allowed-token bitmask, accepts sampled tokens and says when the
grammar is finished. The engine calls the matcher; the scheduler never imports this module.

Token view (``llguidance.LLTokenizer``): the bytes of every token id of the model's logits
(`Tokenizer.token_bytes`), special tokens marked with a leading 0xFF byte so no text rule can
produce them; only the end-of-sequence ids are allowed, and only where the grammar may end.
Tokens past the tokenizer's vocabulary (LM-head padding) and GGUF padding entries
``[PAD<id>]`` are never allowed.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable

import llguidance
import numpy as np
import torch

from openmini.sampling_params import StructuredOutputSpec
from openmini.structured.closing import PLAIN, BudgetCloser, ClosingVocab
from openmini.structured.errors import StructuredOutputError
from openmini.structured.llguidance_grammar import clean_error, spec_to_lark
from openmini.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_PAD_TOKEN_RE = re.compile(rb"^\[PAD\d+\]$")
"""GGUF vocabularies padded to the model's size (transformers' GGUF conversion)."""

_SPECIAL_PREFIX = b"\xff"
"""llguidance's marker of a special token in a token's bytes (toktrie convention)."""


class GrammarMatcher:
    """The grammar state of one sequence.

    With a ``closer`` (an output budget), the mask narrows near the end of the budget
    (plain string content only, then one token at a time along a closing plan) so that the
    output closes validly in time (see ``openmini.structured.closing``); without one the
    mask is the grammar's alone.

    Args:
        matcher: an ``llguidance.LLMatcher`` at the start of the output (owned by this object).
        mask_size: number of token ids the mask covers (the model's logits width).
        closer: the sequence's budget-aware closing state, or None.
    """

    def __init__(self, matcher: llguidance.LLMatcher, mask_size: int,
                 closer: BudgetCloser | None = None):
        self._matcher = matcher
        self.mask_size = mask_size
        self.closer = closer
        self._bitmask = np.zeros((mask_size + 31) // 32, dtype=np.int32)  # [ceil(V/32)]

    def fill_bitmask(self, out: np.ndarray) -> None:
        """Write the allowed-token bitmask of the next token into ``out``.

        Args:
            out: C-contiguous int32 ``[ceil(V / 32)]``; bit ``t % 32`` of word ``t // 32`` is
                set iff token ``t`` is allowed (llguidance's / xgrammar's layout).

        Raises:
            ValueError: ``out`` has the wrong dtype, shape or layout.
        """
        if out.dtype != np.int32 or out.shape != self._bitmask.shape or \
                not out.flags["C_CONTIGUOUS"]:
            raise ValueError(f"bitmask must be C-contiguous int32 {self._bitmask.shape}")
        narrow = self.closer.restriction(self._matcher) if self.closer is not None else None
        if narrow is None or narrow[0] == PLAIN:
            self._matcher.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)
        if narrow is not None:
            kind, token = narrow
            if kind == PLAIN:  # near the end, inside a string: plain content only
                np.bitwise_and(out, self.closer.vocab.plain_string_bits, out=out)
            else:  # closing: only the plan's next token
                out.fill(0)
            out.view(np.uint32)[token >> 5] |= np.uint32(1 << (token & 31))

    def allowed_token_mask(self) -> torch.Tensor:
        """Bool ``[32 * ceil(V / 32)]`` mask of the tokens allowed next (True = allowed).

        An all-false mask means the grammar is in an error state (the sampler raises
        ``NoAllowedTokenError``).
        """
        self.fill_bitmask(self._bitmask)
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")  # [32 * W]
        return torch.from_numpy(bits).to(torch.bool)

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token. False (state unchanged for the caller's purposes:
        the token must not be appended) when the grammar rejects it."""
        ok = bool(self._matcher.consume_token(int(token_id)))
        if ok and self.closer is not None:
            self.closer.on_accept(int(token_id))
        return ok

    @property
    def closed_by_budget(self) -> bool:
        """True when the output budget forced a closing: the output is valid but cut short
        (reported as ``finish_reason: "length"``, like any output ``max_tokens`` ended)."""
        return self.closer is not None and self.closer.closed_early

    def is_terminated(self) -> bool:
        """True when no further token can follow (the output is complete, or it accepted
        an end-of-sequence token)."""
        return self._matcher.is_stopped()

    def is_accepting(self) -> bool:
        """True when the output may end here (end-of-sequence is allowed)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        """The grammar engine's error message, "" when none."""
        return clean_error(self._matcher.get_error()) if self._matcher.is_error() else ""


class LLGuidanceBackend:
    """Compiles specs for one tokenizer and hands out matchers.

    Args:
        tokenizer: the model's tokenizer.
        vocab_size: width of the model's logits (may exceed the tokenizer's vocabulary).
        eos_token_ids: ids that end generation (allowed only where the grammar can end).
        cache_size: compiled grammars kept (least recently used dropped first).

    Thread-safe: the compile cache is locked, so serving threads may compile while the
    engine thread creates matchers. The token view is built on first use (~1 s for a
    150k vocabulary).
    """

    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Iterable[int],
                 cache_size: int = 256):
        self.tokenizer = tokenizer
        self.mask_size = max(int(vocab_size), tokenizer.vocab_size)
        self.eos_token_ids = sorted(set(eos_token_ids))
        if not self.eos_token_ids:
            raise ValueError("the grammar backend needs at least one end-of-sequence id")
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None
        self._closing_vocab: ClosingVocab | None = None
        self._cache: OrderedDict[StructuredOutputSpec, llguidance.LLMatcher] = OrderedDict()

    # ---- token view -----------------------------------------------------------------------

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        """The llguidance token view (built once)."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = self._build_ll_tokenizer()
            return self._ll_tokenizer

    def _build_ll_tokenizer(self) -> llguidance.LLTokenizer:
        tok = self.tokenizer
        special = set(tok.special_token_ids) | set(self.eos_token_ids)
        tokens: list[bytes] = []
        for i in range(self.mask_size):
            try:
                b = tok.token_bytes(i)
            except IndexError:
                b = b""  # LM-head padding: never allowed
            if i in special or _PAD_TOKEN_RE.match(b):
                b = _SPECIAL_PREFIX + b
            tokens.append(b)
        plain = [b"" if b.startswith(_SPECIAL_PREFIX) else b for b in tokens]
        self._closing_vocab = ClosingVocab.from_token_bytes(plain, special, self.eos_token_ids[0],
                                                            self.mask_size)
        view = _TokenView(tok, tokens, sorted(special), self.eos_token_ids[0])
        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(view),
                                      n_vocab=self.mask_size, eos_token=self.eos_token_ids)

    # ---- compile / match ------------------------------------------------------------------

    def compile(self, spec: StructuredOutputSpec) -> llguidance.LLMatcher:
        """The compiled grammar of ``spec`` (a matcher at its start; do not advance it).

        Raises:
            StructuredOutputError: the spec cannot be enforced.
        """
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        lark = spec_to_lark(spec)
        matcher = llguidance.LLMatcher(self.ll_tokenizer(),
                                       llguidance.LLMatcher.grammar_from_lark(lark),
                                       log_level=0)
        if matcher.is_error():
            raise StructuredOutputError(clean_error(matcher.get_error()))
        with self._lock:
            self._cache[spec] = matcher
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def new_matcher(self, spec: StructuredOutputSpec, max_tokens: int | None = None
                    ) -> GrammarMatcher:
        """A fresh matcher for one sequence (each of n siblings needs its own).

        Args:
            spec: the structured output.
            max_tokens: the sequence's output budget in tokens; with it the matcher closes
                the output validly before the budget runs out whenever a closing fits
                (``openmini.structured.closing``). None: the grammar's mask only.

        Raises:
            StructuredOutputError: the spec cannot be enforced.
        """
        compiled = self.compile(spec)
        closer = None
        if max_tokens is not None:
            ll_tokenizer = self.ll_tokenizer()
            assert self._closing_vocab is not None  # built with the token view
            marker = spec.call_begin.rstrip().encode() if spec.tools else b""
            free_text = spec.allow_answer and spec.answer is None
            closer = BudgetCloser(self._closing_vocab, ll_tokenizer, max_tokens, marker,
                                  may_force_end=not free_text)
        return GrammarMatcher(compiled.deep_copy(), self.mask_size, closer)

    @property
    def num_cached(self) -> int:
        """Compiled grammars in the cache."""
        with self._lock:
            return len(self._cache)


class _TokenView:
    """What ``llguidance.TokenizerWrapper`` reads: token bytes, special ids, an encoder."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: list[int],
                 eos_token_id: int):
        self._tokenizer = tokenizer
        self.tokens = tokens
        self.special_token_ids = special
        self.eos_token_id = eos_token_id
        self.bos_token_id = None

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text)
