"""Shared transformer blocks: RMSNorm, rotary embedding, linear, gated MLP, attention, decoder.

Every architecture file (``llama.py``, ``qwen2.py``) is assembled from these blocks.
Numerics follow HF ``transformers`` (``modeling_llama.py``) so that fp32 logits match it.

Speed notes (CPU; at 135M parameters the per-op Python overhead matters):
- q/k/v are one matmul (``qkv_proj``) and gate/up are one matmul (``gate_up_proj``); the
  residual add is fused into the output matmuls (``forward_add``).
- The q/k rows are permuted once at load time from HF's rotate-half layout to interleaved
  pairs, so RoPE is one complex multiplication (``interleave_rotary_rows``); scores are
  unchanged because q and k get the same permutation, so the KV cache holds keys in the
  interleaved layout. The softmax scale is folded into the q rows.
- RoPE rotations are indexed once per step (``RotaryEmbedding.step``), not per layer.
- ``quantization.apply_weight_format`` swaps the ``Linear`` modules and hands the native
  kernels to ``RMSNorm``, ``GatedMLP`` and ``Attention`` (their ``kernels`` attribute); a
  decode step then runs RoPE + KV write + attention in one native call.
- Hot paths call submodules through ``.forward`` and ``bind_attributes`` makes submodule
  lookups plain attribute reads (``nn.Module.__call__``/``__getattr__`` cost microseconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from openmini.config import ModelConfig
from openmini.models.attention import AttentionMetadata, RowSplit, paged_attention


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019, arXiv:1910.07467), HF formula.

    ``y = weight * x / sqrt(mean(x**2, -1) + eps)``, computed in float32.

    Args:
        hidden_size: width d of the normalized (last) dimension.
        eps: added to the mean square before the square root.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)  # [d]
        self._shape = (hidden_size,)
        self.kernels = None  # native kernels, set by quantization.apply_weight_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, d] float32 -> [T, d] float32."""
        if self.kernels is not None and x.is_contiguous():
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self._shape, self.weight, self.eps)


# ----------------------------------------------------------------------------------------
# Rotary position embedding
# ----------------------------------------------------------------------------------------


