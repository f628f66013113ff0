"""OpenAI sampling options -> engine ``SamplingParams``, plus the context-window check."""

from __future__ import annotations

from openmini.sampling_params import SamplingParams, SamplingParamsError
from openmini.serving.errors import OpenAIError, invalid_request
from openmini.serving.protocol import GenerationOptions

SEED_MODULUS = 1 << 63
"""Seeds are folded into [0, 2**63) so any int64 the client sends is a valid generator seed."""


def context_length_error(prompt_tokens: int, max_tokens: int | None,
                         max_model_len: int) -> OpenAIError:
    """The 400 ``context_length_exceeded`` error with OpenAI's wording.

    Args:
        prompt_tokens: tokens in the rendered prompt.
        max_tokens: requested output tokens, or None when the prompt alone is too long.
        max_model_len: the served context window, in tokens.
    """
    if max_tokens:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, you "
               f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
               f"messages, {max_tokens} in the completion). Please reduce the length of the "
               f"messages or completion.")
    else:
        msg = (f"This model's maximum context length is {max_model_len} tokens. However, your "
               f"messages resulted in {prompt_tokens} tokens. Please reduce the length of the "
               f"messages.")
    return invalid_request(msg, param="messages", code="context_length_exceeded")


def check_context_length(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    """Reject prompts that leave no room in the window (checked before any work starts).

    Raises:
        OpenAIError: 400 ``context_length_exceeded`` when ``prompt_tokens >= max_model_len``
            or ``prompt_tokens + max_tokens > max_model_len``.
    """
    if prompt_tokens >= max_model_len:
        raise context_length_error(prompt_tokens, None, max_model_len)
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise context_length_error(prompt_tokens, max_tokens, max_model_len)


def build_sampling_params(opts: GenerationOptions, vocab_size: int) -> SamplingParams:
    """Map OpenAI options to the engine's ``SamplingParams``.

    ``top_p: 0`` becomes ``top_k: 1`` (only the most likely token); ``seed`` is folded
    into [0, 2**63); ``logprobs`` is the number of alternatives (0 = only the sampled
    token's own log-probability).

    Raises:
        OpenAIError: 400 for a ``logit_bias`` token id outside the vocabulary or a value the
            engine rejects (``param`` names it).
    """
    for tok in opts.logit_bias:
        if not 0 <= tok < vocab_size:
            raise invalid_request(
                f"Invalid key in 'logit_bias': {tok}. Token ids must be between 0 and "
                f"{vocab_size - 1}.", param="logit_bias", code="invalid_value")
    top_p, top_k = opts.top_p, -1
    if top_p <= 0.0:
        top_p, top_k = 1.0, 1
    try:
        return SamplingParams(
            n=opts.n, temperature=opts.temperature, top_p=top_p, top_k=top_k,
            presence_penalty=opts.presence_penalty,
            frequency_penalty=opts.frequency_penalty,
            logit_bias=dict(opts.logit_bias),
            seed=None if opts.seed is None else opts.seed % SEED_MODULUS,
            max_tokens=opts.max_tokens, stop=list(opts.stop), logprobs=opts.logprobs)
    except SamplingParamsError as exc:
        raise invalid_request(str(exc), param=exc.param, code="invalid_value") from exc
