"""Turns a ``SchedulerOutput`` into flat batch tensors, runs the model, returns logits.

One step's batch is the concatenation of every scheduled request's new tokens (a prefill
chunk or one decode token each), as in vLLM v1: no padding, no separate prefill/decode
passes. The attention backend reads the per-sequence layout from ``AttentionMetadata``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openmini.config import CacheConfig, ModelConfig
from openmini.engine.request import Request
from openmini.engine.scheduler import SchedulerOutput
from openmini.models.attention import AttentionMetadata, allocate_kv_cache


@dataclass
class RunnerOutput:
    """Logits for the requests that sample this step.

    Attributes:
        logits: ``[B_s, V]`` float32, one row per entry of ``requests``.
        requests: the requests whose scheduled tokens reached their last token, in batch
            order (a request in the middle of a chunked prefill does not sample).
    """

    logits: torch.Tensor
    requests: list[Request]


class ModelRunner:
    """Owns the model and its paged KV cache tensors.

    Args:
        model: a model from ``openmini.models.registry.build_model`` with weights loaded.
        model_config: its architecture.
        cache_config: block size.
        num_blocks: KV pool size in blocks (all layers share block ids).
    """

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig,
                 cache_config: CacheConfig, num_blocks: int):
        self.model = model
        self.model_config = model_config
        self.block_size = cache_config.block_size
        self.num_blocks = num_blocks
        # one [2, num_blocks, block_size, num_kv_heads, head_dim] tensor per layer
        self.kv_caches = allocate_kv_cache(model_config, num_blocks, self.block_size,
                                           model.kv_dtype)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput,
                block_ids_of: "callable") -> RunnerOutput:
        """Run one forward pass over every scheduled token.

        Args:
            scheduler_output: requests and their ``num_scheduled_tokens``; request ``r``
                feeds tokens ``[r.num_computed_tokens, r.num_computed_tokens + k)``.
            block_ids_of: ``request_id -> list[int]`` (the request's block table).

        Returns:
            RunnerOutput with logits at the last token of each request that samples.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        is_decode: list[bool] = []
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        logits_indices: list[int] = []
        sampling: list[Request] = []
        offset = 0
        for req, k in scheduler_output.scheduled:
            start = req.num_computed_tokens
            end = start + k
            input_ids.extend(req.token_ids_slice(start, end))
            positions.extend(range(start, end))
            query_lens.append(k)
            is_decode.append(k == 1 and start >= req.num_prompt_tokens)
            seq_lens.append(end)
            block_tables.append(block_ids_of(req.request_id))
            offset += k
            if end == req.num_tokens:
                logits_indices.append(offset - 1)
                sampling.append(req)

        meta = AttentionMetadata.build(query_lens, seq_lens, block_tables, self.block_size,
                                       device=torch.device("cpu"), is_decode=is_decode)
        ids_t = torch.tensor(input_ids, dtype=torch.long)  # [T]
        pos_t = torch.tensor(positions, dtype=torch.long)  # [T]
        if not sampling:
            self.model(ids_t, pos_t, meta, self.kv_caches)
            return RunnerOutput(torch.empty(0, self.model_config.vocab_size), [])
        hidden = self.model(ids_t, pos_t, meta, self.kv_caches)  # [T, d]
        if len(logits_indices) != hidden.shape[0]:
            hidden = hidden[torch.tensor(logits_indices, dtype=torch.long)]  # [B_s, d]
        logits = self.model.compute_logits(hidden)  # [B_s, V] float32
        return RunnerOutput(logits, sampling)
