"""Legacy text completions (``POST /v1/completions``): raw prompts, no chat template.

Shapes follow OpenAI's ``Completion`` object: ``{id: "cmpl-…", object: "text_completion",
created, model, system_fingerprint, choices: [{index, text, logprobs, finish_reason}],
usage}``. Several prompts run as separate engine requests; choice ``index`` is
``prompt_index * n + completion_index``. Streams use the same object per chunk.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from openmini.engine.protocol import EngineClient
from openmini.outputs import RequestOutput
from openmini.sampling_params import SamplingParams
from openmini.serving.chat import finish_reason, random_id, stop_token_ids, usage_of
from openmini.serving.errors import invalid_request
from openmini.serving.generation import GenerationStream
from openmini.serving.logprobs import LogprobFormatter
from openmini.serving.protocol import CompletionRequest
from openmini.serving.sampling import build_sampling_params, check_context_length
from openmini.serving.usage import Usage


@dataclass
class PreparedCompletion:
    """A completions request ready for the engine.

    Attributes:
        request_id: ``cmpl-…``; prompt k runs as engine request ``f"{request_id}-{k}"``.
        created: unix seconds.
        prompts: per prompt, its token ids and its text (None for token prompts).
        sampling_params: engine settings shared by all prompts.
        request: the validated request.
    """

    request_id: str
    created: int
    prompts: list[tuple[list[int], str | None]]
    sampling_params: SamplingParams
    request: CompletionRequest


class CompletionService:
    """Handles ``/v1/completions`` for one engine (see the module docstring)."""

    def __init__(self, engine: EngineClient, model_name: str, system_fingerprint: str):
        self.engine = engine
        self.model_name = model_name
        self.system_fingerprint = system_fingerprint
        self.logprobs = LogprobFormatter(engine.tokenizer.token_bytes, stop_token_ids(engine))

    def prepare(self, req: CompletionRequest) -> PreparedCompletion:
        """Tokenize the prompts, check the window, build SamplingParams.

        Raises:
            OpenAIError: 400 for an empty prompt, token ids outside the vocabulary,
                ``context_length_exceeded`` or bad sampling values.
        """
        vocab = self.engine.model_config.vocab_size
        prompts: list[tuple[list[int], str | None]] = []
        for k, p in enumerate(req.prompts):
            param = "prompt" if len(req.prompts) == 1 else f"prompt[{k}]"
            if isinstance(p, str):
                ids, text = list(self.engine.tokenizer.encode(p)), p
            else:
                ids, text = list(p), None
                bad = [t for t in ids if not 0 <= t < vocab]
                if bad:
                    raise invalid_request(f"Invalid token id {bad[0]} in '{param}': token ids "
                                          f"must be between 0 and {vocab - 1}.", param=param,
                                          code="invalid_value")
            if not ids:
                raise invalid_request(f"Invalid '{param}': the prompt is empty.", param=param,
                                      code="invalid_value")
            check_context_length(len(ids), req.options.max_tokens, self.engine.max_model_len)
            prompts.append((ids, text))
        params = build_sampling_params(req.options, vocab)
        return PreparedCompletion(random_id("cmpl-"), int(time.time()), prompts, params, req)

    async def start(self, prep: PreparedCompletion) -> list[GenerationStream]:
        """Submit every prompt and wait for each one's first output.

        Raises:
            OpenAIError: any prompt was refused (the others are aborted).
        """
        tasks = [asyncio.ensure_future(GenerationStream.start(
            self.engine, ids, prep.sampling_params, f"{prep.request_id}-{k}", text))
            for k, (ids, text) in enumerate(prep.prompts)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            for t in tasks:
                if t.done() and not t.cancelled() and t.exception() is None:
                    await t.result().aclose()
            raise

    def _choice(self, prep: PreparedCompletion, k: int, text: str, c_index: int,
                logprobs: Any, finish: str | None) -> dict[str, Any]:
        return {"index": k * prep.sampling_params.n + c_index, "text": text,
                "logprobs": logprobs, "finish_reason": finish}

    def _echo(self, prep: PreparedCompletion, k: int) -> str:
        if not prep.request.echo:
            return ""
        ids, text = prep.prompts[k]
        return text if text is not None else self.engine.tokenizer.decode(ids)

    async def create(self, prep: PreparedCompletion) -> dict[str, Any]:
        """Run every prompt to the end; returns the ``text_completion`` body."""
        streams = await self.start(prep)
        try:
            finals = await asyncio.gather(*(s.collect() for s in streams))
        finally:
            for s in streams:
                await s.aclose()
        want_lp = prep.sampling_params.logprobs is not None
        choices, usage = [], Usage()
        for k, out in enumerate(finals):
            echo = self._echo(prep, k)
            for c in out.outputs:
                lp = self.logprobs.completion_logprobs(c.logprobs, len(echo)) if want_lp else None
                choices.append(self._choice(prep, k, echo + c.text, c.index, lp,
                                            finish_reason(c)))
            usage = _add(usage, usage_of(out))
        return {"id": prep.request_id, "object": "text_completion", "created": prep.created,
                "model": self.model_name, "system_fingerprint": self.system_fingerprint,
                "choices": choices, "usage": usage.to_openai()}

    async def chunks(self, prep: PreparedCompletion,
                     streams: list[GenerationStream]) -> AsyncIterator[dict[str, Any]]:
        """The stream's ``text_completion`` chunks (prompts interleaved as they progress)."""
        want_lp = prep.sampling_params.logprobs is not None
        include_usage = prep.request.options.include_usage
        base = {"id": prep.request_id, "object": "text_completion", "created": prep.created,
                "model": self.model_name, "system_fingerprint": self.system_fingerprint}
        extra = {"usage": None} if include_usage else {}
        done: set[int] = set()
        sent_chars: dict[int, int] = {}
        finals: dict[int, RequestOutput] = {}
        async for k, out in _merge(streams):
            finals[k] = out
            for c in out.outputs:
                idx = k * prep.sampling_params.n + c.index
                if idx in done:
                    continue
                text = c.delta_text
                if idx not in sent_chars:
                    echo = self._echo(prep, k)
                    text = echo + text
                    sent_chars[idx] = len(echo)
                lp = None
                if want_lp:
                    lp = self.logprobs.completion_logprobs(c.delta_logprobs, sent_chars[idx])
                sent_chars[idx] += len(c.delta_text)
                if text or (lp and lp["tokens"]):
                    yield {**base, "choices": [self._choice(prep, k, text, c.index, lp, None)],
                           **extra}
                if c.finish_reason is not None:
                    done.add(idx)
                    yield {**base, "choices": [self._choice(prep, k, "", c.index, None,
                                                            finish_reason(c))], **extra}
        if include_usage:
            usage = Usage()
            for out in finals.values():
                usage = _add(usage, usage_of(out))
            yield {**base, "choices": [], "usage": usage.to_openai()}


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens,
                 a.cached_tokens + b.cached_tokens)


async def _merge(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several streams as their outputs arrive; yields ``(stream_index, output)``.

    Every stream is closed (and its request aborted if unfinished) when this generator ends,
    fails or is cancelled.
    """
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(k: int, s: GenerationStream) -> None:
        try:
            async for out in s:
                await queue.put((k, out))
        except Exception as exc:  # forwarded to the consumer
            await queue.put((k, exc))
        finally:
            await queue.put((k, end))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            k, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            await s.aclose()
