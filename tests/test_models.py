"""Model files against HF ``transformers`` on tiny random models (2 layers, hidden 64).

Every test feeds the same token ids to transformers (fp32, eager attention) and to our model
through the paged KV cache, and compares logits at every position.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from openmini.config import ModelConfig
from openmini.loaders.hf_config import model_config_from_hf
from openmini.models.attention import AttentionMetadata, allocate_kv_cache, kv_cache_bytes_per_block
from openmini.models.layers import RMSNorm, apply_rotary, interleave_rotary_rows
from openmini.models.llama import LlamaForCausalLM
from openmini.models.layers import Linear
from openmini.models.quantization import (
    GEMM_MIN_ROWS,
    Int4Linear,
    Int8Linear,
    NativeKernels,
    int4_quantize,
    resolve_dtype_mode,
)
from openmini.models.qwen2 import Qwen2ForCausalLM
from openmini.models.registry import build_model, get_model_class

VOCAB = 500
BLOCK = 4
ATOL = 1e-4


def _tiny_hf(arch: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A seeded tiny HF model with weights large enough that logits are O(1..10)."""
    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.08,
        rms_norm_eps=1e-6,
        attn_implementation="eager",
    )
    kw.update(overrides)
    if arch == "llama":
        kw.setdefault("tie_word_embeddings", False)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        kw.setdefault("tie_word_embeddings", True)
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5)  # Qwen2 q/k/v biases: non-zero
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _ours(hf: transformers.PreTrainedModel, dtype_mode: str = "float32") -> LlamaForCausalLM:
    cfg_dict = hf.config.to_dict()
    cfg_dict["architectures"] = [type(hf).__name__]
    config = model_config_from_hf(cfg_dict)
    model = build_model(config, dtype_mode)
    model.load_weights(hf.state_dict().items())
    return model


def _hf_logits(hf, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()  # [T, V]


def _run_chunks(model, ids: torch.Tensor, chunks: list[int], block_table: list[int], num_blocks: int = 64):
    """Feed ``ids`` in chunks of the given sizes through the paged cache; logits of every token."""
    kv = allocate_kv_cache(model.config, num_blocks, BLOCK, model.kv_dtype)
    out, start = [], 0
    for n in chunks:
        end = start + n
        md = AttentionMetadata.build([n], [end], [block_table], BLOCK)
        hidden = model(ids[start:end], torch.arange(start, end), md, kv)
        out.append(model.compute_logits(hidden))
        start = end
    assert start == len(ids)
    return torch.cat(out)  # [T, V]


def _shuffled_table(n: int, seed: int, num_blocks: int = 64) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_blocks, generator=g)[:n].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def pair(request):
    hf = _tiny_hf(request.param)
    return hf, _ours(hf)


def test_logits_magnitude_is_meaningful(pair):
    hf, _ = pair
    ids = torch.randint(0, VOCAB, (24,), generator=torch.Generator().manual_seed(1))
    # the comparison below is only meaningful if logits are far from zero and differ by token
    assert _hf_logits(hf, ids).std() > 0.5


def test_full_prefill_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(2))
    got = _run_chunks(ours, ids, [37], _shuffled_table(10, 3))
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_chunked_prefill_then_decode_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (37,), generator=torch.Generator().manual_seed(4))
    # chunk boundaries inside blocks, then single-token decode steps
    chunks = [5, 11, 9] + [1] * 12
    got = _run_chunks(ours, ids, chunks, _shuffled_table(10, 5))
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_mixed_batch_matches_transformers(pair):
    """Three sequences in one step: fresh prefill, mid-prompt chunk, decode (odd order)."""
    hf, ours = pair
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (13, 22, 9)]
    refs = [_hf_logits(hf, s) for s in seqs]
    kv = allocate_kv_cache(ours.config, 64, BLOCK, ours.kv_dtype)
    perm = torch.randperm(64, generator=g).tolist()
    tables = [perm[0:4], perm[4:10], perm[10:13]]
    # step 1: prefill the cached prefixes of sequences 1 (15 tokens) and 2 (8 tokens)
    md = AttentionMetadata.build([15, 8], [15, 8], [tables[1], tables[2]], BLOCK)
    ours(torch.cat([seqs[1][:15], seqs[2][:8]]), torch.cat([torch.arange(15), torch.arange(8)]), md, kv)
    # step 2: seq 2 decodes its last token, seq 0 prefills all, seq 1 prefills 15..21
    md = AttentionMetadata.build([1, 13, 7], [9, 13, 22], [tables[2], tables[0], tables[1]], BLOCK)
    ids = torch.cat([seqs[2][8:], seqs[0], seqs[1][15:]])
    pos = torch.cat([torch.tensor([8]), torch.arange(13), torch.arange(15, 22)])
    logits = ours.compute_logits(ours(ids, pos, md, kv))
    torch.testing.assert_close(logits[0], refs[2][8], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1:14], refs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[14:], refs[1][15:], atol=ATOL, rtol=0)


