"""Engine logprobs -> OpenAI logprob objects (chat ``logprobs.content`` and legacy completions).

Chat format (shared/API.md section 2): ``{token, logprob, bytes, top_logprobs: [{token,
logprob, bytes}]}``; ``bytes`` are the token's UTF-8 bytes as integers. A token that is not
valid UTF-8 on its own (part of a multi-byte character) is shown as ``bytes:\\xe4\\xbd``,
the convention OpenAI uses for such tokens. Log-probabilities below -9999 (including -inf
from ``logit_bias: -100``) are reported as -9999.0, as OpenAI does, so the JSON stays valid.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from openmini.outputs import Logprob, TokenLogprobs

LOGPROB_FLOOR = -9999.0


def token_text(raw: bytes) -> str:
    """The display text of a token given its bytes (see the module docstring)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def clamp_logprob(value: float) -> float:
    """Finite log-probability >= -9999 (NaN also maps to the floor)."""
    if math.isnan(value) or value < LOGPROB_FLOOR:
        return LOGPROB_FLOOR
    return float(value)


class LogprobFormatter:
    """Formats logprobs of one engine's tokens.

    Args:
        token_bytes: ``token_id -> bytes`` (the tokenizer's raw bytes of one token).
        stop_token_ids: EOS / stop token ids: their entries are dropped because their text
            never appears in the content.
    """

    def __init__(self, token_bytes: Callable[[int], bytes], stop_token_ids: frozenset[int]):
        self._token_bytes = token_bytes
        self.stop_token_ids = stop_token_ids

    def _entry(self, lp: Logprob) -> dict[str, Any]:
        raw = self._token_bytes(lp.token_id)
        return {"token": token_text(raw), "logprob": clamp_logprob(lp.logprob),
                "bytes": list(raw)}

    def visible(self, entries: Sequence[TokenLogprobs] | None) -> list[TokenLogprobs]:
        """Entries without EOS / stop tokens."""
        return [e for e in entries or () if e.sampled.token_id not in self.stop_token_ids]

    def chat_content(self, entries: Sequence[TokenLogprobs] | None) -> list[dict[str, Any]]:
        """Chat ``logprobs.content`` items for ``entries`` (EOS / stop tokens dropped)."""
        out = []
        for e in self.visible(entries):
            item = self._entry(e.sampled)
            item["top_logprobs"] = [self._entry(t) for t in e.top]
            out.append(item)
        return out

    def completion_logprobs(self, entries: Sequence[TokenLogprobs] | None,
                            text_offset: int) -> dict[str, Any]:
        """Legacy completions ``logprobs``: ``{tokens, token_logprobs, top_logprobs,
        text_offset}``; ``text_offset`` (characters) of the first token is given."""
        tokens, lps, tops, offsets = [], [], [], []
        pos = text_offset
        for e in self.visible(entries):
            item = self._entry(e.sampled)
            tokens.append(item["token"])
            lps.append(item["logprob"])
            tops.append({d["token"]: d["logprob"] for d in map(self._entry, e.top)})
            offsets.append(pos)
            pos += len(bytes(item["bytes"]).decode("utf-8", "ignore"))
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offsets}
