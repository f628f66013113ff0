"""``POST /v1/completions`` (legacy text completions) body -> ``CompletionRequest``.

Follows OpenAI's ``CreateCompletionRequest``: ``prompt`` is a string, an array of strings,
an array of token ids or an array of token-id arrays; ``max_tokens`` defaults to 16;
``logprobs`` is an integer 0..5; ``suffix`` is not supported (400); ``best_of`` must
equal ``n`` when given.
"""

from __future__ import annotations

from typing import Any

from openmini.api import validation as v
from openmini.api.chat_schema import parse_options
from openmini.serving.errors import invalid_request
from openmini.serving.protocol import CompletionRequest

COMPLETION_PARAMETERS = frozenset({
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
    "suffix", "temperature", "top_p", "user",
})

DEFAULT_MAX_TOKENS = 16


def parse_completion_request(body: dict[str, Any]) -> CompletionRequest:
    """Check a parsed JSON body and build the request.

    Raises:
        OpenAIError: 400 with ``param`` set to the JSON path of the first problem.
    """
    v.check_keys(body, COMPLETION_PARAMETERS)
    model = v.as_string(v.require(body, "model"), "model")
    prompts = parse_prompt(v.require(body, "prompt"))
    logprobs = body.get("logprobs")
    opts = parse_options({k: x for k, x in body.items() if k != "logprobs"})
    if opts.max_tokens is None:
        opts.max_tokens = DEFAULT_MAX_TOKENS
    if logprobs is not None:
        opts.logprobs = v.as_int(logprobs, "logprobs", 0, 5)
    if body.get("suffix") is not None:
        v.as_string(body["suffix"], "suffix")
        raise invalid_request("The 'suffix' parameter (insertion) is not supported by this "
                              "model.", param="suffix", code="unsupported_parameter")
    if body.get("best_of") is not None:
        best_of = v.as_int(body["best_of"], "best_of", 1, 20)
        if best_of != opts.n:
            raise invalid_request("Only 'best_of' equal to 'n' is supported.", param="best_of",
                                  code="unsupported_value")
    echo = False
    if body.get("echo") is not None:
        echo = v.as_bool(body["echo"], "echo")
    if echo and opts.logprobs is not None:
        raise invalid_request("'echo' together with 'logprobs' is not supported (prompt "
                              "logprobs are not computed).", param="echo",
                              code="unsupported_value")
    extras = {}
    if body.get("user") is not None:
        extras["user"] = v.as_string(body["user"], "user")
    return CompletionRequest(model=model, prompts=prompts, options=opts, echo=echo,
                             extras=extras)


def parse_prompt(value: Any) -> list[str | list[int]]:
    """``prompt`` in any of its four forms -> a list of prompts."""
    if isinstance(value, str):
        return [value]
    items = v.as_array(value, "prompt", min_len=1)
    if all(isinstance(x, str) for x in items):
        return list(items)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return [[v.as_int(t, f"prompt[{j}]", 0) for j, t in enumerate(items)]]
    prompts: list[str | list[int]] = []
    for i, x in enumerate(items):
        path = f"prompt[{i}]"
        if not isinstance(x, list):
            raise v.invalid_type(path, "a string or an array of token ids", x)
        ids = v.as_array(x, path, min_len=1)
        prompts.append([v.as_int(t, f"{path}[{j}]", 0) for j, t in enumerate(ids)])
    return prompts
