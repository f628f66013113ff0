"""Offline batch API in the shape vLLM users know: ``LLM(...).generate / .chat``."""

from __future__ import annotations

import itertools
from typing import Any, Sequence

from openmini.config import CacheConfig, EngineConfig, SchedulerConfig
from openmini.engine.engine import Engine
from openmini.loaders.registry import DEFAULT_MODEL
from openmini.outputs import CompletionOutput, RequestOutput
from openmini.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class LLM:
    """Load a model once and run batches of prompts through the engine.

    Args:
        model: registry name (default ``smollm2-135m-instruct``), GGUF path or HF directory.
        dtype: ``"auto"`` (bf16 matmuls) or ``"float32"`` (exact mode).
        kv_cache_memory: KV pool size in bytes.
        block_size: tokens per KV block.
        enable_prefix_caching: reuse cached prompt blocks across requests.
        max_num_seqs / max_num_batched_tokens: scheduler limits per step.
        max_model_len: context window override in tokens (default: the model's).
        num_blocks: explicit KV pool size in blocks (overrides ``kv_cache_memory``).
        seed: engine seed for requests without their own.
        num_threads: torch threads (default: torch's choice).
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str = "auto",
                 kv_cache_memory: int = 1 << 30, block_size: int = 16,
                 enable_prefix_caching: bool = True, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 num_blocks: int | None = None, seed: int = 0, num_threads: int | None = None):
        config = EngineConfig(
            model=model, dtype=dtype, seed=seed, num_threads=num_threads,
            max_model_len=max_model_len,
            cache=CacheConfig(block_size=block_size, kv_cache_memory=kv_cache_memory,
                              enable_prefix_caching=enable_prefix_caching,
                              num_blocks=num_blocks),
            scheduler=SchedulerConfig(max_num_batched_tokens=max_num_batched_tokens,
                                      max_num_seqs=max_num_seqs))
        self.engine = Engine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        """The model's ``openmini.tokenizer.Tokenizer``."""
        return self.engine.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            tok = self.engine.tokenizer
            ids = tok.encode(prompt)
            if tok.add_bos_token and tok.bos_token_id is not None and \
                    (not ids or ids[0] != tok.bos_token_id):
                ids = [tok.bos_token_id] + ids
            return prompt, ids
        return None, list(prompt)

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Generate completions for a batch of prompts, all scheduled together.

        Args:
            prompts: a string, a token-id list, ``{"prompt_token_ids": [...]}``, or a list
                of these.
            sampling_params: one for all prompts or one per prompt (default
                ``SamplingParams()``).

        Returns:
            One finished ``RequestOutput`` per prompt, in input order.

        Raises:
            ValueError / ContextLengthExceededError: a prompt cannot be served.
        """
        if isinstance(prompts, (str, dict)) or (
                isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
                       else [sampling_params] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError("sampling_params must be one or one per prompt.")
        order: list[str] = []
        for prompt, params in zip(prompts, params_list):
            text, ids = self._prompt_ids(prompt)
            self.engine.check_request(ids, params)
        for prompt, params in zip(prompts, params_list):
            text, ids = self._prompt_ids(prompt)
            rid = f"llm-{next(self._ids)}"
            self.engine.add_request(rid, ids, params, prompt=text)
            order.append(rid)
        return self._run(order, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True, tools: list[dict] | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Render one conversation or a list of them with the model's chat template and generate.

        Message content is encoded as plain text: special-token strings typed in content
        never become control tokens.
        """
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt_token_ids": self.engine.chat_template.render_ids(
            conv, tools=tools, add_generation_prompt=add_generation_prompt)} for conv in convs]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(order), desc="generate")
        while len(final) < len(order):
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = _strip_deltas(out)
                    if bar is not None:
                        bar.update(1)
            if not self.engine.has_unfinished_requests() and len(final) < len(order):
                raise RuntimeError("engine went idle with unfinished requests")
        if bar is not None:
            bar.close()
        return [final[rid] for rid in order]


def _strip_deltas(out: RequestOutput) -> RequestOutput:
    """Offline results carry cumulative fields only."""
    out.outputs = [CompletionOutput(index=c.index, text=c.text, token_ids=c.token_ids,
                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                    logprobs=c.logprobs) for c in out.outputs]
    return out