def test_auto_mode_mixed_batch_matches_sequential(int_backend):
    """Fast mode: a mixed step (prefill chunk + decodes) equals running sequences alone."""
    hf = _tiny_hf("qwen2", seed=20, vocab_size=512)
    ours = _ours(hf, "auto")
    g = torch.Generator().manual_seed(21)
    seqs = [torch.randint(0, VOCAB, (n,), generator=g) for n in (12, 9, 20)]
    tables = [[3, 7, 1, 9, 4], [0, 2, 8], [5, 6, 10, 11, 12, 13]]
    alone = []
    for s, t in zip(seqs, tables):  # each sequence by itself: prefill all but the last token, decode it
        kv = allocate_kv_cache(ours.config, 16, BLOCK, ours.kv_dtype)
        n = len(s) - 1
        ours(s[:n], torch.arange(n), AttentionMetadata.build([n], [n], [t], BLOCK), kv)
        md = AttentionMetadata.build([1], [n + 1], [t], BLOCK)
        alone.append(ours.compute_logits(ours(s[n:], torch.tensor([n]), md, kv))[0])
    kv = allocate_kv_cache(ours.config, 16, BLOCK, ours.kv_dtype)
    for s, t in zip(seqs[:2], tables[:2]):
        n = len(s) - 1
        ours(s[:n], torch.arange(n), AttentionMetadata.build([n], [n], [t], BLOCK), kv)
    # one step: two decodes and the whole third prompt
    md = AttentionMetadata.build([1, 1, 20], [12, 9, 20], tables, BLOCK)
    ids = torch.cat([seqs[0][-1:], seqs[1][-1:], seqs[2]])
    pos = torch.cat([torch.tensor([11, 8]), torch.arange(20)])
    hidden = ours(ids, pos, md, kv)
    logits = ours.compute_logits(hidden[[0, 1, 21]])
    # alone, the decodes ran the weight-only kernels; in the 22-row step the float32 GEMM:
    # native kernels keep float-level agreement, torch's quantize activations to bf16
    tol = 2e-3 if int_backend == "native" else 2e-2
    for row, ref in zip(logits, alone):
        torch.testing.assert_close(row, ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_batched_decode_matches_transformers(pair):
    hf, ours = pair
    g = torch.Generator().manual_seed(7)
    lens = [6, 17, 10, 3]
    seqs = [torch.randint(0, VOCAB, (n + 1,), generator=g) for n in lens]
    kv = allocate_kv_cache(ours.config, 64, BLOCK, ours.kv_dtype)
    perm = torch.randperm(64, generator=g).tolist()
    tables = [perm[8 * i : 8 * i + 8] for i in range(len(lens))]
    for s, n, t in zip(seqs, lens, tables):
        ours(s[:n], torch.arange(n), AttentionMetadata.build([n], [n], [t], BLOCK), kv)
    md = AttentionMetadata.build([1] * 4, [n + 1 for n in lens], tables, BLOCK)
    logits = ours.compute_logits(ours(torch.stack([s[-1] for s in seqs]), torch.tensor(lens), md, kv))
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i], _hf_logits(hf, s)[-1], atol=ATOL, rtol=0)


ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 16,
        "beta_slow": 2,
        "mscale": 1.0,
        "mscale_all_dim": 0.5,
    },
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("variant", sorted(ROPE_VARIANTS))
def test_rope_scaling_matches_transformers(arch, variant):
    params = dict(ROPE_VARIANTS[variant], rope_theta=500.0)
    hf = _tiny_hf(arch, seed=8, rope_parameters=params, max_position_embeddings=64)
    ours = _ours(hf)
    assert ours.config.rope_scaling["rope_type"] == params["rope_type"]
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(9))
    got = _run_chunks(ours, ids, [20, 17] + [1] * 11, _shuffled_table(12, 10))
    torch.testing.assert_close(got, _hf_logits(hf, ids), atol=ATOL, rtol=0)


