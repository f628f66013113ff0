"""Prometheus metrics for ``GET /metrics`` (prometheus_client text format 0.0.4).

One ``CollectorRegistry`` per app (no process-global state). Counters and histograms are
updated by the HTTP middleware and by ``InstrumentedEngineClient``, which wraps the engine
the serving layer talks to; engine gauges are read from ``EngineClient.stats()`` at scrape
time.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from openmini.engine.protocol import EngineClient, EngineStats
from openmini.outputs import RequestOutput
from openmini.sampling_params import SamplingParams
from openmini.serving.usage import Usage

if TYPE_CHECKING:  # pragma: no cover
    from openmini.tokenizer.chat_template import ChatTemplate
    from openmini.tokenizer.tokenizer import Tokenizer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector(Collector):
    """Gauges read from the engine (and the server's queue) at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats], in_flight: Callable[[], int]):
        self._stats = stats
        self._in_flight = in_flight

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._stats()
        rate = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
        for name, doc, value in (
            ("openmini_queue_depth", "Sequences waiting in the engine queue.", s.num_waiting),
            ("openmini_running_sequences", "Sequences being generated.", s.num_running),
            ("openmini_requests_in_flight", "HTTP generation requests admitted and not done.",
             self._in_flight()),
            ("openmini_kv_blocks_used", "Paged KV cache blocks in use.", s.kv_blocks_used),
            ("openmini_kv_blocks_total", "Paged KV cache blocks in the pool.", s.kv_blocks_total),
            ("openmini_prefix_cache_hit_rate",
             "Prompt tokens found in the prefix cache / prompt tokens looked up, since start.",
             rate),
            ("openmini_preemptions", "Sequences preempted since start.", s.num_preemptions),
        ):
            yield GaugeMetricFamily(name, doc, value=value)


class ServerMetrics:
    """All metrics of one server.

    Args:
        stats: the engine's ``stats`` callable.
        in_flight: current number of admitted generation requests.
    """

    def __init__(self, stats: Callable[[], EngineStats], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("openmini_requests", "HTTP requests by endpoint and status.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("openmini_prompt_tokens", "Prompt tokens processed.",
                                     registry=r)
        self.cached_prompt_tokens = Counter("openmini_cached_prompt_tokens",
                                            "Prompt tokens served from the prefix cache.",
                                            registry=r)
        self.completion_tokens = Counter("openmini_completion_tokens",
                                         "Completion tokens generated.", registry=r)
        self.cost = Counter("openmini_equivalent_cost_usd",
                            "What the served tokens would cost at gpt-4.1-mini list prices "
                            "(input $0.40, cached input $0.10, output $1.60 per 1M tokens).",
                            registry=r)
        self.ttft = Histogram("openmini_time_to_first_token_seconds",
                              "Seconds from submission to the first generated token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("openmini_inter_token_latency_seconds",
                             "Seconds between consecutive tokens of one sequence.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(stats, in_flight))

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class InstrumentedEngineClient:
    """An ``EngineClient`` that records token counts and latencies of every request.

    Args:
        engine: the real engine client.
        metrics: where to record.
    """

    def __init__(self, engine: EngineClient, metrics: ServerMetrics):
        self._engine = engine
        self._metrics = metrics

    @property
    def model_config(self):
        return self._engine.model_config

    @property
    def tokenizer(self) -> "Tokenizer":
        return self._engine.tokenizer

    @property
    def chat_template(self) -> "ChatTemplate":
        return self._engine.chat_template

    @property
    def max_model_len(self) -> int:
        return self._engine.max_model_len

    @property
    def is_running(self) -> bool:
        """The wrapped engine's ``is_running`` (True when it has none)."""
        return bool(getattr(self._engine, "is_running", True))

    def abort(self, request_id: str) -> None:
        self._engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self._engine.stats()

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams,
                       request_id: str, prompt: str | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """``EngineClient.generate`` plus TTFT / inter-token latency / token counters."""
        m = self._metrics
        t_start = time.monotonic()
        t_last: float | None = None
        last: RequestOutput | None = None
        gen = self._engine.generate(prompt_token_ids, sampling_params, request_id, prompt)
        try:
            async for out in gen:
                last = out
                if any(c.delta_token_ids for c in out.outputs):
                    now = time.monotonic()
                    if t_last is None:
                        m.ttft.observe(now - t_start)
                    else:
                        m.itl.observe(now - t_last)
                    t_last = now
                yield out
        finally:
            await gen.aclose()
            if last is not None:
                usage = Usage(len(last.prompt_token_ids),
                              sum(len(c.token_ids) for c in last.outputs),
                              last.num_cached_tokens)
                m.prompt_tokens.inc(usage.prompt_tokens)
                m.cached_prompt_tokens.inc(usage.cached_tokens)
                m.completion_tokens.inc(usage.completion_tokens)
                m.cost.inc(usage.cost_usd())