def _rope_type(rope_scaling: dict | None) -> str:
    if not rope_scaling:
        return "default"
    return str(rope_scaling.get("rope_type", rope_scaling.get("type", "default")))


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor of RoPE for a position-independent rope type.

    Matches ``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` (float32 arithmetic):

    - ``default``: ``inv_freq[i] = 1 / theta**(2i/dim)`` (Su et al. 2021, RoFormer,
      arXiv:2104.09864).
    - ``linear``: position interpolation, ``inv_freq / factor`` (Chen et al. 2023,
      arXiv:2306.15595; kaiokendev's SuperHOT).
    - ``llama3``: wavelength-dependent smooth interpolation between ``inv_freq`` and
      ``inv_freq / factor`` with ``low_freq_factor`` / ``high_freq_factor`` /
      ``original_max_position_embeddings`` (Meta Llama 3.1 reference code, ``apply_scaling``).
    - ``yarn``: NTK-by-parts ramp between interpolation and extrapolation over the dims whose
      rotation count lies in ``[beta_slow, beta_fast]``, and attention factor
      ``0.1 * ln(factor) + 1`` (or from ``mscale``/``mscale_all_dim``) applied to cos and sin
      (Peng et al. 2023, YaRN, arXiv:2309.00071, sections 3.2-3.4).

    ``dynamic`` (NTK-aware, position dependent) is handled by ``RotaryEmbedding``; this
    function returns its unscaled base frequencies.

    Args:
        config: model config; reads ``head_dim``, ``rope_theta``, ``rope_scaling``,
            ``max_position_embeddings``.

    Returns:
        ``(inv_freq [head_dim // 2] float32, attention_factor)``.

    Raises:
        ValueError: unknown ``rope_type`` or missing required keys.
    """
    rs = dict(config.rope_scaling or {})
    rope_type = _rope_type(config.rope_scaling)
    base = float(config.rope_theta)
    dim = config.head_dim
    exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # [dim/2]
    inv_freq = 1.0 / (base**exps)  # [dim/2]
    try:
        if rope_type in ("default", "dynamic"):
            return inv_freq, 1.0
        if rope_type == "linear":
            return inv_freq / float(rs["factor"]), 1.0
        if rope_type == "llama3":
            return _llama3_inv_freq(inv_freq, rs, config), 1.0
        if rope_type == "yarn":
            return _yarn_inv_freq(base, dim, rs, config)
    except KeyError as exc:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks key {exc.args[0]!r}") from exc
    raise ValueError(
        f"unsupported rope_scaling type {rope_type!r} (supported: default, linear, dynamic, llama3, yarn)"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, rs: dict, config: ModelConfig) -> torch.Tensor:
    factor = float(rs["factor"])
    low_freq_factor = float(rs["low_freq_factor"])
    high_freq_factor = float(rs["high_freq_factor"])
    old_context_len = float(rs.get("original_max_position_embeddings", config.max_position_embeddings))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # [dim/2]
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(base: float, dim: int, rs: dict, config: ModelConfig) -> tuple[torch.Tensor, float]:
    original_max = rs.get("original_max_position_embeddings", config.max_position_embeddings)
    factor = rs.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_max
    factor = float(factor)

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rs.get("attention_factor")
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rs.get("beta_fast") or 32
    beta_slow = rs.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        # dimension index whose wavelength makes `num_rotations` turns over original_max tokens
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(torch.float32) / dim)  # [dim/2]
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    extra_factor = 1 - ramp  # 1: keep original frequency, 0: interpolate
    inv_freq = interpolation * (1 - extra_factor) + extrapolation * extra_factor
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    """RoPE table as complex rotations ``freqs_cis[p, i] = a * exp(1j * p * inv_freq[i])``.

    ``a`` is the attention factor (1 except for YaRN). The table covers
    ``max_position_embeddings`` positions and grows (doubling) when a longer position is
    requested.

    ``dynamic`` (NTK-aware scaling, /u/bloc97 and /u/emozilla, as in HF
    ``_compute_dynamic_ntk_parameters``): position ``p`` uses the base recomputed for
    ``seq_len = max(p + 1, max_position_embeddings)``,
    ``base * (factor * seq_len / max_pos - (factor - 1)) ** (dim / (dim - 2))``. This equals
    HF for prompts within the native window and for token-by-token decoding past it, and,
    unlike HF's whole-batch recomputation, does not depend on how a prompt is chunked (so
    cached keys stay valid).

    Args:
        config: model config (``head_dim``, ``rope_theta``, ``rope_scaling``,
            ``max_position_embeddings``).

    Raises:
        ValueError: unsupported rope type.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = _rope_type(config.rope_scaling)
        self.inv_freq, self.attention_factor = rope_inv_freq(config)  # [dim/2], float
        self.freqs_cis = self._table(0, config.max_position_embeddings)  # [P, dim/2] complex64

    def _table(self, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, dtype=torch.int64)  # [P]
        inv_freq = self.inv_freq[None, :]  # [1, dim/2]
        max_pos = self.config.max_position_embeddings
        if self.rope_type == "dynamic" and end > max_pos:
            dim = self.config.head_dim
            factor = float(self.config.rope_scaling["factor"])
            seq_len = torch.clamp(pos + 1, min=max_pos)[:, None]  # [P, 1] int64
            base = self.config.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            exps = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim  # [dim/2]
            inv_freq = 1.0 / (base**exps)  # [P, dim/2]
        freqs = pos[:, None].float() * inv_freq  # [P, dim/2]
        a = self.attention_factor
        return torch.complex(freqs.cos() * a, freqs.sin() * a)  # [P, dim/2]

    def forward(self, positions: torch.Tensor, max_position: int) -> torch.Tensor:
        """Rotations for ``positions``.

        Args:
            positions: [T] int64 token positions.
            max_position: an upper bound (exclusive) of ``positions``, used to grow the
                table without reading the tensor.

        Returns:
            [T, head_dim // 2] complex64.
        """
        size = self.freqs_cis.shape[0]
        if max_position > size:
            new_size = max(max_position, 2 * size)
            self.freqs_cis = torch.cat([self.freqs_cis, self._table(size, new_size)])
        return self.freqs_cis[positions]

    def step(self, positions: torch.Tensor, max_position: int, rotated_heads: int, plain_heads: int) -> "RopeStep":
        """Rotations of one step's positions in both forms the attention paths use.

        ``qkv``: per head of a fused q/k/v tensor, ``rotated_heads`` heads rotated by the
        position's angles, then ``plain_heads`` heads by exactly 1 (the values):
        [T, rotated_heads + plain_heads, head_dim // 2] complex64. ``pairs``: (cos, sin) per
        position, [T, head_dim // 2, 2] float32 (for the native decode kernel).
        """
        f = self(positions, max_position)  # [T, D/2]
        T, half = f.shape
        ones = torch.ones(T, plain_heads, half, dtype=f.dtype)
        qkv = torch.cat([f[:, None, :].expand(T, rotated_heads, half), ones], dim=1)
        return RopeStep(qkv=qkv, pairs=torch.view_as_real(f))


@dataclass
class RopeStep:
    """RoPE rotations of one step (see ``RotaryEmbedding.step``)."""

    qkv: torch.Tensor  # [T, H + 2 Hkv, D/2] complex64
    pairs: torch.Tensor  # [T, D/2, 2] float32 (cos, sin)


def apply_rotary(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs ``(x[2i], x[2i+1])`` of every head by ``freqs_cis``.

    Equivalent to HF's rotate-half ``x * cos + rotate_half(x) * sin`` on rows permuted by
    ``interleave_rotary_rows``. A rotation of exactly 1 leaves a head unchanged (bit-exact),
    which lets the values ride along with queries and keys in one multiplication.

    Args:
        x: [T, H, D] float32 (unit last stride, other strides even).
        freqs_cis: [T, H or 1, D // 2] complex64.

    Returns:
        [T, H, D] float32, a new contiguous tensor.
    """
    T, H, D = x.shape
    xc = torch.view_as_complex(x.unflatten(-1, (D // 2, 2)))  # [T, H, D/2] complex
    return torch.view_as_real(xc * freqs_cis).view(T, H, D)


def interleave_rotary_rows(w: torch.Tensor, num_heads: int, head_dim: int) -> torch.Tensor:
    """Permute q/k projection rows from HF's half-split RoPE layout to interleaved pairs.

    Within each head, output row ``2i`` takes HF row ``i`` and row ``2i + 1`` takes HF row
    ``i + head_dim/2`` (the two coordinates HF's ``rotate_half`` rotates together).

    Args:
        w: [num_heads * head_dim, ...] weight or [num_heads * head_dim] bias.

    Returns:
        Tensor of the same shape, rows permuted.
    """
    rest = w.shape[1:]
    w = w.reshape(num_heads, 2, head_dim // 2, *rest)  # [H, 2, D/2, ...]
    return w.transpose(1, 2).reshape(num_heads * head_dim, *rest)


# ----------------------------------------------------------------------------------------
# Linear layers, MLP, attention, decoder layer
# ----------------------------------------------------------------------------------------


class Linear(nn.Module):
    """``y = x @ weight.T (+ bias)`` in float32, weight [out_features, in_features] (HF layout).

    ``openmini.models.quantization`` replaces these modules after loading by bfloat16 / int8 /
    int4 versions with the same two methods. Those return bfloat16 from ``forward`` when
    they have no bias, so callers accept either float dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        """x: [T, in] -> [T, out] float32. ``rows`` (decode vs prefill rows) is used by the
        quantized versions only."""
        return F.linear(x.float(), self.weight, self.bias)

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        """``residual + self(x)`` as one fused ``addmm``. Shapes: [T, in], [T, out] float32."""
        if self.bias is not None:
            return torch.addmm(residual + self.bias, x.float(), self.weight.t())
        return torch.addmm(residual, x.float(), self.weight.t())


class GatedMLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))`` (Shazeer 2020, arXiv:2002.05202).

    ``gate_up_proj`` holds HF's ``gate_proj`` rows then ``up_proj`` rows: [2 * inter, d].
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.kernels = None  # native kernels, set by quantization.apply_weight_format

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor, rows: RowSplit | None = None) -> torch.Tensor:
        """x: [T, d] (normed), residual: [T, d] float32 -> residual + mlp(x): [T, d] float32."""
        gate_up = self.gate_up_proj.forward(x, rows)  # [T, 2I]
        if self.kernels is not None and gate_up.dtype == torch.float32 and gate_up.is_contiguous():
            h = self.kernels.silu_mul(gate_up, self.intermediate_size)  # [T, I]
        else:
            gate, up = gate_up.split(self.intermediate_size, dim=-1)  # [T, I] each
            h = F.silu(gate).mul_(up)
        return self.down_proj.forward_add(h, residual, rows)


class Attention(nn.Module):
    """Multi-head self-attention with grouped-query heads, RoPE and a paged KV cache.

    ``qkv_proj`` rows: q (num_heads * head_dim), k (num_kv_heads * head_dim), v
    (num_kv_heads * head_dim). After loading, the q and k rows are in the interleaved RoPE
    layout and the q rows (and bias) are pre-multiplied by the softmax scale
    ``1/sqrt(head_dim)`` (Vaswani et al. 2017), so attention runs with scale 1
    (GQA: Ainslie et al. 2023, arXiv:2305.13245).

    Args:
        config: model config.
        qkv_bias: q/k/v projections have a bias (Qwen2; Llama with ``attention_bias``).
        o_bias: output projection has a bias (Llama with ``attention_bias``).
    """

    def __init__(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.kernels = None  # native kernels, set by quantization.apply_weight_format

    def forward_add(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        rope: RopeStep,
        attn_metadata: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Attention output added to the residual stream.

        Args:
            x: [T, d] normed hidden states.
            residual: [T, d] float32 residual stream.
            rope: this step's RoPE rotations (``RotaryEmbedding.step``).
            attn_metadata: batch layout (see ``AttentionMetadata``).
            kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim] of this layer;
                this step's keys and values are written into it.

        Returns:
            [T, d] float32.
        """
        T = x.shape[0]
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        md = attn_metadata
        rows = md.row_split
        qkv = self.qkv_proj.forward(x, rows).float()  # [T, (H + 2Hkv) * D]
        kernels = self.kernels
        native = kernels is not None and kernels.supports_decode(qkv, kv_cache)
        if native and md.decode_only:
            # RoPE + cache write + paged attention in one call
            out = kernels.paged_decode(qkv, rope.pairs, kv_cache, md.slot_mapping, md.block_tables, md.seq_lens, H, 1.0)
        else:
            split = native and md.decode_seq_index is not None  # decode rows: same kernel as alone
            rotated = apply_rotary(qkv.view(T, H + 2 * Hkv, D), rope.qkv)  # q, k rotated; v unchanged
            kv = rotated[:, H:].view(T, 2, Hkv, D)  # [T, 2, Hkv, D]
            out = paged_attention(rotated[:, :H], kv, kv_cache, md, 1.0, include_decode=not split)  # [T, H, D]
            if split:
                dec, seqs = md.decode_token_index, md.decode_seq_index
                out[dec] = kernels.paged_decode(
                    qkv.index_select(0, dec), rope.pairs.index_select(0, dec), kv_cache,
                    md.slot_mapping.index_select(0, dec), md.block_tables.index_select(0, seqs),
                    md.seq_lens.index_select(0, seqs), H, 1.0)  # rewrites the decode rows' K/V too
        return self.o_proj.forward_add(out.view(T, self.q_size), residual, rows)


class DecoderLayer(nn.Module):
    """Pre-norm decoder block: ``x += attn(norm(x)); x += mlp(norm(x))`` (HF Llama/Qwen2)."""

    def __init__(self, config: ModelConfig, qkv_bias: bool, o_bias: bool) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, qkv_bias, o_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        rope: RopeStep,
        attn_metadata: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x: [T, d] residual stream -> [T, d] residual stream after this layer."""
        # submodules are called through .forward: nn.Module.__call__ costs microseconds per call
        x = self.self_attn.forward_add(self.input_layernorm.forward(x), x, rope, attn_metadata, kv_cache)
        return self.mlp.forward_add(self.post_attention_layernorm.forward(x), x, attn_metadata.row_split)


def bind_attributes(model: nn.Module) -> None:
    """Copy every submodule and parameter reference into its owner's instance ``__dict__``.

    ``nn.Module`` resolves submodules and parameters through ``__getattr__`` (about a
    microsecond each; a decode step does hundreds); a plain instance attribute is found
    first. Reassigning a submodule or parameter through ``setattr`` drops the copy again
    (``nn.Module.__setattr__`` removes the name from ``__dict__``), so this stays correct.
    Buffers are not copied (``Module._apply`` replaces them behind ``__setattr__``'s back).
    """
    for module in model.modules():
        for name, child in module._modules.items():
            if child is not None:
                module.__dict__[name] = child
        for name, param in module._parameters.items():
            if param is not None:
                module.__dict__[name] = param

