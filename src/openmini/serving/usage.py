"""Token usage objects and their price.

Usage shape: OpenAI ``CompletionUsage`` (shared/API.md section 2) with
``prompt_tokens_details.cached_tokens`` from the prefix cache and zeros for the details that
do not apply. Prices: gpt-4.1-mini's published list price per 1M tokens (API.md section 7).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Price:
    """US dollars per 1M tokens."""

    input: float
    cached_input: float
    output: float


GPT_41_MINI_PRICE = Price(input=0.40, cached_input=0.10, output=1.60)


@dataclass
class Usage:
    """Token counts of one request.

    Attributes:
        prompt_tokens: tokens of the rendered prompt (counted once even for n > 1).
        completion_tokens: generated tokens over all choices (incl. EOS / stop tokens).
        cached_tokens: prompt tokens served from the prefix cache.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def cost_usd(self, price: Price = GPT_41_MINI_PRICE) -> float:
        """What the request would cost at ``price`` (cached prompt tokens at the cached rate)."""
        fresh = self.prompt_tokens - self.cached_tokens
        return (fresh * price.input + self.cached_tokens * price.cached_input
                + self.completion_tokens * price.output) / 1e6

    def to_openai(self) -> dict[str, Any]:
        """The ``usage`` object of chat and text completions."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
        }
