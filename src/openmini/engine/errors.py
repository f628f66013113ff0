"""Errors the engine raises for requests it cannot take (the server maps them to 400s)."""

from __future__ import annotations


class ContextLengthExceededError(ValueError):
    """Prompt plus requested output do not fit the context window.

    Attributes:
        prompt_tokens: tokens in the prompt.
        max_tokens: output tokens requested (0 when the prompt alone is too long).
        max_model_len: the window, in tokens.
    """

    def __init__(self, prompt_tokens: int, max_tokens: int, max_model_len: int):
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.max_model_len = max_model_len
        if max_tokens:
            msg = (f"This model's maximum context length is {max_model_len} tokens. However, "
                   f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                   f"messages, {max_tokens} in the completion). Please reduce the length of the "
                   f"messages or completion.")
        else:
            msg = (f"This model's maximum context length is {max_model_len} tokens. However, "
                   f"your messages resulted in {prompt_tokens} tokens. Please reduce the length "
                   f"of the messages.")
        super().__init__(msg)


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shutdown or a fatal error); no new requests are taken."""
