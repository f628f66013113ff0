"""Results handed from the engine to callers (vLLM's ``RequestOutput`` shape)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log-probability of one token at one position.

    Attributes:
        token_id: vocabulary id.
        logprob: natural log of the model's probability (raw logits, before sampling
            transforms), a float <= 0.
        decoded: the token's text.
    """

    token_id: int
    logprob: float
    decoded: str = ""


@dataclass
class TokenLogprobs:
    """The sampled token's logprob and the ``top`` alternatives at one position."""

    sampled: Logprob
    top: list[Logprob] = field(default_factory=list)


@dataclass
class CompletionOutput:
    """One of the ``n`` completions of a request.

    Attributes:
        index: 0..n-1.
        text: detokenized text so far (stop strings removed, held-back text excluded).
        token_ids: generated token ids so far.
        finish_reason: None while running, else ``"stop"`` (EOS, stop token or stop
            string), ``"length"`` (max_tokens or context window) or ``"abort"``.
        stop_reason: the matched stop string or stop token id, if any.
        logprobs: one entry per generated token when requested, else None.
        delta_text: text added since the previous output of this request.
        delta_token_ids: token ids added since the previous output.
        delta_logprobs: logprobs of ``delta_token_ids`` when requested.
    """

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """State of a request after an engine step.

    Attributes:
        request_id: caller's id.
        prompt: prompt text if given as text.
        prompt_token_ids: the tokens that were prefilled.
        num_cached_tokens: prompt tokens served from the prefix cache (max over the n
            completions' first prefill).
        outputs: the completions, ordered by index.
        finished: every completion has finished.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    num_cached_tokens: int = 0
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
