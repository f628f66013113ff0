"""Chat Completions: OpenAI messages -> prompt tokens -> engine -> OpenAI objects.

Response and chunk shapes follow shared/API.md section 2: the non-streaming
``chat.completion`` object, and for streams, per choice a first delta
``{role, content: "", refusal: null}``, content deltas, then ``delta: {}`` with the
finish_reason; with ``include_usage`` every chunk has ``usage: null`` and one last chunk
with ``choices: []`` carries the usage.

Tools and ``response_format`` (serving/tools.py, serving/structured.py) become a grammar in
``SamplingParams.structured_output``; tool calls are parsed out of the text with the
streaming parser of serving/tool_parsers.py, so streamed and non-streamed results match.
Tool-call deltas: the first fragment of call k is ``{index: k, id, type: "function",
function: {name, arguments: ""}}`` (the first one of a choice also carries ``role`` and
``content: null``), later fragments ``{index: k, function: {arguments}}``.
"""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import jinja2

from openmini.engine.protocol import EngineClient
from openmini.outputs import CompletionOutput, RequestOutput
from openmini.sampling_params import SamplingParams
from openmini.serving.errors import invalid_request, server_error
from openmini.serving.generation import GenerationStream
from openmini.serving.logprobs import LogprobFormatter
from openmini.serving.protocol import ChatCompletionRequest
from openmini.serving.sampling import build_sampling_params, check_context_length
from openmini.serving.structured import (
    check_json_mentioned,
    response_format_constraint,
    structured_output_spec,
    tool_constraints,
)
from openmini.serving.tool_parsers import ContentDelta, ParsedOutputBuilder, ToolCallStarted
from openmini.serving.tools import ToolCallingPlan, plan_tool_calling
from openmini.serving.usage import Usage

_ID_ALPHABET = string.ascii_letters + string.digits


def random_id(prefix: str, length: int = 29) -> str:
    """An OpenAI-style object id, e.g. ``chatcmpl-`` followed by 29 random characters."""
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


def finish_reason(choice: CompletionOutput) -> str:
    """The OpenAI finish_reason of a finished engine completion.

    Raises:
        OpenAIError: 503 for an aborted completion (only the server aborts live requests).
    """
    if choice.finish_reason in ("stop", "length"):
        return choice.finish_reason
    raise server_error("The request was aborted by the server.", status=503)


def stop_token_ids(engine: EngineClient) -> frozenset[int]:
    """EOS ids of the tokenizer and of the model config (their text never reaches content)."""
    ids = set(getattr(engine.tokenizer, "eos_token_ids", ()) or ())
    ids |= set(engine.model_config.eos_token_ids or ())
    return frozenset(ids)


def usage_of(out: RequestOutput) -> Usage:
    """Usage of a finished request: prompt counted once, completions summed over choices."""
    return Usage(prompt_tokens=len(out.prompt_token_ids),
                 completion_tokens=sum(len(c.token_ids) for c in out.outputs),
                 cached_tokens=out.num_cached_tokens)


@dataclass
class PreparedChat:
    """A chat request ready for the engine.

    Attributes:
        request_id: ``chatcmpl-…``, also the engine request id.
        created: unix seconds.
        prompt_token_ids: the rendered conversation.
        sampling_params: engine settings (with the grammar, if any).
        request: the validated request.
        tools: tools, tool_choice and the call format of this request.
    """

    request_id: str
    created: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    request: ChatCompletionRequest
    tools: ToolCallingPlan


