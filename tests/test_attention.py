"""Paged attention against plain per-sequence causal SDPA over contiguous K/V.

Random mixed batches: several sequences with shuffled, non-contiguous block tables, fresh
prefills, prefill chunks that start mid-context after a cached prefix, and decodes, in
random batch order. The reference sees each sequence's whole K/V as one contiguous tensor.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from openmini.models.attention import AttentionMetadata, paged_attention
from openmini.models.layers import apply_rotary
from openmini.models.quantization import NativeKernels

H, HKV, D = 6, 2, 16


def _reference(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, scale: float) -> torch.Tensor:
    """q [q_len, H, D] at the last q_len positions of k_all/v_all [S, Hkv, D] -> [q_len, H, D]."""
    q_len, S = q.shape[0], k_all.shape[0]
    k = k_all.repeat_interleave(H // HKV, dim=1).transpose(0, 1)  # [H, S, D]
    v = v_all.repeat_interleave(H // HKV, dim=1).transpose(0, 1)
    mask = torch.ones(q_len, S, dtype=torch.bool).tril(S - q_len)  # bottom-right causal
    return F.scaled_dot_product_attention(q.transpose(0, 1), k, v, attn_mask=mask, scale=scale).transpose(0, 1)


def _run_case(seed: int, kinds: list[str], block_size: int, cache_dtype: torch.dtype):
    """Build a batch of sequences of the given kinds and run ``paged_attention`` on it.

    Returns (ours [T, H, D], reference [T, H, D], cache, metadata, q, new k, new v).
    """
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    num_blocks = (sum(701 if k == "long_decode" else 72 for k in kinds) + 16) // block_size + 16
    free = list(range(num_blocks))
    rng.shuffle(free)
    cache = torch.randn(2, num_blocks, block_size, HKV, D, generator=g).to(cache_dtype)  # garbage
    seqs = []
    for kind in kinds:
        if kind == "prefill":
            cached, q_len = 0, rng.randint(2, 30)
        elif kind == "chunk":
            cached, q_len = rng.randint(1, 40), rng.randint(2, 20)
        elif kind == "long_decode":  # long enough for the native kernel to split the context
            cached, q_len = rng.randint(300, 700), 1
        else:  # decode
            cached, q_len = rng.randint(0, 50), 1
        S = cached + q_len
        n_blocks = -(-S // block_size) + rng.randint(0, 2)  # tables may hold spare blocks
        table = [free.pop() for _ in range(n_blocks)]
        k_all = torch.randn(S, HKV, D, generator=g)
        v_all = torch.randn(S, HKV, D, generator=g)
        # earlier steps wrote the cached prefix
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(cached)])
        cache.view(2, -1, HKV, D)[:, slots.long()] = torch.stack([k_all[:cached], v_all[:cached]]).to(cache_dtype)
        q = torch.randn(q_len, H, D, generator=g)
        seqs.append((q, k_all, v_all, S, table))
    md = AttentionMetadata.build(
        [s[0].shape[0] for s in seqs], [s[3] for s in seqs], [s[4] for s in seqs], block_size
    )
    q = torch.cat([s[0] for s in seqs])
    k_new = torch.cat([s[1][-s[0].shape[0] :] for s in seqs])
    v_new = torch.cat([s[2][-s[0].shape[0] :] for s in seqs])
    scale = D**-0.5
    out = paged_attention(q, torch.stack([k_new, v_new], dim=1), cache, md, scale)
    ref = []
    for q_s, k_all, v_all, _, _ in seqs:
        if cache_dtype != torch.float32:  # the reference sees what the cache holds
            k_all, v_all = k_all.to(cache_dtype).float(), v_all.to(cache_dtype).float()
        ref.append(_reference(q_s, k_all, v_all, scale))
    return out, torch.cat(ref), cache, md, q, k_new, v_new


KIND_MIXES = [
    ["decode"],
    ["prefill"],
    ["chunk"],
    ["decode"] * 5,
    ["prefill", "decode", "chunk"],
    ["decode", "chunk", "decode", "prefill", "decode", "chunk"],
    ["chunk", "chunk", "decode", "decode"],
]


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("mix", range(len(KIND_MIXES)))
def test_paged_attention_matches_sdpa(mix, block_size):
    for seed in range(3):
        kinds = list(KIND_MIXES[mix])
        random.Random(100 + seed).shuffle(kinds)
        out, ref, cache, md, _, k_new, v_new = _run_case(seed * 31 + mix, kinds, block_size, torch.float32)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        # the new keys/values landed at their slots
        flat = cache.view(2, -1, HKV, D)
        torch.testing.assert_close(flat[0, md.slot_mapping], k_new, atol=0, rtol=0)
        torch.testing.assert_close(flat[1, md.slot_mapping], v_new, atol=0, rtol=0)


def test_paged_attention_bfloat16_cache():
    kinds = ["decode", "chunk", "prefill", "decode", "decode"]
    out, ref, *_ = _run_case(7, kinds, 4, torch.bfloat16)
    assert out.dtype == torch.float32
    # fresh prefills use the float32 keys of this step; everything else reads bf16
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)


def test_metadata_layout():
    md = AttentionMetadata.build([3, 1, 2], [5, 7, 2], [[9, 4], [1, 8], [6]], 4)
    # seq 0: positions 2,3,4 -> blocks 9,9,4; seq 1: position 6 -> block 8; seq 2: 0,1 -> block 6
    assert md.slot_mapping.tolist() == [38, 39, 16, 34, 24, 25]
    assert md.query_start_loc_list == [0, 3, 4, 6] and md.query_start_loc.tolist() == [0, 3, 4, 6]
    assert md.block_tables.tolist() == [[9, 4], [1, 8], [6, 0]]
    assert not md.decode_only and md.num_decodes == 1 and md.max_seq_len == 7
    assert [(p.token_start, p.token_end, p.seq_len) for p in md.prefills] == [(0, 3, 5), (4, 6, 2)]
    assert md.prefills[1].block_index is None and md.prefills[1].mask is None  # fresh prefill
    assert md.prefills[0].mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert AttentionMetadata.build([1, 1], [3, 9], [[2], [5, 6, 7]], 4).decode_only


@pytest.mark.parametrize(
    "args, match",
    [
        (([2], [1], [[0]], 4), "query_len <= seq_len"),
        (([0], [3], [[0]], 4), "query_len <= seq_len"),
        (([1], [9], [[0, 1]], 4), "block table of 2 blocks cannot hold 9 tokens"),
        (([1, 1], [3], [[0]], 4), "one entry per sequence"),
    ],
)
def test_metadata_rejects_bad_layouts(args, match):
    with pytest.raises(ValueError, match=match):
        AttentionMetadata.build(*args)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_seqs", [1, 2, 7])
def test_native_paged_decode_matches_sdpa(num_seqs, block_size, cache_dtype):
    """The fused AVX2 RoPE + cache write + decode kernel against RoPE + SDPA in torch."""
    kernels = NativeKernels.load()
    if kernels is None:
        pytest.skip("native kernels unavailable (no AVX2/FMA or no C compiler)")
    exact = cache_dtype == torch.float32
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        # reference run: keys/values and queries as they are after RoPE
        _, ref, cache, md, q_rot, k_rot, v_new = _run_case(seed, ["decode"] * num_seqs, block_size, cache_dtype)
        assert md.decode_only
        # undo what the reference step wrote, then let the kernel rotate and write
        flat = cache.view(2, -1, HKV, D)
        flat[:, md.slot_mapping] = 0.0
        angles = torch.rand(num_seqs, D // 2, generator=g) * 6
        rot = torch.polar(torch.ones_like(angles), angles)  # [B, D/2]
        # inputs before RoPE: rotate back by the conjugate
        q_raw = apply_rotary(q_rot, rot.conj()[:, None])
        k_raw = apply_rotary(k_rot, rot.conj()[:, None])
        qkv = torch.cat([q_raw.flatten(1), k_raw.flatten(1), v_new.flatten(1), torch.zeros(num_seqs, 5)], dim=1)
        qkv = qkv[:, :-5]  # strided rows, as slices of a wider projection
        out = kernels.paged_decode(
            qkv, torch.view_as_real(rot).contiguous(), cache, md.slot_mapping, md.block_tables, md.seq_lens, H, D**-0.5
        )
        # bf16: the kernel rounds its own rotation of k, which may differ by one bf16 step
        tol = 1e-5 if exact else 1e-2
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(flat[0, md.slot_mapping].float(), k_rot, atol=1e-6 if exact else 1e-2, rtol=tol)
        torch.testing.assert_close(flat[1, md.slot_mapping], v_new.to(cache_dtype), atol=0, rtol=0)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", [["long_decode"], ["long_decode", "decode", "long_decode"]])
def test_native_paged_decode_long_context(kinds, cache_dtype):
    """Contexts of hundreds of tokens: the kernel splits them across threads and merges."""
    kernels = NativeKernels.load()
    if kernels is None:
        pytest.skip("native kernels unavailable (no AVX2/FMA or no C compiler)")
    _, ref, cache, md, q, k, v = _run_case(3, kinds, 16, cache_dtype)
    flat = cache.view(2, -1, HKV, D)
    flat[:, md.slot_mapping] = 0
    identity = torch.zeros(len(kinds), D // 2, 2)
    identity[..., 0] = 1.0  # cos 1, sin 0: no rotation
    qkv = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1)
    out = kernels.paged_decode(qkv, identity, cache, md.slot_mapping, md.block_tables, md.seq_lens, H, D**-0.5)
    tol = 1e-5 if cache_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
