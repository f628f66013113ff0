"""Engine-side request state. Imports no torch (the scheduler and KV manager use it)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from openmini.outputs import TokenLogprobs
from openmini.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    """Lifecycle of one sequence. ``FINISHED_*`` values are terminal."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    """One sequence inside the engine (a request with ``n`` > 1 becomes n of these).

    Attributes:
        request_id: unique engine id (for n > 1: ``f"{parent_id}#{index}"``).
        prompt_token_ids: the prompt, in tokens.
        sampling_params: generation settings (shared by the n siblings).
        eos_token_ids: ids that end generation unless ``ignore_eos``.
        max_tokens: resolved output budget in tokens (params or context window).
        parent_id: the caller's request id.
        index: which of the n completions this is.
        wait_for_prefill_of: sibling whose prompt must be fully computed before this one is
            scheduled, so that it finds the prompt's blocks in the prefix cache.
        output_token_ids: generated tokens so far.
        num_computed_tokens: tokens whose KV is in the cache (vLLM's name); reset to 0 by
            preemption (recompute).
        num_cached_tokens: prompt tokens found in the prefix cache at first scheduling
            (-1 until then).
        status: see RequestStatus.
        stop_reason: matched stop string / token id.
        logprobs: per generated token, when ``sampling_params.logprobs`` is set.
        block_hashes: chained hashes of this request's full blocks (filled by the KV manager).
        sampler_state: per-request sampler state (the seeded generator); opaque here.
        grammar: per-request structured-output matcher, or None (see ``openmini.structured``).
        arrival_time: seconds (time.monotonic) when added.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    max_tokens: int = 16
    parent_id: str = ""
    index: int = 0
    wait_for_prefill_of: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprobs] | None = None
    block_hashes: list[int] = field(default_factory=list)
    sampler_state: Any = None
    grammar: Any = None
    arrival_time: float = field(default_factory=time.monotonic)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of prompt + output without building the full list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None
