"""Llama-family decoder (Llama 2/3, SmolLM2, ...), matching HF ``LlamaForCausalLM``.

Reference: Touvron et al. 2023, "Llama 2" (arXiv:2307.09288): pre-norm RMSNorm, RoPE,
SwiGLU MLP, grouped-query attention. Built from the blocks in ``layers.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from openmini.config import ModelConfig
from openmini.models.attention import AttentionMetadata
from openmini.models.layers import (
    DecoderLayer,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    bind_attributes,
    interleave_rotary_rows,
)
from openmini.models.quantization import (
    GROUP,
    Int8Embedding,
    Int8Linear,
    NativeKernels,
    apply_weight_format,
    resolve_dtype_mode,
)

_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# HF names inside a layer -> (our parameter path, row slice name or None)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
}
_DIRECT = ("self_attn.o_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")
# checkpoint entries that carry no weights (old HF checkpoints store RoPE buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaForCausalLM(nn.Module):
    """Llama decoder with a paged KV cache.

    Args:
        config: architecture hyper-parameters.
        dtype_mode: ``"float32"`` (exact, for tests), ``"auto"`` (the fastest format this
            CPU runs well, see ``quantization.resolve_dtype_mode``: on x86 with AVX2 int4
            weights where the checkpoint is already 4-bit, int8 elsewhere, native kernels,
            float32 KV cache; norms, residual stream, RoPE and logits stay float32), or an
            explicit ``"bfloat16"`` / ``"int8"`` / ``"int4"`` / ``"mixed"``.

    Attributes:
        kv_dtype: dtype to allocate the KV cache with (float32 or bfloat16; every attention
            path accepts both, so a caller may choose bfloat16 to halve cache memory).
        linear_format: weight format of the linear layers (``quantization.DTYPE_MODES``).
        native_kernels: the quantized layers run the native AVX2 kernels (set by
            ``load_weights``; see ``openmini.models.quantization``).

    Raises:
        ValueError: unknown ``dtype_mode`` or inconsistent head sizes.
    """

    def __init__(self, config: ModelConfig, dtype_mode: str = "auto") -> None:
        super().__init__()
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({config.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({config.num_key_value_heads})"
            )
        if config.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {config.head_dim}")
        self.config = config
        self.linear_format, self.kv_dtype = resolve_dtype_mode(dtype_mode)
        qkv_bias, o_bias = self._biases(config)
        self.embed_tokens = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size), requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(config, qkv_bias, o_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.embed_int8: Int8Embedding | None = None  # replaces embed_tokens in int formats
        self.loaded = False
        self.native_kernels = False

    @classmethod
    def _biases(cls, config: ModelConfig) -> tuple[bool, bool]:
        """(q/k/v bias, o_proj bias) as in HF ``LlamaAttention``."""
        return config.attention_bias, config.attention_bias

    # ------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_metadata: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Run the decoder over one step's flat token batch.

        Args:
            input_ids: [T] int64 token ids.
            positions: [T] int64 position of each token in its sequence.
            attn_metadata: batch layout from ``AttentionMetadata.build``.
            kv_caches: one ``[2, num_blocks, block_size, Hkv, D]`` tensor of dtype
                ``kv_dtype`` per layer; this step's keys and values are written into them.

        Returns:
            [T, hidden_size] float32 final-normed hidden states.

        Raises:
            ValueError: ``kv_caches`` does not hold one tensor per layer.
        """
        if not self.loaded:
            raise RuntimeError("load_weights must be called before forward")
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"expected {len(self.layers)} KV cache tensors (one per layer), got {len(kv_caches)}")
        if self.embed_int8 is not None:
            x = self.embed_int8.forward(input_ids)  # [T, d]
        else:
            x = F.embedding(input_ids, self.embed_tokens)  # [T, d]
        cfg = self.config
        H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        rope = self.rotary.step(positions, attn_metadata.max_seq_len, H + Hkv, Hkv)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer.forward(x, rope, attn_metadata, kv_cache)
        return self.norm.forward(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, d] (rows of ``forward``'s output) -> [B, vocab_size] float32 logits."""
        return self.lm_head.forward(hidden).float()

    # ------------------------------------------------------------------------------------
    # weights
    # ------------------------------------------------------------------------------------

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named, HF-layout weights in, fuse q/k/v and gate/up, then convert formats.

        Args:
            weights: ``(name, tensor)`` pairs such as ``model.layers.0.self_attn.q_proj.weight``
                ([out, in] layout), ``model.embed_tokens.weight``, ``model.norm.weight``,
                ``lm_head.weight`` (absent when embeddings are tied; ignored if present
                then). Any float dtype; copied as float32.

        Raises:
            ValueError: an unknown name, a wrong shape, or names missing at the end.
            RuntimeError: called twice (weights are already converted).
        """
        if self.loaded:
            raise RuntimeError("load_weights was already called on this model")
        cfg = self.config
        expected = self._expected_names()
        seen: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if name not in expected:
                raise ValueError(f"unexpected weight {name!r} for {type(self).__name__}")
            dst = self._destination(name)
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            seen.add(name)
        missing = sorted(expected - seen)
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise ValueError(f"missing weights: {', '.join(missing[:5])}{more}")
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens  # one tensor while float32
        self._prepare_qkv_rows()
        int_format = self.linear_format in ("int8", "int4", "mixed")
        kernels = NativeKernels.load() if int_format else None
        apply_weight_format(self, self.linear_format, kernels)
        if int_format and cfg.hidden_size % GROUP == 0:
            # the float32 table is the largest tensor of a small model: keep it in int8
            head = self.lm_head if cfg.tie_word_embeddings and isinstance(self.lm_head, Int8Linear) else None
            self.embed_int8 = Int8Embedding(self.embed_tokens, shared=head)
            self.embed_tokens = nn.Parameter(torch.empty(0, cfg.hidden_size), requires_grad=False)
        self.native_kernels = kernels is not None
        bind_attributes(self)
        self.loaded = True

    def _expected_names(self) -> set[str]:
        cfg = self.config
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        if not cfg.tie_word_embeddings:
            names.add("lm_head.weight")
        qkv_bias, o_bias = self._biases(cfg)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj"):
                names.add(p + f"self_attn.{proj}.weight")
                if qkv_bias:
                    names.add(p + f"self_attn.{proj}.bias")
            names.add(p + "self_attn.o_proj.weight")
            if o_bias:
                names.add(p + "self_attn.o_proj.bias")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names.add(p + f"mlp.{proj}.weight")
            names.add(p + "input_layernorm.weight")
            names.add(p + "post_attention_layernorm.weight")
        return names

    def _destination(self, name: str) -> torch.Tensor:
        """The tensor (or row slice of a fused tensor) an HF name is copied into."""
        if name == "model.embed_tokens.weight":
            return self.embed_tokens
        if name == "model.norm.weight":
            return self.norm.weight
        if name == "lm_head.weight":
            return self.lm_head.weight
        m = _LAYER_RE.fullmatch(name)
        assert m is not None  # guaranteed by _expected_names
        layer = self.layers[int(m.group(1))]
        module_path, param = m.group(2).rsplit(".", 1)
        if module_path in _DIRECT:
            return getattr(layer.get_submodule(module_path), param)
        fused_path, part = _FUSED[module_path]
        full = getattr(layer.get_submodule(fused_path), param)
        cfg = self.config
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        inter = cfg.intermediate_size
        rows = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv), "gate": (0, inter), "up": (inter, inter)}[part]
        return full.narrow(0, *rows)

    def _prepare_qkv_rows(self) -> None:
        """Reorder q/k rows (and biases) to the interleaved RoPE layout ``apply_rotary`` uses
        and fold the softmax scale ``1/sqrt(head_dim)`` into the q rows."""
        cfg = self.config
        H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for layer in self.layers:
            proj = layer.self_attn.qkv_proj
            for t in (proj.weight, proj.bias):
                if t is None:
                    continue
                q, k = t.narrow(0, 0, H * D), t.narrow(0, H * D, Hkv * D)
                q.copy_(interleave_rotary_rows(q.clone(), H, D) * layer.self_attn.scale)
                k.copy_(interleave_rotary_rows(k.clone(), Hkv, D))
