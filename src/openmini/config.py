"""Frozen configuration dataclasses, one per subsystem.

`ModelConfig` is converted once from a HF ``config.json`` or from GGUF metadata
(see ``openmini.loaders``); every other module reads only this dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a decoder-only transformer.

    Field names follow HF ``transformers`` configs (``LlamaConfig`` / ``Qwen2Config``).

    Attributes:
        architecture: registry key, e.g. ``"llama"`` or ``"qwen2"``.
        vocab_size: rows of the embedding / LM head, in tokens.
        hidden_size: model width d.
        intermediate_size: width of the gated MLP.
        num_hidden_layers: number of decoder layers.
        num_attention_heads: query heads.
        num_key_value_heads: key/value heads (grouped-query attention when fewer).
        head_dim: per-head width; ``hidden_size // num_attention_heads`` unless given.
        rms_norm_eps: epsilon of RMSNorm.
        rope_theta: RoPE base frequency.
        rope_scaling: HF ``rope_scaling`` dict (``rope_type`` linear / dynamic / yarn /
            llama3) or None.
        max_position_embeddings: the model's native context window, in tokens.
        tie_word_embeddings: LM head shares the embedding matrix.
        attention_bias: q/k/v projections have a bias (Qwen2).
        bos_token_id / eos_token_ids: special ids from the model files.
        name: human-readable model name for logs and /v1/models.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def replace(self, **changes: Any) -> "ModelConfig":
        """Return a copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing.

    Attributes:
        block_size: tokens per KV block.
        kv_cache_memory: bytes for the whole KV pool (all layers, K and V).
        enable_prefix_caching: reuse full blocks whose chained hash matches.
        num_blocks: explicit pool size in blocks; overrides ``kv_cache_memory`` when set.
    """

    block_size: int = 16
    kv_cache_memory: int = 1 << 30
    enable_prefix_caching: bool = True
    num_blocks: int | None = None


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous-batching limits.

    Attributes:
        max_num_batched_tokens: token budget of one engine step (prefill chunks + decodes);
            512 on CPU keeps one long prompt from stalling other streams for long.
        max_num_seqs: most sequences running at once.
        max_model_len: longest sequence (prompt + output) accepted, in tokens.
        prefill_chunk_size: grid of chunked prefill, in tokens from the sequence start
            (see ``engine.scheduler``); None: ``max(budget // 2, budget - max_num_seqs)``,
            so a chunk fits beside one decode token per running sequence.
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 32
    max_model_len: int = 8192
    prefill_chunk_size: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs besides the model files.

    Attributes:
        model: registry name, GGUF file path or HF directory.
        dtype: ``"auto"`` (bf16 matmuls where the CPU is faster with them, fp32 norms,
            residual and logits) or ``"float32"`` (exact mode, for tests).
        num_threads: torch intra-op threads; None keeps torch's default.
        seed: base seed for requests without their own.
        max_model_len: longest prompt + output in tokens; None means the model's window
            (``ModelConfig.max_position_embeddings``).
    """

    model: str = "smollm2-135m-instruct"
    dtype: str = "auto"
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_threads: int | None = None
    seed: int = 0
    max_model_len: int | None = None
