"""Chat Completions: OpenAI messages -> prompt tokens -> engine -> OpenAI objects.

Response and chunk shapes follow shared/API.md section 2: the non-streaming
``chat.completion`` object, and for streams, per choice a first delta
``{role, content: "", refusal: null}``, content deltas, then ``delta: {}`` with the
finish_reason; with ``include_usage`` every chunk has ``usage: null`` and one last chunk
with ``choices: []`` carries the usage.
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
        sampling_params: engine settings.
        request: the validated request.
    """

    request_id: str
    created: int
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    request: ChatCompletionRequest


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
            OpenAIError: 400 for unsupported features, template errors (param
                ``messages``), ``context_length_exceeded``, bad sampling values.
        """
        self._check_supported(req)
        ids = self.render(req.messages)
        check_context_length(len(ids), req.options.max_tokens, self.engine.max_model_len)
        params = build_sampling_params(req.options, self.engine.model_config.vocab_size)
        return PreparedChat(random_id("chatcmpl-"), int(time.time()), ids, params, req)

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

    @staticmethod
    def _check_supported(req: ChatCompletionRequest) -> None:
        """Features that belong to later issues get a clear 400 instead of being ignored."""
        if req.tools:
            raise invalid_request("Tool calling ('tools') is not supported by this server "
                                  "yet.", param="tools", code="unsupported_parameter")
        rf = req.response_format
        if rf is not None and rf.get("type") != "text":
            raise invalid_request(
                f"response_format type '{rf.get('type')}' is not supported by this server yet; "
                f"only 'text' is.", param="response_format.type", code="unsupported_value")

    # ---- running ------------------------------------------------------------------------------

    async def start(self, prep: PreparedChat) -> GenerationStream:
        """Submit to the engine and wait for the first output (errors arrive here)."""
        return await GenerationStream.start(self.engine, prep.prompt_token_ids,
                                            prep.sampling_params, prep.request_id)

    async def create(self, prep: PreparedChat) -> dict[str, Any]:
        """Run a non-streaming request to the end; returns the ``chat.completion`` body."""
        stream = await self.start(prep)
        out = await stream.collect()
        return self.completion_body(prep, out)

    def completion_body(self, prep: PreparedChat, out: RequestOutput) -> dict[str, Any]:
        """The ``chat.completion`` object for a finished request."""
        want_lp = prep.sampling_params.logprobs is not None
        choices = []
        for c in out.outputs:
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text, "refusal": None,
                            "annotations": []},
                "logprobs": ({"content": self.logprobs.chat_content(c.logprobs),
                              "refusal": None} if want_lp else None),
                "finish_reason": finish_reason(c),
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