def test_rope_scaling_changes_logits():
    """Guards the test above: the scaled models really differ from plain RoPE."""
    ids = torch.randint(0, VOCAB, (48,), generator=torch.Generator().manual_seed(9))
    plain = _hf_logits(_tiny_hf("llama", seed=8, max_position_embeddings=64, rope_theta=500.0), ids)
    for variant in ROPE_VARIANTS:
        params = dict(ROPE_VARIANTS[variant], rope_theta=500.0)
        scaled = _hf_logits(_tiny_hf("llama", seed=8, rope_parameters=params, max_position_embeddings=64), ids)
        assert (scaled - plain).abs().max() > 1e-2, variant


def test_dynamic_ntk_matches_transformers_token_by_token():
    """Dynamic NTK: HF recomputes the base from the longest position of each forward call.

    Token-by-token decoding past ``max_position_embeddings`` in HF must equal our
    per-position table, whatever chunking we use.
    """
    params = {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 500.0}
    hf = _tiny_hf("llama", seed=11, rope_parameters=params, max_position_embeddings=16)
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(12))
    ref = []
    with torch.no_grad():
        cache = transformers.DynamicCache(config=hf.config)
        out = hf(ids[None, :12], cache=cache, use_cache=True)
        ref.append(out.logits[0])
        for t in range(12, 30):
            out = hf(ids[None, t : t + 1], cache=cache, use_cache=True)
            ref.append(out.logits[0])
    ref = torch.cat(ref)
    ours = _ours(hf)
    for chunks in ([12] + [1] * 18, [30]):
        got = _run_chunks(ours, ids, chunks, _shuffled_table(8, 13))
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    # and the scaling is active past the window
    plain = _ours(_tiny_hf("llama", seed=11, max_position_embeddings=16, rope_theta=500.0))
    assert (_run_chunks(plain, ids, [30], _shuffled_table(8, 13))[20:] - ref[20:]).abs().max() > 1e-3


@pytest.fixture(params=["native", "torch"])
def int_backend(request, monkeypatch):
    """Runs a test with the native AVX2 kernels, then with the torch kernels."""
    if request.param == "torch":
        monkeypatch.setenv("OPENMINI_NATIVE_KERNELS", "0")
    elif NativeKernels.load() is None:
        pytest.skip("native kernels unavailable (no AVX2/FMA or no C compiler)")
    return request.param


@pytest.mark.parametrize("mode", ["auto", "bfloat16", "int8", "mixed"])
def test_reduced_precision_modes_agree_on_argmax(pair, mode, int_backend):
    hf, _ = pair
    ids = torch.randint(0, VOCAB, (64,), generator=torch.Generator().manual_seed(14))
    ref = _hf_logits(hf, ids)
    ours = _ours(hf, mode)
    assert ours.kv_dtype == resolve_dtype_mode(mode)[1]
    assert ours.native_kernels == (int_backend == "native" and ours.linear_format != "bfloat16")
    # 40-token prefill (dequantized GEMM path) then decode steps (weight-only kernels)
    got = _run_chunks(ours, ids, [40] + [1] * 24, _shuffled_table(16, 15))
    assert got.dtype == torch.float32
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"{mode} ({ours.linear_format}, {int_backend}) top-1 agreement with transformers fp32: {agree:.3f}")
    assert agree >= 0.85
    assert (got - ref).abs().max() < 0.25 * ref.abs().max()


