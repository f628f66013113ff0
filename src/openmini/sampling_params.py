"""Per-request generation settings (the vLLM ``SamplingParams`` shape)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class JsonSchemaConstraint:
    """One JSON value the output (or a tool call's arguments) must be.

    Attributes:
        schema: the JSON Schema as JSON text (Draft 2020-12; key order kept, since the
            grammar writes object properties in schema order).
        strict: True fails closed on any keyword the grammar engine cannot enforce; False
            ignores such keywords and enforces the rest (OpenAI's non-strict mode promises
            no validity either).
    """

    schema: str
    strict: bool = True


@dataclass(frozen=True)
class ToolCallConstraint:
    """A callable function: its name and the schema of its arguments (a JSON object)."""

    name: str
    parameters: JsonSchemaConstraint


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What a request's whole output must match; compiled to a grammar by
    ``openmini.structured`` (backend-neutral, hashable: it is the grammar cache key).

    The output is either an *answer* or one or more *tool calls*. A tool call is written as
    ``call_begin + {"<name_key>": NAME, "<arguments_key>": ARGS} + call_end`` (the
    model family's format, e.g. Hermes/Qwen2.5 ``<tool_call>\\n{...}\\n</tool_call>``);
    consecutive calls are joined by ``call_separator``.

    Attributes:
        answer: None: the answer is free text; else the answer is one JSON value.
        allow_answer: False forces tool calls (``tool_choice`` required / named).
        tools: the functions the model may call (empty: no tool calls).
        max_tool_calls: most calls in one output (1 when ``parallel_tool_calls`` is
            false); None for no limit.
        allow_text_before_calls: with a free-text answer, text may precede the first call.
        allow_bare_call: with a free-text answer, an output that starts with ``{`` is one
            call written without ``call_begin`` / ``call_end`` (Qwen2.5-Coder answers so);
            free text then may not start with ``{``.
        call_begin / call_end / call_separator / name_key / arguments_key: the format.
            ``call_begin`` starts with its marker (``<tool_call>``): once the marker
            appears, a valid call is forced.
    """

    answer: JsonSchemaConstraint | None = None
    allow_answer: bool = True
    tools: tuple[ToolCallConstraint, ...] = ()
    max_tool_calls: int | None = None
    allow_text_before_calls: bool = True
    allow_bare_call: bool = False
    call_begin: str = "<tool_call>\n"
    call_end: str = "\n</tool_call>"
    call_separator: str = "\n"
    name_key: str = "name"
    arguments_key: str = "arguments"

    def __post_init__(self) -> None:
        if not self.allow_answer and not self.tools:
            raise ValueError("A structured output that forbids an answer needs tools.")
        if self.max_tool_calls is not None and self.max_tool_calls < 1:
            raise ValueError("max_tool_calls must be at least 1.")
        if self.tools and (not self.call_begin.strip()
                           or self.call_begin != self.call_begin.lstrip()):
            raise ValueError("call_begin must start with a visible marker (no leading "
                             "whitespace); the grammar forces a call once it appears.")


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range. ``param`` names it (OpenAI spelling)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    Attributes:
        n: completions per prompt; they share the prompt's KV blocks via the prefix cache.
        temperature: 0 means greedy; otherwise logits are divided by it.
        top_p: nucleus mass in (0, 1].
        top_k: keep the k most likely tokens; -1 (or 0) disables.
        min_p: drop tokens whose probability is below ``min_p * p_max``.
        presence_penalty / frequency_penalty: OpenAI penalties over generated tokens
            (logit -= presence * [count > 0] + frequency * count).
        repetition_penalty: CTRL-style (Keskar et al. 2019) over prompt + output tokens;
            1.0 disables.
        logit_bias: token id -> additive bias in [-100, 100].
        seed: per-request generator seed; same seed and params give the same tokens.
        max_tokens: most generated tokens; None means up to the context window.
        min_tokens: stop conditions are ignored before this many tokens.
        stop: strings that end generation; the returned text excludes them.
        stop_token_ids: extra token ids that end generation (kept out of the text).
        ignore_eos: keep going past the model's EOS tokens.
        logprobs: None for none, else how many top alternatives (0..20) to return
            beside the sampled token's own log-probability.
        skip_special_tokens: drop special tokens from the detokenized text.
        include_stop_str_in_output: keep a matched stop string in the text.
        structured_output: grammar constraint on the output (JSON schema, tool calls), or
            None; enforced token by token by the engine (``openmini.structured``).
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutputSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature < 1e-5

    def validate(self) -> None:
        """Check ranges.

        Raises:
            SamplingParamsError: with ``param`` set to the offending field.
        """
        def bad(msg: str, param: str) -> None:
            raise SamplingParamsError(msg, param)

        if not 1 <= self.n <= 128:
            bad(f"n must be between 1 and 128, got {self.n}.", "n")
        if not 0.0 <= self.temperature <= 2.0:
            bad(f"temperature must be between 0 and 2, got {self.temperature}.", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}.", "top_p")
        if self.top_k is None or self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            bad(f"top_k must be -1 (disabled) or positive, got {self.top_k}.", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be between 0 and 1, got {self.min_p}.", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                bad(f"{name} must be between -2 and 2, got {v}.", name)
        if self.repetition_penalty <= 0:
            bad("repetition_penalty must be positive.", "repetition_penalty")
        for tok, b in self.logit_bias.items():
            if not -100.0 <= b <= 100.0:
                bad(f"logit_bias values must be between -100 and 100, got {b} for {tok}.",
                    "logit_bias")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}.", "max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"top_logprobs must be between 0 and 20, got {self.logprobs}.", "top_logprobs")
