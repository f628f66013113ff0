"""Stop strings over a stream of text pieces (case C02).

`StopStringMatcher` releases text only when no part of it can still be the beginning of a
stop string: a suffix that is a prefix of a stop string is held back until the next piece
decides it. A stop string may span any number of pieces and end anywhere inside one.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Holds back possible stop-string prefixes and cuts the stream at the first stop string.

    Args:
        stop: stop strings (empty strings are ignored).
        include_stop_str_in_output: release the matched stop string itself too.

    Matching rule: the match that *ends* first in the stream wins (ties: the longer one);
    this does not depend on how the text is split into pieces. Text after the match is
    dropped. Cost per piece: O(len(piece) + held) string search per stop string, where held
    is below the longest stop string's length.
    """

    def __init__(self, stop: Sequence[str] = (), include_stop_str_in_output: bool = False):
        self.stop = tuple(dict.fromkeys(s for s in stop if s))
        self.include_stop_str_in_output = include_stop_str_in_output
        self._max_len = max((len(s) for s in self.stop), default=0)
        self._held = ""
        #: the stop string that matched, once one has.
        self.matched: str | None = None

    @property
    def held(self) -> str:
        """Text received but not yet released (a possible stop-string prefix)."""
        return self._held

    def feed(self, text: str) -> str:
        """Add a piece; return the text that can be released now.

        After a match (``self.matched`` set) further pieces are ignored and release nothing.
        """
        if self.matched is not None:
            return ""
        if not self.stop:
            return text
        buf = self._held + text
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self.stop:
            i = buf.find(s)
            if i >= 0:
                key = (i + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is not None:
            end, neg_len, s = best
            self.matched = s
            self._held = ""
            return buf[:end] if self.include_stop_str_in_output else buf[:end + neg_len]
        keep = self._prefix_suffix_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """Release the held text (the stream ended without completing a stop string)."""
        out, self._held = self._held, ""
        return out if self.matched is None else ""

    def _prefix_suffix_len(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        for k in range(min(len(buf), self._max_len - 1), 0, -1):
            tail = buf[-k:]
            if any(len(s) > k and s.startswith(tail) for s in self.stop):
                return k
        return 0
