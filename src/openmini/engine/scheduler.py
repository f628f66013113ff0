"""Continuous batching: which requests run this step, with how many tokens. No torch.

vLLM v1's scheduler shape: there are no prefill and decode phases. Each request has
``num_computed_tokens`` (tokens whose KV is in the cache) and ``num_tokens`` (prompt +
output); a step gives it ``num_scheduled_tokens`` of the gap. A whole prompt, a prefill
chunk, a decode (1 token) and a prefix-cache hit (tokens counted as computed without
running them) are one mechanism. A request samples when the step reaches its last token.

Per step (``schedule``), under a token budget of ``max_num_batched_tokens``:

1. Running requests in order (oldest first) get ``min(gap, budget)`` tokens. When the KV
   pool is full, the newest running request is preempted (blocks freed, recomputed later
   from its prompt + output tokens) until the current one fits.
2. If nothing was preempted, waiting requests are admitted first come first served while
   budget and ``max_num_seqs`` allow; their prefix-cache hits count as computed. Long
   prompts are chunked (chunked prefill) on a fixed grid of ``prefill_chunk_size`` tokens
   counted from the sequence start: a prefill step always runs up to the next multiple of
   the grid (or the prompt's end), or waits for a step with room. Chunk boundaries, and so
   the numerics of a prompt's prefill, then depend on the prompt alone, never on what else
   is running (batch invariance: same tokens alone or batched).

``update_from_output`` then advances ``num_computed_tokens``, registers newly full blocks in
the prefix cache, advances each request's grammar (``request.grammar``: ``accept_token`` /
``is_terminated``; a rejected token is never appended), appends sampled tokens and finishes
requests on EOS / stop token ids / a finished grammar / ``max_tokens`` / the context window. Stop strings are the output processor's job (it calls
``finish_requests``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from openmini.config import SchedulerConfig
from openmini.engine.kv_cache_manager import KVCacheManager
from openmini.engine.request import Request, RequestStatus
from openmini.outputs import TokenLogprobs


@dataclass
class SchedulerOutput:
    """What one engine step computes (a plain record for the model runner).

    Attributes:
        scheduled: ``(request, num_scheduled_tokens)`` in batch order; request ``r`` feeds
            tokens ``[r.num_computed_tokens, r.num_computed_tokens + k)`` (positions).
        num_scheduled_tokens: request id -> tokens this step.
        total_num_scheduled_tokens: sum of the above (<= ``max_num_batched_tokens``).
        preempted_ids: requests preempted by this step (their blocks are freed).
        finished_ids: requests finished and freed since the previous ``schedule`` call
            (the runner can drop its per-request state).
        sampling_ids: requests whose step reaches their last token, so they sample
            (fixed at schedule time: ``num_computed_tokens + k == num_tokens``).
    """

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    preempted_ids: list[str] = field(default_factory=list)
    finished_ids: list[str] = field(default_factory=list)
    sampling_ids: set[str] = field(default_factory=set)

    def samples(self, request: Request | str) -> bool:
        """True when the request produces a token this step (its last token is fed)."""
        rid = request if isinstance(request, str) else request.request_id
        return rid in self.sampling_ids

    @property
    def is_empty(self) -> bool:
        """Nothing to run this step."""
        return not self.scheduled


class Scheduler:
    """Continuous-batching scheduler over a ``KVCacheManager``.

    Args:
        scheduler_config: token budget per step, most running sequences, context window.
        kv_manager: the block pool; the scheduler allocates and frees through it.

    The effective context window is ``min(max_model_len, num_blocks * block_size)``
    (``max_len``): a request alone always fits in the pool, so the oldest running request
    always makes progress and preemption cannot deadlock.
    """

    def __init__(self, scheduler_config: SchedulerConfig, kv_manager: KVCacheManager):
        if scheduler_config.max_num_batched_tokens < 1 or scheduler_config.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be positive.")
        self.config = scheduler_config
        self.kv = kv_manager
        self.max_len = min(scheduler_config.max_model_len,
                           kv_manager.num_blocks * kv_manager.block_size)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished_ids: list[str] = []
        budget = scheduler_config.max_num_batched_tokens
        # default: room for one decode token per running sequence, so a chunk always fits
        # beside a full set of decodes (and at least half the budget goes to prefill)
        chunk = scheduler_config.prefill_chunk_size or max(budget // 2, budget - scheduler_config.max_num_seqs)
        self.prefill_chunk_size = max(1, min(chunk, budget))

    # ---- requests ----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request at the back of the waiting queue.

        Raises:
            ValueError: duplicate id, a finished request, an empty prompt, or a sequence
                with no room for one output token within ``max_len`` (the model window or
                the whole KV pool, whichever is smaller): such a request could never run.
        """
        rid = request.request_id
        if rid in self.requests:
            raise ValueError(f"Duplicate request id {rid!r}.")
        if request.is_finished:
            raise ValueError(f"Request {rid!r} is already finished.")
        if request.num_prompt_tokens == 0:
            raise ValueError(f"Request {rid!r} has an empty prompt.")
        if request.num_tokens >= self.max_len:
            raise ValueError(
                f"Request {rid!r} has {request.num_tokens} tokens; at most "
                f"{self.max_len - 1} fit (max_model_len {self.config.max_model_len}, KV pool "
                f"{self.kv.num_blocks * self.kv.block_size} tokens).")
        request.status = RequestStatus.WAITING
        self.requests[rid] = request
        self.waiting.append(request)

    def get_request(self, request_id: str) -> Request | None:
        """The unfinished request with this id, or None."""
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def finish_requests(self, request_ids: str | Iterable[str],
                        status: RequestStatus) -> list[Request]:
        """Finish requests now (abort, stop string): free their blocks, drop them.

        Callable at any moment, also between ``schedule`` and ``update_from_output`` (the
        step's result for a finished request is then ignored). Idempotent; unknown and
        already finished ids are ignored.

        Returns:
            The requests this call finished.

        Raises:
            ValueError: ``status`` is not a finished status.
        """
        if not status.finished:
            raise ValueError(f"{status} is not a finished status.")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            else:
                self.waiting.remove(req)
            req.status = status
            self._free(req)
            done.append(req)
        return done

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        del self.requests[request.request_id]
        self._finished_ids.append(request.request_id)

    # ---- stats -------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks held by requests, 0..1."""
        return self.kv.usage

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prefix-cache hit tokens / queried tokens since start, 0..1."""
        return self.kv.prefix_cache_stats.hit_rate

    # ---- one step ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's requests and token counts and allocate their KV slots."""
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        budget = self.config.max_num_batched_tokens

        def tokens_for(req: Request, start: int) -> int:
            """Tokens to schedule from ``start``: up to the next chunk boundary or the end;
            0 when they do not fit in what is left of the budget."""
            grid = self.prefill_chunk_size
            k = min(req.num_tokens, (start // grid + 1) * grid) - start
            return k if k <= budget else 0

        def add(req: Request, k: int) -> None:
            out.scheduled.append((req, k))
            out.num_scheduled_tokens[req.request_id] = k
            if req.num_computed_tokens + k == req.num_tokens:
                out.sampling_ids.add(req.request_id)

        # 1. running requests, oldest first; preempt the newest when blocks run out
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            k = tokens_for(req, req.num_computed_tokens)
            if k == 0:  # its next chunk waits for a step with room
                i += 1
                continue
            if not self._allocate_or_preempt(req, k, out.preempted_ids):
                break  # req preempted itself; every request after it is gone too
            add(req, k)
            budget -= k
            i += 1

        # 2. waiting requests, first come first served (not after a preemption: the pool
        #    is full and admitting would only preempt again)
        if not out.preempted_ids:
            skipped: list[Request] = []
            while (self.waiting and budget > 0
                   and len(self.running) < self.config.max_num_seqs):
                req = self.waiting.popleft()
                if not self._sibling_prefilled(req):
                    skipped.append(req)  # wait for the sibling; do not block others
                    continue
                hit_blocks, num_hit = self.kv.get_computed_blocks(req)
                k = tokens_for(req, num_hit)
                if k == 0 or not self.kv.allocate_slots(req, k, hit_blocks):
                    self.waiting.appendleft(req)
                    break
                if req.num_cached_tokens < 0:
                    req.num_cached_tokens = num_hit
                req.num_computed_tokens = num_hit
                req.status = RequestStatus.RUNNING
                self.running.append(req)
                add(req, k)
                budget -= k
            self.waiting.extendleft(reversed(skipped))

        out.total_num_scheduled_tokens = self.config.max_num_batched_tokens - budget
        return out

    def _allocate_or_preempt(self, req: Request, k: int, preempted_ids: list[str]) -> bool:
        """Allocate ``k`` new token slots for running ``req``, preempting the newest running
        requests until they fit. False when ``req`` itself had to be preempted."""
        while not self.kv.allocate_slots(req, k):
            victim = self.running.pop()
            self._preempt(victim)
            preempted_ids.append(victim.request_id)
            if victim is req:
                return False
        return True

    def _sibling_prefilled(self, request: Request) -> bool:
        """False while the sibling ``request.wait_for_prefill_of`` has not computed its
        prompt (so its prompt blocks are not yet in the prefix cache)."""
        sib_id = request.wait_for_prefill_of
        if sib_id is None or not self.kv.enable_prefix_caching:
            return True
        sib = self.requests.get(sib_id)
        return sib is None or sib.num_computed_tokens >= sib.num_prompt_tokens

    def _preempt(self, request: Request) -> None:
        """Free a running request's blocks and put it at the front of the waiting queue;
        its prompt + output tokens are recomputed (vLLM's recompute preemption)."""
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def update_from_output(
            self, scheduler_output: SchedulerOutput,
            sampled: dict[str, tuple[int, TokenLogprobs | None]]) -> list[Request]:
        """Apply a step's results.

        Args:
            scheduler_output: the output of the matching ``schedule`` call.
            sampled: request id -> (sampled token id, its logprobs or None) for every
                request in ``scheduler_output.sampling_ids`` that is still unfinished.

        Returns:
            The requests that got a token this step (and possibly finished), batch order.

        Raises:
            KeyError: a sampling request has no entry in ``sampled``.
        """
        changed: list[Request] = []
        any_finished = False
        for req, k in scheduler_output.scheduled:
            if self.requests.get(req.request_id) is not req:
                continue  # finished (aborted, stop string) after schedule()
            req.num_computed_tokens += k
            self.kv.cache_full_blocks(req)
            if req.num_computed_tokens < req.num_tokens:
                continue  # a prefill chunk short of the last token: no sample
            token_id, logprobs = sampled[req.request_id]
            if req.grammar is not None and not req.grammar.accept_token(token_id):
                # never append a token the grammar rejects (the sampler masks them, so this
                # is an internal error): end the sequence without it
                req.status = RequestStatus.FINISHED_ABORTED
                self._free(req)
                changed.append(req)
                any_finished = True
                continue
            req.output_token_ids.append(token_id)
            if logprobs is not None and req.sampling_params.logprobs is not None:
                if req.logprobs is None:
                    req.logprobs = []
                req.logprobs.append(logprobs)
            changed.append(req)
            status = self._check_stop(req, token_id)
            if status is not None:
                req.status = status
                self._free(req)
                any_finished = True
        if any_finished:
            self.running = [r for r in self.running if not r.is_finished]
        return changed

    def _check_stop(self, req: Request, token_id: int) -> RequestStatus | None:
        """Finish status after appending ``token_id``, or None to continue.

        EOS (unless ``ignore_eos``) and ``stop_token_ids`` count only once more than
        ``min_tokens`` tokens exist (the sampler masks them before that, as in vLLM);
        a stop token sets ``stop_reason`` to its id. A stop token that is also the last
        allowed token reports "stop". A grammar (``req.grammar``) that admits no further
        token (its output is complete) reports "stop" too, or "length" when the output
        budget forced it closed early (valid but cut short). Then ``max_tokens`` and the
        context window (``max_len``) give "length".
        """
        params = req.sampling_params
        if req.num_output_tokens > params.min_tokens:
            if not params.ignore_eos and token_id in req.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                req.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if req.grammar is not None and req.grammar.is_terminated():
            if getattr(req.grammar, "closed_by_budget", False):
                return RequestStatus.FINISHED_LENGTH
            return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_len:
            return RequestStatus.FINISHED_LENGTH
        return None
