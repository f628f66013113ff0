"""Incremental detokenization for streaming: token ids in, text deltas out (cases C01, C02).

Technique (prefix offset / read offset, as in HF TGI and vLLM): decode only a short window
of recent tokens twice -- ``ids[prefix:read]`` (already released) and ``ids[prefix:]`` --
and release the difference. A window whose text ends in U+FFFD because its last bytes are
an incomplete UTF-8 sequence (a character split across tokens) is held until the character
completes, so a multi-byte character never straddles two deltas. Released text then passes
`StopStringMatcher`, which holds back possible stop-string prefixes.

The joined deltas (plus `IncrementalDetokenizer.flush`) equal
``tokenizer.decode(output_ids, skip_special_tokens)`` cut before the first stop string.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass

from openmini.tokenizer.stop_strings import StopStringMatcher
from openmini.tokenizer.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class DetokenizerDelta:
    """Result of one `IncrementalDetokenizer.add_tokens` call.

    Attributes:
        text: newly released text (may be empty).
        stop_matched: the stop string that matched in this call, else None. Once set, the
            sequence is finished: its text ends before (or with) the stop string.
    """

    text: str
    stop_matched: str | None = None


class IncrementalDetokenizer:
    """Streams the text of one output sequence.

    Args:
        tokenizer: the model's `Tokenizer`.
        prompt_token_ids: the prompt; accepted for interface symmetry with vLLM and not used
            for the text, so that the joined output equals ``decode(output_ids)`` exactly
            (a SentencePiece leading space of the first output token is dropped, as HF's
            ``decode`` does; byte-level BPE decoding needs no context).
        skip_special_tokens: leave special tokens out of the text.
        stop: stop strings (OpenAI ``stop``).
        include_stop_str_in_output: keep the matched stop string at the end of the text.

    Cost per token: two decodes of a window of a few tokens (O(window), not O(length)).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True, stop: Sequence[str] = (),
                 include_stop_str_in_output: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._stops = StopStringMatcher(stop or (), include_stop_str_in_output)
        #: output token ids seen so far.
        self.output_token_ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window (a character boundary)
        self._read_offset = 0  # end of the tokens whose text was released
        self._chunks: list[str] = []

    @property
    def stop_matched(self) -> str | None:
        """The stop string that ended the sequence, if any."""
        return self._stops.matched

    @property
    def finished(self) -> bool:
        """A stop string matched; later tokens are ignored."""
        return self._stops.matched is not None

    @property
    def text(self) -> str:
        """All text released so far (the joined deltas)."""
        return "".join(self._chunks)

    def add_tokens(self, new_ids: Sequence[int]) -> DetokenizerDelta:
        """Append sampled tokens; return the text that is now safe to send.

        Holds back a trailing incomplete UTF-8 character and any suffix that may start a
        stop string. After a stop string matched, returns empty deltas.
        """
        if self.finished:
            return DetokenizerDelta("")
        ids = self.output_token_ids
        ids.extend(int(i) for i in new_ids)
        prefix_text = self._decode(ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(ids[self._prefix_offset:])
        if len(window_text) <= len(prefix_text):
            return DetokenizerDelta("")  # e.g. only skipped special tokens so far
        if window_text.endswith(_REPLACEMENT) and self._ends_incomplete():
            return DetokenizerDelta("")  # wait for the rest of the character
        new_text = window_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return self._release(new_text)

    def flush(self) -> str:
        """Release everything held back (the sequence finished for another reason: EOS,
        length, abort). An incomplete trailing character (generation cut inside a multi-byte
        UTF-8 sequence, e.g. by max_tokens) is dropped rather than released as U+FFFD, so a
        client never sees a replacement character the model did not produce (case C01).
        Stop strings still apply to the released tail; `stop_matched` tells."""
        if self.finished:
            return ""
        ids = self.output_token_ids
        incomplete = self._ends_incomplete()
        prefix_text = self._decode(ids[self._prefix_offset:self._read_offset])
        window_text = self._decode(ids[self._prefix_offset:])
        if incomplete and window_text.endswith("\ufffd"):
            # an incomplete valid prefix decodes to exactly one U+FFFD (UTF-8 lossy rule)
            window_text = window_text[:-1]
        self._prefix_offset = self._read_offset = len(ids)
        out = self._release(window_text[len(prefix_text):]).text
        if not self.finished:
            tail = self._stops.flush()
            self._chunks.append(tail)
            out += tail
        return out

    # ---- internals ------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _release(self, text: str) -> DetokenizerDelta:
        before = self._stops.matched
        out = self._stops.feed(text)
        self._chunks.append(out)
        matched = self._stops.matched if before is None else None
        return DetokenizerDelta(out, matched)

    def _ends_incomplete(self) -> bool:
        """Do the unreleased tokens' raw bytes end inside a UTF-8 character?

        The released part ends at a character boundary, so the decoder state after the
        unreleased bytes alone decides. A trailing U+FFFD that is a real character (bytes
        EF BF BD) or an invalid byte is final and not held.
        """
        tok = self.tokenizer
        pending = self.output_token_ids[self._read_offset:]
        skip = tok.special_token_ids if self.skip_special_tokens else frozenset()
        data = b"".join(_token_bytes_or_empty(tok, i) for i in pending if i not in skip)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(data, final=False)
        return bool(decoder.getstate()[0])


def _token_bytes_or_empty(tokenizer: Tokenizer, token_id: int) -> bytes:
    """`Tokenizer.token_bytes`, or b"" for an id outside the vocabulary (decodes to nothing)."""
    try:
        return tokenizer.token_bytes(token_id)
    except IndexError:
        return b""
