"""One engine request seen from the serving layer: start it, iterate it, always clean up.

``GenerationStream.start`` waits for the first engine output, so every error the engine
raises for a request (context too long, KV pool too small, engine stopped) arrives
*before* the HTTP response starts; the handlers turn them into OpenAI errors.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

from openmini.engine.errors import ContextLengthExceededError, EngineDeadError
from openmini.engine.protocol import EngineClient
from openmini.outputs import RequestOutput
from openmini.sampling_params import SamplingParams
from openmini.serving.errors import OpenAIError, invalid_request, server_error
from openmini.structured.errors import StructuredOutputError


def engine_error(exc: BaseException) -> OpenAIError:
    """Map an exception raised by ``EngineClient.generate`` to the error the client sees."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ContextLengthExceededError):
        return invalid_request(str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, StructuredOutputError):
        return invalid_request(f"The requested output format cannot be enforced: {exc}",
                               code="invalid_json_schema")
    if isinstance(exc, EngineDeadError):
        return server_error("The engine is not running (the server is shutting down).",
                            status=503)
    if isinstance(exc, ValueError):
        return invalid_request(str(exc), param="messages", code="invalid_value")
    return server_error()


class GenerationStream:
    """Iterates one engine request's ``RequestOutput`` deltas.

    Use ``await GenerationStream.start(...)``, then ``async for out in stream``; ``aclose()``
    (called automatically at the end or on error/cancellation) aborts an unfinished request
    so its KV blocks are freed.
    """

    def __init__(self, engine: EngineClient, request_id: str,
                 gen: AsyncIterator[RequestOutput], first: RequestOutput):
        self.engine = engine
        self.request_id = request_id
        self._gen = gen
        self._first: RequestOutput | None = first
        self.last: RequestOutput = first
        self._closed = False

    @classmethod
    async def start(cls, engine: EngineClient, prompt_token_ids: list[int],
                    params: SamplingParams, request_id: str,
                    prompt: str | None = None) -> "GenerationStream":
        """Submit the request and wait for its first output (after its first engine step).

        Raises:
            OpenAIError: the engine refused the request (see ``engine_error``).
        """
        gen = engine.generate(prompt_token_ids, params, request_id, prompt)
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise server_error("The engine returned no output.") from None
        except asyncio.CancelledError:
            await _close(engine, request_id, gen)
            raise
        except Exception as exc:
            await _close(engine, request_id, gen)
            raise engine_error(exc) from exc
        return cls(engine, request_id, gen, first)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            if self._first is not None:
                first, self._first = self._first, None
                self.last = first
                yield first
                if first.finished:
                    return
            async for out in self._gen:
                self.last = out
                yield out
                if out.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except Exception as exc:
            raise engine_error(exc) from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """Abort the request if it is still running; idempotent."""
        if not self._closed:
            self._closed = True
            await _close(self.engine, self.request_id, self._gen,
                         abort=not self.last.finished)

    async def collect(self) -> RequestOutput:
        """Run to the end and return the final output (cumulative text, ids, logprobs)."""
        async for _ in self:
            pass
        return self.last


async def _close(engine: EngineClient, request_id: str, gen: AsyncIterator,
                 abort: bool = True) -> None:
    """Close the engine iterator and, for an unfinished request, abort it."""
    try:
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            await aclose()
    finally:
        if abort:
            engine.abort(request_id)
