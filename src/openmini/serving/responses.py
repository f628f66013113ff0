"""The Responses API (shared/API.md section 4) on top of the Chat Completions serving code.

A request becomes the neutral chat form (``responses_prepare``, ``responses_items``): the
``previous_response_id`` chain's stored input and output items, then the new input, after
an ``instructions`` system message that is never carried over. The
``ChatCompletionService`` renders, checks the window, builds sampling parameters (with
tools, grammar and response format) and generates; its chunks are folded into output
items and events (``responses_output``) by a ``ResponseRun`` task that no HTTP request
owns (``responses_run``).

State lives in a ``ResponseStore``. Each stored response is written once when it starts
(``queued`` for background, else ``in_progress``) together with its full input items, and
once when it ends (``completed`` / ``incomplete`` / ``failed`` / ``cancelled``) together
with its output items; in between, progress lives in memory (``ResponseRun``). Responses
left unfinished by a crash are marked ``failed`` on start-up (``recover``).

``input_items`` of a response are everything the model saw apart from ``instructions``:
the chain's items plus the new input. Storing the whole list per response (instead of
walking the chain) keeps a conversation intact when an earlier response is deleted, at a
storage cost quadratic in the number of turns (bounded by the context window).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Callable

from openmini.engine.protocol import EngineClient
from openmini.serving.chat import ChatCompletionService
from openmini.serving.errors import OpenAIError, invalid_request, server_error
from openmini.serving.generation import GenerationStream
from openmini.serving.responses_output import OutputBuilder
from openmini.serving.responses_prepare import PreparedResponse, prepare_response
from openmini.serving.responses_protocol import ResponsesRequest
from openmini.serving.responses_run import CANCEL_REQUESTED, ResponseRun
from openmini.store.base import UNFINISHED_STATUSES, ResponseStore

logger = logging.getLogger("openmini.responses")

TERMINAL_EVENTS = {"completed": "response.completed", "incomplete": "response.incomplete",
                   "failed": "response.failed"}
RESTART_MESSAGE = ("The server stopped before this response finished, so it was not "
                   "completed. Please create it again.")
SHUTDOWN_MESSAGE = "The server shut down before this response finished."


def not_found(response_id: str) -> OpenAIError:
    """404 for an unknown (or unstored, or deleted) response id."""
    return OpenAIError(f"Response with id '{response_id}' not found.", status=404)


class ResponsesService:
    """Handles ``/v1/responses`` for one engine and one store.

    Args:
        engine: the ``EngineClient``.
        model_name: the served model id reported in responses.
        system_fingerprint: passed to the chat path (not part of Responses objects).
        store: where responses, their input items and output items persist.
    """

    def __init__(self, engine: EngineClient, model_name: str, system_fingerprint: str,
                 store: ResponseStore):
        self.engine = engine
        self.model_name = model_name
        self.store = store
        self.chat = ChatCompletionService(engine, model_name, system_fingerprint)
        self._runs: dict[str, ResponseRun] = {}  # stored responses still running

    # ---- start-up -----------------------------------------------------------------------------

    def recover(self) -> int:
        """Mark responses left ``queued`` / ``in_progress`` by an earlier process as
        ``failed`` (their generation died with it). Returns how many were marked."""
        count = 0
        for resp in self.store.unfinished():
            if resp["id"] in self._runs:
                continue
            self._fail(resp, RESTART_MESSAGE)
            count += self.store.update(resp)
        if count:
            logger.warning("marked %d unfinished response(s) from a previous run failed", count)
        return count

    @staticmethod
    def _fail(resp: dict[str, Any], message: str) -> None:
        resp["status"] = "failed"
        resp["error"] = {"code": "server_error", "message": message}
        for item in resp.get("output") or []:
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"

    # ---- preparation --------------------------------------------------------------------------

    def prepare(self, req: ResponsesRequest) -> PreparedResponse:
        """See ``openmini.serving.responses_prepare.prepare_response``."""
        return prepare_response(req, self.store, self.chat, self.model_name)

    # ---- running ------------------------------------------------------------------------------

    async def start(self, prep: PreparedResponse, on_done: Callable[[], None] | None = None,
                    subscribe: bool = False) -> tuple[ResponseRun, asyncio.Queue | None]:
        """Start a foreground response: submit to the engine, store it ``in_progress``,
        then run it in its own task. Engine refusals raise here, before any event.

        Returns:
            The run and, with ``subscribe``, the queue of its events (from
            ``response.created``, sequence number 0).
        """
        stream = await self.chat.start(prep.chat)
        try:
            run = ResponseRun(prep.response, background=False, on_done=on_done)
            if prep.request.store:
                self.store.create(prep.response, prep.input_items)
        except BaseException:
            await stream.aclose()
            raise
        queue = run.subscribe() if subscribe else None
        run.emit_response("response.created")
        run.emit_response("response.in_progress")
        self._launch(prep, run, stream)
        return run, queue

    def start_background(self, prep: PreparedResponse,
                         on_done: Callable[[], None] | None = None,
                         subscribe: bool = False) -> tuple[ResponseRun, asyncio.Queue | None]:
        """Store a background response ``queued`` and run it in a task that outlives the
        HTTP request. Returns the run (its snapshot is the ``queued`` body) and optionally
        an event queue."""
        run = ResponseRun(prep.response, background=True, on_done=on_done)
        self.store.create(prep.response, prep.input_items)
        queue = run.subscribe() if subscribe else None
        run.emit_response("response.created")
        self._launch(prep, run, None)
        return run, queue

    def _launch(self, prep: PreparedResponse, run: ResponseRun,
                stream: GenerationStream | None) -> None:
        if prep.request.store:
            self._runs[run.id] = run
        run.task = asyncio.get_running_loop().create_task(self._execute(prep, run, stream),
                                                          name=f"response {run.id}")
        run.task.add_done_callback(lambda _: self._settle_unstarted(prep, run))

    def _settle_unstarted(self, prep: PreparedResponse, run: ResponseRun) -> None:
        """Safety net for a task cancelled before its first step (its ``finally`` never
        ran): abort the engine request, write the final state, release waiters."""
        if run.done:
            return
        self.engine.abort(prep.chat.request_id)
        OutputBuilder(run.response, run.emit).abandon(
            "cancelled" if run.cancel_reason is not None else "failed")
        if run.response["status"] == "failed":
            self._fail(run.response, SHUTDOWN_MESSAGE)
        self._persist(prep, run)
        self._runs.pop(run.id, None)
        run.finish()

    async def _execute(self, prep: PreparedResponse, run: ResponseRun,
                       stream: GenerationStream | None) -> None:
        """Generate, fold chunks into output, write the final state (always)."""
        resp = run.response
        builder = OutputBuilder(resp, run.emit)
        chunks = None
        try:
            if stream is None:
                resp["status"] = "in_progress"
                self._persist(prep, run)
                run.emit_response("response.in_progress")
                stream = await self.chat.start(prep.chat)
            chunks = self.chat.chunks(prep.chat, stream)
            async for chunk in chunks:
                builder.feed(chunk)
            builder.finish()
            if resp["status"] == "completed":
                resp["completed_at"] = int(time.time())
            self._persist(prep, run)
            run.emit_response(TERMINAL_EVENTS[resp["status"]])
        except asyncio.CancelledError:
            await _close(chunks, stream)
            if run.cancel_reason is not None:
                builder.abandon("cancelled")
            else:  # torn down with the event loop: the server is stopping
                builder.abandon("failed")
                self._fail(resp, SHUTDOWN_MESSAGE)
            self._persist(prep, run)
            raise
        except Exception as exc:  # noqa: BLE001 - the failure becomes the response's state
            err = exc if isinstance(exc, OpenAIError) else server_error()
            if not isinstance(exc, OpenAIError):
                logger.exception("response %s failed", run.id)
            run.error = err
            builder.abandon("failed")
            self._fail(resp, err.message)
            self._persist(prep, run)
            run.emit_response("response.failed")
        finally:
            await _close(chunks, stream)
            self._runs.pop(run.id, None)
            run.finish()

    def _persist(self, prep: PreparedResponse, run: ResponseRun) -> None:
        """Write the run's current state (one transaction); storage errors are logged, the
        client still gets its response."""
        if not prep.request.store:
            return
        try:
            self.store.update(run.response)
        except Exception:  # noqa: BLE001 - a full disk must not lose the live response
            logger.exception("could not store response %s", run.id)

    async def create(self, prep: PreparedResponse,
                     on_done: Callable[[], None] | None = None) -> dict[str, Any]:
        """Run a foreground response to the end and return its final object.

        Cancelling this coroutine (the client left) cancels the run (C13).

        Raises:
            OpenAIError: the engine refused the request, or generation failed (the stored
                response is ``failed`` then).
        """
        run, _ = await self.start(prep, on_done)
        try:
            await asyncio.shield(run.wait())
        except asyncio.CancelledError:
            run.cancel(CANCEL_REQUESTED)
            raise
        if run.error is not None:
            raise run.error
        return run.snapshot()

    async def events(self, run: ResponseRun, queue: asyncio.Queue,
                     cancel_on_close: bool) -> AsyncIterator[dict[str, Any]]:
        """The run's events from ``queue`` until it ends. Closing this iterator early (the
        client left) cancels a foreground run; a background run goes on."""
        try:
            while True:
                event = await queue.get()
                if event is None:
                    return
                yield event
        finally:
            run.unsubscribe(queue)
            if cancel_on_close and not run.done:
                run.cancel(CANCEL_REQUESTED)

    # ---- stored responses ---------------------------------------------------------------------

    def retrieve(self, response_id: str) -> dict[str, Any]:
        """The response (live progress while it runs). Raises 404 ``OpenAIError``."""
        run = self._runs.get(response_id)
        if run is not None:
            return run.snapshot()
        resp = self.store.get(response_id)
        if resp is None:
            raise not_found(response_id)
        return resp

    async def delete(self, response_id: str) -> dict[str, Any]:
        """Delete a stored response (stopping it first if it runs). Raises 404."""
        run = self._runs.get(response_id)
        if run is not None:
            run.cancel(CANCEL_REQUESTED)
            await asyncio.shield(run.wait())
        if not self.store.delete(response_id):
            raise not_found(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    async def cancel(self, response_id: str) -> dict[str, Any]:
        """Cancel a background response; returns it (``cancelled``, or its final state
        when it had already ended). Raises 404, or 400 for a foreground response."""
        run = self._runs.get(response_id)
        if run is not None:
            if not run.background:
                raise _not_background(response_id)
            run.cancel(CANCEL_REQUESTED)
            await asyncio.shield(run.wait())
            return run.snapshot()
        resp = self.store.get(response_id)
        if resp is None:
            raise not_found(response_id)
        if not resp.get("background"):
            raise _not_background(response_id)
        if resp["status"] in UNFINISHED_STATUSES:  # no task behind it: settle it here
            resp["status"] = "cancelled"
            self.store.update(resp)
        return resp

    def input_items(self, response_id: str, limit: int, order: str,
                    after: str | None) -> dict[str, Any]:
        """One page of a response's input items (``object: "list"``). Raises 404, or 400
        when ``after`` is not one of its items."""
        try:
            page = self.store.list_input_items(response_id, limit=limit, order=order,
                                               after=after)
        except KeyError:
            raise invalid_request(f"Invalid 'after': no input item with id '{after}' in "
                                  f"response '{response_id}'.", param="after",
                                  code="invalid_value") from None
        if page is None:
            raise not_found(response_id)
        return {"object": "list", "data": page.data, "first_id": page.first_id,
                "last_id": page.last_id, "has_more": page.has_more}


def _not_background(response_id: str) -> OpenAIError:
    return invalid_request(f"Response '{response_id}' was not created with background=true; "
                           f"only background responses can be cancelled.",
                           param="response_id", code="invalid_value")


async def _close(chunks: Any, stream: GenerationStream | None) -> None:
    """Close the chunk iterator and the engine stream (aborts an unfinished request)."""
    if chunks is not None:
        try:
            await chunks.aclose()
        except Exception:  # noqa: BLE001 - cleanup must reach the engine abort below
            logger.debug("closing chat chunks failed", exc_info=True)
    if stream is not None:
        await stream.aclose()