@pytest.mark.parametrize("mode", ["int4", "mixed"])
def test_int4_is_exact_for_weights_on_a_4bit_grid(mode, int_backend):
    """Weights already on a group-32 4-bit grid (as in Q4_1 GGUF) stay exact in int4."""
    hf = _tiny_hf("llama", seed=16, vocab_size=512)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(int4_quantize(p, bf16_scales=True)[3])
    ours = _ours(hf, mode)
    layer = ours.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, Int4Linear) and isinstance(layer.mlp.down_proj, Int4Linear)
    # a random float head is not on a 4-bit grid: "mixed" keeps it int8
    assert isinstance(ours.lm_head, Int4Linear if mode == "int4" else Int8Linear)
    torch.testing.assert_close(layer.mlp.down_proj.dequantized(), hf.model.layers[0].mlp.down_proj.weight)
    # the float32 embedding table is replaced by an int8 one
    assert ours.embed_int8 is not None and ours.embed_tokens.numel() == 0
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(17))
    ref = _hf_logits(hf, ids)
    # 34-token prefill: dequantized float32 GEMM; then decode steps: weight-only kernels
    got = _run_chunks(ours, ids, [34] + [1] * 6, _shuffled_table(10, 18))
    if mode == "mixed":  # exact weights: only the int8 head differs from float32
        torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.85 and (got - ref).abs().max() < 0.15 * ref.abs().max()


def test_native_kernels_match_float_matmul():
    """The AVX2 kernels against x @ dequantized.T for batch sizes around the register blocking."""
    kernels = NativeKernels.load()
    if kernels is None:
        pytest.skip("native kernels unavailable")
    g = torch.Generator().manual_seed(19)
    lin = Linear(96, 48, bias=True)
    lin.weight.copy_(torch.randn(48, 96, generator=g))
    lin.bias.copy_(torch.randn(48, generator=g))
    for cls in (Int4Linear, Int8Linear):
        layer = cls(lin, kernels)
        w = layer.dequantized()
        for M in (1, 3, 4, 7, GEMM_MIN_ROWS, GEMM_MIN_ROWS + 1):
            x = torch.randn(M, 96, generator=g) * 3
            ref = x @ w.t() + lin.bias
            # activations are quantized to int16 per group of 32: ~2e-5 relative error
            assert (layer.forward(x) - ref).norm() < 1e-4 * ref.norm()
            res = torch.randn(M, 48, generator=g)
            assert (layer.forward_add(x, res.clone()) - (res + ref)).norm() < 1e-4 * ref.norm()
        # quantization error of the weights themselves: int8 per group of 32 within 1/254 of the group max
        err = (w - lin.weight).abs().view(48, 3, 32).amax(-1)
        bound = lin.weight.abs().view(48, 3, 32).amax(-1) / (254 if cls is Int8Linear else 15)
        assert (err <= bound * 1.01 + 1e-6).all()


def test_float32_mode_uses_float32_cache(pair):
    _, ours = pair
    assert ours.kv_dtype == torch.float32 and ours.linear_format == "float32"


# ----------------------------------------------------------------------------------------
# weights, registry, building blocks
# ----------------------------------------------------------------------------------------