class ChatCompletionService:
    """Handles ``/v1/chat/completions`` for one engine.

    Args:
        engine: the ``EngineClient``.
        model_name: the served model id reported in responses.
        system_fingerprint: reported on every response and chunk.
    """

    def __init__(self, engine: EngineClient, model_name: str, system_fingerprint: str):
        self.engine = engine
        self.model_name = model_name
        self.system_fingerprint = system_fingerprint
        self.logprobs = LogprobFormatter(engine.tokenizer.token_bytes, stop_token_ids(engine))

    # ---- preparation ------------------------------------------------------------------------

    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        """Render the prompt, check the window, build SamplingParams (no engine work yet).

        Raises:
            OpenAIError: 400 for template errors (param ``messages``), schemas the grammar
                cannot enforce (param at the schema), ``json_object`` without "json" in the
                messages, ``context_length_exceeded``, bad sampling values.
        """
        plan = plan_tool_calling(req.tools, req.tool_choice, req.parallel_tool_calls,
                                 self.engine.chat_template)
        answer = response_format_constraint(req.response_format)
        if req.response_format and req.response_format.get("type") == "json_object":
            check_json_mentioned(m.get("content") for m in req.messages)
        spec = structured_output_spec(plan, answer, tool_constraints(plan.tools))
        messages, template_tools = plan.prompt(req.messages)
        ids = self.render(messages, template_tools)
        check_context_length(len(ids), req.options.max_tokens, self.engine.max_model_len)
        params = build_sampling_params(req.options, self.engine.model_config.vocab_size)
        params.structured_output = spec
        return PreparedChat(random_id("chatcmpl-"), int(time.time()), ids, params, req, plan)

    def render(self, messages: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Messages -> prompt token ids through the model's chat template.

        ``developer`` messages are rendered as ``system`` messages (chat templates of open
        models know only ``system``). The template keeps message text out of control
        tokens and folds mid-conversation system messages when needed (case C10).

        Raises:
            OpenAIError: 400 (param ``messages``) when the template rejects the conversation.
        """
        msgs = []
        for m in messages:
            m = dict(m)
            if m["role"] == "developer":
                m["role"] = "system"
            msgs.append(m)
        try:
            return list(self.engine.chat_template.render_ids(msgs, tools=tools,
                                                             add_generation_prompt=True))
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            raise invalid_request(f"The messages could not be rendered with the model's chat "
                                  f"template: {exc}", param="messages",
                                  code="invalid_value") from exc

    # ---- running ------------------------------------------------------------------------------

    async def start(self, prep: PreparedChat) -> GenerationStream:
        """Submit to the engine and wait for the first output (errors arrive here)."""
        return await GenerationStream.start(self.engine, prep.prompt_token_ids,
                                            prep.sampling_params, prep.request_id)

    async def create(self, prep: PreparedChat) -> dict[str, Any]:
        """Run a non-streaming request to the end; returns the ``chat.completion`` body.

        With tools and n = 1 the output is parsed as it grows and generation stops at a
        repeated tool call (the streaming path stops at the same output).
        """
        stream = await self.start(prep)
        if not (prep.tools.parses_tool_calls and prep.sampling_params.n == 1):
            return self.completion_body(prep, await stream.collect())
        parser = prep.tools.parser()
        async for out in stream:
            parser.feed(out.outputs[0].delta_text)
            if parser.stopped:
                await stream.aclose()
                break
        return self.completion_body(prep, stream.last)

    def completion_body(self, prep: PreparedChat, out: RequestOutput) -> dict[str, Any]:
        """The ``chat.completion`` object for a finished request."""
        want_lp = prep.sampling_params.logprobs is not None
        choices = []
        for c in out.outputs:
            message: dict[str, Any] = {"role": "assistant", "content": c.text, "refusal": None,
                                       "annotations": []}
            if prep.tools.parses_tool_calls:
                parsed, repeated = prep.tools.parse(c.text)
                message["content"] = parsed.content
                if parsed.tool_calls:
                    message["tool_calls"] = [
                        {"id": tool_call_id(), "type": "function",
                         "function": {"name": tc.name, "arguments": tc.arguments}}
                        for tc in parsed.tool_calls]
                reason = prep.tools.finish_reason(
                    None if repeated else finish_reason(c), len(parsed.tool_calls), repeated)
            else:
                reason = finish_reason(c)
            choices.append({
                "index": c.index,
                "message": message,
                "logprobs": ({"content": self.logprobs.chat_content(c.logprobs),
                              "refusal": None} if want_lp else None),
                "finish_reason": reason,
            })
        return {"id": prep.request_id, "object": "chat.completion", "created": prep.created,
                "model": self.model_name, "choices": choices,
                "usage": usage_of(out).to_openai(), "service_tier": "default",
                "system_fingerprint": self.system_fingerprint}

    async def chunks(self, prep: PreparedChat,
                     stream: GenerationStream) -> AsyncIterator[dict[str, Any]]:
        """The ``chat.completion.chunk`` objects of a started stream, in order.

        Raises:
            OpenAIError: an engine failure after the stream started (the api layer sends
                it as an SSE ``error`` event).
        """
        opts = prep.request.options
        want_lp = prep.sampling_params.logprobs is not None
        base = {"id": prep.request_id, "object": "chat.completion.chunk",
                "created": prep.created, "model": self.model_name,
                "service_tier": "default", "system_fingerprint": self.system_fingerprint}
        extra = {"usage": None} if opts.include_usage else {}

        def chunk(index: int, delta: dict, logprobs: Any = None,
                  finish: str | None = None) -> dict[str, Any]:
            return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": finish}], **extra}

        if prep.tools.parses_tool_calls:
            async for c in self._tool_chunks(prep, stream, chunk):
                yield c
            if opts.include_usage:
                yield {**base, "choices": [], "usage": usage_of(stream.last).to_openai()}
            return
        for i in range(prep.sampling_params.n):
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
        done: set[int] = set()
        async for out in stream:
            for c in out.outputs:
                if c.index in done:
                    continue
                lp = self.logprobs.chat_content(c.delta_logprobs) if want_lp else []
                if c.delta_text or lp:
                    yield chunk(c.index, {"content": c.delta_text},
                                {"content": lp, "refusal": None} if want_lp else None)
                if c.finish_reason is not None:
                    done.add(c.index)
                    yield chunk(c.index, {}, None, finish_reason(c))
        if opts.include_usage:
            yield {**base, "choices": [], "usage": usage_of(stream.last).to_openai()}


    async def _tool_chunks(self, prep: PreparedChat, stream: GenerationStream,
                           chunk: Any) -> AsyncIterator[dict[str, Any]]:
        """Chunks of a request whose output may hold tool calls (one parser per choice).

        A choice's first chunk carries ``role``: with ``content: ""`` when it starts with
        text, with ``content: null`` and the first tool-call fragment when it starts with a
        call. Logprobs of tokens whose text is held back ride on the next chunk (the last
        ones on the finish chunk).
        """
        want_lp = prep.sampling_params.logprobs is not None
        n = prep.sampling_params.n
        parsers = [prep.tools.parser() for _ in range(n)]
        counts = [ParsedOutputBuilder() for _ in range(n)]
        started = [False] * n
        pending_lp: list[list] = [[] for _ in range(n)]
        done: set[int] = set()

        def deltas(i: int, events: list) -> list[dict[str, Any]]:
            out = []
            for ev in events:
                if isinstance(ev, ContentDelta):
                    if not started[i]:
                        out.append({"role": "assistant", "content": "", "refusal": None})
                    out.append({"content": ev.text})
                elif isinstance(ev, ToolCallStarted):
                    call = {"index": ev.index, "id": tool_call_id(), "type": "function",
                            "function": {"name": ev.name, "arguments": ""}}
                    if started[i]:
                        out.append({"tool_calls": [call]})
                    else:
                        out.append({"role": "assistant", "content": None, "refusal": None,
                                    "tool_calls": [call]})
                else:
                    out.append({"tool_calls": [{"index": ev.index,
                                                "function": {"arguments": ev.text}}]})
                started[i] = True
            counts[i].add(events)
            return out

        def emit(i: int, events: list, lp: list) -> list[dict[str, Any]]:
            pending_lp[i].extend(lp)
            out = []
            for d in deltas(i, events):
                logprobs = None
                if want_lp:
                    logprobs = {"content": pending_lp[i], "refusal": None}
                    pending_lp[i] = []
                out.append(chunk(i, d, logprobs))
            return out

        async for out in stream:
            for c in out.outputs:
                if c.index in done:
                    continue
                i = c.index
                lp = self.logprobs.chat_content(c.delta_logprobs) if want_lp else []
                for ch in emit(i, parsers[i].feed(c.delta_text) if c.delta_text else [], lp):
                    yield ch
                repeated = parsers[i].stopped
                if c.finish_reason is not None or repeated:
                    done.add(i)
                    for ch in emit(i, parsers[i].finish(), []):
                        yield ch
                    if not started[i]:
                        yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
                    reason = prep.tools.finish_reason(
                        None if repeated else finish_reason(c), len(counts[i].tool_calls),
                        repeated)
                    rest = ({"content": pending_lp[i], "refusal": None}
                            if want_lp and pending_lp[i] else None)
                    yield chunk(i, {}, rest, reason)
            if len(done) == n:
                if not out.finished:
                    await stream.aclose()  # every choice ended at a repeated call
                break


def tool_call_id() -> str:
    """An OpenAI-style tool call id: ``call_`` and 24 random characters."""
    return random_id("call_", 24)
