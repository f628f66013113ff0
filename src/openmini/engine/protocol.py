"""The boundary between the HTTP/serving layers and the engine (``EngineClient``).

The server only talks to an object with this shape, so API tests can use a fake and the
engine could later live in another process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Protocol

from openmini.config import ModelConfig
from openmini.outputs import RequestOutput
from openmini.sampling_params import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from openmini.tokenizer.chat_template import ChatTemplate
    from openmini.tokenizer.tokenizer import Tokenizer


@dataclass
class EngineStats:
    """A snapshot for /metrics and /health.

    Attributes:
        num_running: sequences holding KV blocks and being stepped.
        num_waiting: sequences queued (incl. preempted ones).
        kv_blocks_used / kv_blocks_total: paged KV pool occupancy, in blocks.
        prefix_cache_queries / prefix_cache_hits: prompt tokens looked up / found in the
            prefix cache since start.
        num_preemptions: sequences preempted since start.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class EngineClient(Protocol):
    """What the server needs from an engine.

    Attributes:
        model_config: the served model's architecture (``max_position_embeddings`` is the
            context window).
        tokenizer: plain-text encode/decode, token bytes, special ids.
        chat_template: renders OpenAI-style messages to prompt token ids.
        max_model_len: longest prompt + output in tokens.
    """

    model_config: ModelConfig
    tokenizer: "Tokenizer"
    chat_template: "ChatTemplate"
    max_model_len: int

    def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 request_id: str, prompt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream the request's progress.

        Yields a ``RequestOutput`` after each engine step in which the request changed;
        each ``CompletionOutput`` carries ``delta_text`` / ``delta_token_ids`` /
        ``delta_logprobs`` (the new part) beside the cumulative fields; the last output
        has ``finished=True``. Closing the iterator early (or cancelling the task that
        iterates it) aborts the request and frees its KV blocks.

        Raises:
            ValueError: the prompt plus ``max_tokens`` cannot fit the context window or
                the KV pool (checked before anything is queued).
        """
        ...

    def abort(self, request_id: str) -> None:
        """Stop a request at the next engine step and free its blocks; unknown ids are ignored."""
        ...

    def stats(self) -> EngineStats:
        """Current engine occupancy and counters."""
        ...