def test_load_weights_errors():
    hf = _tiny_hf("llama")
    state = dict(hf.state_dict())
    config = _ours(hf).config
    with pytest.raises(ValueError, match="unexpected weight 'model.layers.0.mlp.extra.weight'"):
        extra = ("model.layers.0.mlp.extra.weight", torch.zeros(1))
        LlamaForCausalLM(config, "float32").load_weights([*state.items(), extra])
    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match="missing weights: model.layers.1.mlp.up_proj.weight"):
        LlamaForCausalLM(config, "float32").load_weights(missing.items())
    bad = dict(state, **{"model.norm.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        LlamaForCausalLM(config, "float32").load_weights(bad.items())
    with pytest.raises(ValueError, match="missing weights: lm_head.weight"):
        no_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
        LlamaForCausalLM(config, "float32").load_weights(no_head.items())


def test_qwen2_requires_qkv_bias_and_ties_embeddings(int_backend):
    hf = _tiny_hf("qwen2", vocab_size=512)
    ours = _ours(hf)
    torch.testing.assert_close(ours.lm_head.weight, hf.model.embed_tokens.weight)
    assert ours.lm_head.weight is ours.embed_tokens  # tied: one tensor
    quantized = _ours(hf, "int8")
    if int_backend == "native":  # tied int8 head and table share their data
        assert quantized.embed_int8.weight is quantized.lm_head.weight
    no_bias = {k: v for k, v in hf.state_dict().items() if not k.endswith("k_proj.bias")}
    with pytest.raises(ValueError, match="missing weights: model.layers.0.self_attn.k_proj.bias"):
        Qwen2ForCausalLM(ours.config, "float32").load_weights(no_bias.items())


def test_registry():
    assert get_model_class("llama") is LlamaForCausalLM
    assert get_model_class("qwen2") is Qwen2ForCausalLM
    with pytest.raises(ValueError, match="unsupported model architecture 'mamba'.*llama"):
        get_model_class("mamba")
    config = _ours(_tiny_hf("llama")).config
    with pytest.raises(ValueError, match="dtype_mode"):
        build_model(config, "float16")
    with pytest.raises(ValueError, match="rope_scaling type 'longrope'"):
        build_model(config.replace(rope_scaling={"rope_type": "longrope", "factor": 2.0}), "float32")


def test_rmsnorm_matches_hf_formula():
    x = torch.randn(7, 64) * 3
    norm = RMSNorm(64, 1e-5)
    norm.weight.data.uniform_(0.5, 1.5)
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    torch.testing.assert_close(norm(x), ref, atol=1e-6, rtol=1e-6)


def test_interleaved_rotary_equals_rotate_half():
    """Rotating permuted rows == permuting HF-rotated rows (so q.k is unchanged)."""
    T, H, D = 5, 3, 8
    x = torch.randn(T, H * D)
    angles = torch.rand(T, D // 2) * 6
    cos, sin = torch.cat([angles.cos()] * 2, -1)[:, None], torch.cat([angles.sin()] * 2, -1)[:, None]
    xh = x.view(T, H, D)
    hf = xh * cos + torch.cat([-xh[..., D // 2 :], xh[..., : D // 2]], -1) * sin  # [T, H, D]
    perm = interleave_rotary_rows(torch.arange(H * D), H, D)
    ours = apply_rotary(x[:, perm].view(T, H, D), torch.polar(torch.ones_like(angles), angles)[:, None])
    torch.testing.assert_close(ours.reshape(T, H * D), hf.reshape(T, H * D)[:, perm])


def test_kv_cache_helpers():
    config = ModelConfig("llama", 10, 64, 128, 3, 4, 2, 16)
    caches = allocate_kv_cache(config, 5, 8, torch.bfloat16)
    assert len(caches) == 3 and caches[0].shape == (2, 5, 8, 2, 16) and caches[0].dtype == torch.bfloat16
    assert kv_cache_bytes_per_block(config, 8, torch.bfloat16) == sum(c[:, 0].nbytes for c in caches)
    with pytest.raises(ValueError):
        allocate_kv_cache(config, 0, 8, torch.float32)


@pytest.mark.real_model
def test_smollm2_auto_mode_matches_float32_top1(smollm2_gguf, int_backend):
    """Real model: the fast mode keeps the float32 model's top-1 (prefill, then decode)."""
    from openmini.loaders.gguf_loader import gguf_model_config, iter_gguf_weights

    config = gguf_model_config(smollm2_gguf)
    weights = list(iter_gguf_weights(smollm2_gguf))
    ids = torch.randint(0, config.vocab_size, (96,), generator=torch.Generator().manual_seed(0))
    logits = {}
    for mode in ("float32", "auto"):
        model = build_model(config, mode)
        model.load_weights(iter(weights))
        logits[mode] = _run_chunks(model, ids, [64] + [1] * 32, list(range(24)), num_blocks=24)
    agree = (logits["auto"].argmax(-1) == logits["float32"].argmax(-1)).float().mean().item()
    print(f"SmolLM2 auto ({int_backend}) vs float32 top-1 agreement: {agree:.3f}")
    # native: Q4_1 layers are exact in int4, the Q8_0 table exact in int8, activations int16
    assert agree >= (0.99 if int_backend == "native" else 0.9)
