"""Paged KV cache and causal attention over it, in plain torch (the CPU reference backend).

Terms follow vLLM: the KV cache of a layer is ``[2, num_blocks, block_size, num_kv_heads,
head_dim]`` (K then V); token ``p`` of a sequence lives in block ``block_table[p //
block_size]`` at offset ``p % block_size``; its *slot* is ``block_id * block_size + offset``.

One engine step runs a flat batch of ``T`` tokens from ``B`` sequences. Sequence ``b``
contributes ``query_lens[b]`` consecutive tokens (a prefill chunk, possibly starting
mid-prompt after cached tokens, or a single decode token) and has ``seq_lens[b]`` tokens of
context after this step (cached prefix + its new tokens). ``AttentionMetadata.build`` turns
that layout into index tensors once per step; every layer reuses them.

Attention strategy (few torch ops per layer, since Python overhead dominates small models):

- decode tokens (query length 1) of all sequences together: one block gather
  (``index_select`` over the block dimension) into ``[B_dec, L, Hkv, D]``, one SDPA call with
  the query heads grouped per KV head (``[B_dec, Hkv, G, D]``, no KV repetition) and a
  padding mask (no mask when a single sequence decodes).
- each prefill chunk: SDPA over its context; a chunk that is the whole context uses the
  fresh keys/values and ``is_causal``; a chunk after a cached prefix gathers its blocks and
  uses a bottom-right aligned causal mask built once per step.

A bfloat16 cache is upcast to the queries' dtype (float32) after the gather: SDPA in bf16 is
2-3x slower than in float32 on CPUs without AMX/AVX512-BF16. The native decode kernel
(``openmini.models.quantization.NativeKernels.paged_decode``) reads either dtype directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from openmini.config import ModelConfig


@dataclass(frozen=True)
class RowSplit:
    """Which rows of one step's flat token batch are decode rows and which are prefill rows.

    With native kernels, quantized layers compute decode rows (one new token of a sequence)
    with the weight-only kernels and prefill rows with a dequantized float32 GEMM of at
    least 17 (``quantization.GEMM_MIN_ROWS + 1``) rows (MKL's sgemm gives a row the same result for any row
    count from 17 up, measured; fewer rows take other code paths). A row's numerics then
    depend on its own kind only, never on what else shares the step: the same request gives
    the same tokens alone or batched (batch invariance).

    Attributes:
        decode_range: ``(start, end)`` of the decode rows when they are contiguous (``(0, 0)``
            when there are none), else None.
        decode_index: [T_dec] int64 decode rows when not contiguous, else None.
        prefill_index: [T - T_dec] int64 prefill rows when the decode rows are not
            contiguous, else None.
    """

    decode_range: tuple[int, int] | None
    decode_index: torch.Tensor | None = None
    prefill_index: torch.Tensor | None = None


@dataclass
class PrefillPlan:
    """Per-step precomputed layout of one prefill chunk (query length > 1).

    Attributes:
        token_start / token_end: rows of this chunk in the flat batch ``[T]``.
        seq_len: context length including the chunk, in tokens.
        block_index: [ceil(seq_len / block_size)] int64 block ids, or None when the chunk
            is the whole context (keys/values are taken from this step directly).
        mask: [query_len, seq_len] bool, True = may attend (bottom-right aligned causal),
            or None when ``is_causal`` applies.
    """

    token_start: int
    token_end: int
    seq_len: int
    block_index: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Layout of one engine step's flat token batch over the paged KV cache.

    Attributes:
        slot_mapping: [T] int64 cache slot of each new token (``block_id * block_size +
            offset``).
        query_start_loc: [B + 1] int64 prefix sums of query lengths.
        query_start_loc_list: the same as a Python list.
        seq_lens_list: context length of each sequence after this step, tokens.
        seq_lens: [B] int64, the same as a tensor.
        query_lens_list: new tokens of each sequence this step.
        block_tables: [B, max_blocks] int64, padded with 0; the first
            ``ceil(seq_len / block_size)`` entries of row b are valid.
        block_size: tokens per KV block.
        decode_only: every query length is 1.
        max_seq_len: ``max(seq_lens_list)`` (0 for an empty batch).
        decode_token_index: [B_dec] int64 rows of the decode tokens in the flat batch.
        decode_token_range: ``(start, end)`` when the decode rows are contiguous, else None.
        decode_block_index: [B_dec * L_blocks] int64 block ids of the decode sequences,
            padded to the longest with block 0.
        decode_seq_len: context length when exactly one sequence decodes (no mask needed).
        decode_mask: [B_dec, 1, 1, L_blocks * block_size] bool padding mask (True = valid)
            when several sequences decode, else None.
        prefills: one ``PrefillPlan`` per sequence with query length > 1.
        decode_seq_index: [B_dec] int64 batch index of each decoding sequence.
        row_split: decode rows vs prefill rows, for the quantized layers (``RowSplit``).
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    query_start_loc_list: list[int]
    seq_lens_list: list[int]
    query_lens_list: list[int]
    block_tables: torch.Tensor
    block_size: int
    seq_lens: torch.Tensor | None = None
    decode_only: bool = False
    max_seq_len: int = 0
    decode_token_index: torch.Tensor | None = None
    decode_token_range: tuple[int, int] | None = None
    decode_block_index: torch.Tensor | None = None
    decode_seq_len: int = 0
    decode_mask: torch.Tensor | None = None
    prefills: list[PrefillPlan] = field(default_factory=list)
    decode_seq_index: torch.Tensor | None = None
    row_split: RowSplit | None = None

    @property
    def num_decodes(self) -> int:
        """Sequences decoding one token this step."""
        return 0 if self.decode_token_index is None else int(self.decode_token_index.shape[0])

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        is_decode: list[bool] | None = None,
    ) -> "AttentionMetadata":
        """Build the metadata (and every per-step index tensor) for one step.

        Args:
            query_lens: new tokens per sequence, in batch order (each >= 1).
            seq_lens: context length per sequence after this step (>= its query length).
            block_tables: block ids per sequence; at least ``ceil(seq_len / block_size)``.
            block_size: tokens per KV block.
            device: device of the index tensors.
            is_decode: per sequence, whether its token is a decode (a sampled token fed
                back) rather than part of a prompt; default: query length 1. A one-token
                prompt piece (e.g. after a prefix-cache hit) then runs as a prefill, with
                the same numerics as when that prompt is computed in one piece.

        Returns:
            The metadata; the flat batch has ``sum(query_lens)`` tokens, sequence ``b``'s
            tokens are at positions ``seq_lens[b] - query_lens[b] ... seq_lens[b] - 1``.

        Raises:
            ValueError: mismatched list lengths, a query length < 1, a query longer than its
                context, or a block table too short for its context.
        """
        B = len(query_lens)
        if len(seq_lens) != B or len(block_tables) != B:
            raise ValueError(
                f"query_lens ({B}), seq_lens ({len(seq_lens)}) and block_tables "
                f"({len(block_tables)}) must have one entry per sequence"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        slots: list[int] = []
        starts = [0]
        dec_rows: list[int] = []
        dec_seqs: list[int] = []
        prefill_seqs: list[int] = []
        for b, (q, s, bt) in enumerate(zip(query_lens, seq_lens, block_tables)):
            if q < 1 or s < q:
                raise ValueError(f"sequence {b}: need 1 <= query_len <= seq_len, got {q} and {s}")
            if len(bt) * block_size < s:
                raise ValueError(
                    f"sequence {b}: block table of {len(bt)} blocks cannot hold {s} tokens "
                    f"with block_size {block_size}"
                )
            slots.extend(bt[p // block_size] * block_size + p % block_size for p in range(s - q, s))
            if (q == 1) if is_decode is None else is_decode[b]:
                if q != 1:
                    raise ValueError(f"sequence {b}: a decode has query length 1, got {q}")
                dec_rows.append(starts[-1])
                dec_seqs.append(b)
            else:
                prefill_seqs.append(b)
            starts.append(starts[-1] + q)

        max_blocks = max((len(bt) for bt in block_tables), default=0)
        padded = [list(bt) + [0] * (max_blocks - len(bt)) for bt in block_tables]

        def tensor(x) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int64, device=device)

        md = cls(
            slot_mapping=tensor(slots),
            query_start_loc=tensor(starts),
            query_start_loc_list=starts,
            seq_lens_list=list(seq_lens),
            query_lens_list=list(query_lens),
            block_tables=tensor(padded).view(B, max_blocks),
            block_size=block_size,
            seq_lens=tensor(list(seq_lens)),
            decode_only=B > 0 and not prefill_seqs,
            max_seq_len=max(seq_lens, default=0),
        )
        md.row_split = RowSplit((0, 0))
        if dec_seqs:
            md.decode_token_index = tensor(dec_rows)
            md.decode_seq_index = tensor(dec_seqs)
            if dec_rows == list(range(dec_rows[0], dec_rows[0] + len(dec_rows))):
                md.decode_token_range = (dec_rows[0], dec_rows[0] + len(dec_rows))
                md.row_split = RowSplit(md.decode_token_range)
            else:
                decode_rows = set(dec_rows)
                prefill_rows = [t for t in range(starts[-1]) if t not in decode_rows]
                md.row_split = RowSplit(None, md.decode_token_index, tensor(prefill_rows))
            n_blocks = max(-(-seq_lens[b] // block_size) for b in dec_seqs)
            md.decode_block_index = tensor(
                [padded[b][i] if i < len(block_tables[b]) else 0 for b in dec_seqs for i in range(n_blocks)]
            )
            if len(dec_seqs) == 1:
                md.decode_seq_len = seq_lens[dec_seqs[0]]
            else:
                lens = tensor([seq_lens[b] for b in dec_seqs])  # [B_dec]
                valid = torch.arange(n_blocks * block_size, device=device)[None, :] < lens[:, None]
                md.decode_mask = valid[:, None, None, :]  # [B_dec, 1, 1, L]
        for b in prefill_seqs:
            q, s = query_lens[b], seq_lens[b]
            if q == s:
                block_index, mask = None, None
            else:
                block_index = tensor(block_tables[b][: -(-s // block_size)])
                # query i sits at position s - q + i and may see keys 0 .. s - q + i
                mask = torch.ones(q, s, dtype=torch.bool, device=device).tril(s - q)  # [q, s]
            md.prefills.append(PrefillPlan(starts[b], starts[b + 1], s, block_index, mask))
        return md


def kv_cache_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers (K and V): ``2 * L * block_size * Hkv * D * elem``."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * config.num_key_value_heads * config.head_dim * elem


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> list[torch.Tensor]:
    """One zeroed ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` tensor per layer.

    Raises:
        ValueError: ``num_blocks`` or ``block_size`` < 1.
    """
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}")
    shape = (2, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]


def write_kv(kv: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys and values at their slots (one ``index_copy_``).

    Args:
        kv: [T, 2, Hkv, D] keys (``kv[:, 0]``) and values (``kv[:, 1]``); cast to the cache dtype.
        kv_cache: [2, num_blocks, block_size, Hkv, D], updated in place.
        slot_mapping: [T] int64.
    """
    _, _, _, Hkv, D = kv_cache.shape
    kv_cache.view(2, -1, Hkv, D).index_copy_(1, slot_mapping, kv.transpose(0, 1).to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    kv_cache: torch.Tensor,
    md: AttentionMetadata,
    scale: float,
    include_decode: bool = True,
) -> torch.Tensor:
    """Write this step's K/V into the cache and attend causally over each sequence's context.

    Each sequence's queries see its cached prefix plus its own new tokens up to themselves;
    sequences never see each other. Grouped-query attention: query head ``h`` uses KV head
    ``h // (H // Hkv)``.

    Args:
        q: [T, H, D] queries (RoPE applied).
        kv: [T, 2, Hkv, D] new keys (RoPE applied) and values.
        kv_cache: [2, num_blocks, block_size, Hkv, D] of this layer (updated in place).
        md: step layout from ``AttentionMetadata.build``.
        scale: softmax scale (1.0 when q is pre-scaled).
        include_decode: False leaves the decode rows of the output unset (the caller
            attends them with the native kernel).

    Returns:
        [T, H, D] attention output in q's dtype.
    """
    T, H, D = q.shape
    write_kv(kv, kv_cache, md.slot_mapping)
    if md.decode_only and md.decode_token_range == (0, T):
        return _decode(q, kv_cache, md, scale)
    gqa = H != kv.shape[2]
    out = q.new_empty(T, H, D)
    if md.decode_token_index is not None and include_decode:
        if md.decode_token_range is not None:
            a, b = md.decode_token_range
            out[a:b] = _decode(q[a:b], kv_cache, md, scale)
        else:
            idx = md.decode_token_index
            out.index_copy_(0, idx, _decode(q.index_select(0, idx), kv_cache, md, scale))
    # SDPA gets 4-D inputs: with 3-D ones torch 2.13 falls back to its slow math kernel
    for p in md.prefills:
        qs = q[p.token_start : p.token_end].transpose(0, 1)[None]  # [1, H, q, D]
        n = p.token_end - p.token_start
        pad = _query_padding(n)
        if p.block_index is None and not pad:
            kvs = kv[p.token_start : p.token_end].permute(1, 2, 0, 3)[:, None]  # [2, 1, Hkv, q, D]
            o = F.scaled_dot_product_attention(qs, kvs[0], kvs[1], is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            if p.block_index is None:
                kvs = kv[p.token_start : p.token_end].permute(1, 2, 0, 3)[:, None]  # [2, 1, Hkv, q, D]
                mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()  # [q, q]
            else:
                kvs = _gather(kv_cache, p.block_index, p.seq_len).to(q.dtype)  # [2, 1, Hkv, S, D]
                mask = p.mask  # [q, S]
            if pad:  # repeat the last query (and its mask row): see _query_padding
                rows = torch.cat([torch.arange(n), torch.full((pad,), n - 1)])
                qs, mask = qs[:, :, rows], mask[rows]
            o = F.scaled_dot_product_attention(qs, kvs[0], kvs[1], attn_mask=mask, scale=scale, enable_gqa=gqa)
            o = o[:, :, :n]
        out[p.token_start : p.token_end] = o[0].transpose(0, 1)  # [q, H, D]
    return out


_SDPA_Q_BLOCK = 32
"""Query block of torch's CPU flash-attention kernel (torch 2.13, measured)."""
_SDPA_MIN_TAIL = 4
"""A last query block of fewer rows than this takes another code path that rounds differently."""


def _query_padding(num_queries: int) -> int:
    """Extra (repeated) query rows that keep SDPA's last query block at >= 4 rows.

    torch 2.13's CPU flash attention computes queries in blocks of 32; a last block of 1-3
    rows rounds differently from the same rows in a fuller block (measured: up to 5e-7).
    Padding such blocks makes a prompt row's attention output independent of how the prompt
    was split into chunks or how much of it came from the prefix cache (batch invariance;
    tests/test_batch_invariance.py checks it end to end).
    """
    tail = num_queries % _SDPA_Q_BLOCK
    return _SDPA_MIN_TAIL - tail if 0 < tail < _SDPA_MIN_TAIL else 0


def _gather(kv_cache: torch.Tensor, block_index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Keys and values of one sequence as a [2, 1, Hkv, seq_len, D] view of a gathered copy."""
    _, _, _, Hkv, D = kv_cache.shape
    kv = kv_cache.index_select(1, block_index)  # [2, nb, bs, Hkv, D]
    return kv.view(2, 1, -1, Hkv, D)[:, :, :seq_len].transpose(2, 3)  # [2, 1, Hkv, S, D]


def _decode(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float) -> torch.Tensor:
    """Attention of one new token per decoding sequence over its whole context.

    Args:
        q: [B_dec, H, D] queries of the decode tokens, in decode order.

    Returns:
        [B_dec, H, D] in q's dtype.
    """
    Bd, H, D = q.shape
    Hkv = kv_cache.shape[3]
    kv = kv_cache.index_select(1, md.decode_block_index).view(2, Bd, -1, Hkv, D)  # [2, Bd, L, Hkv, D]
    mask = md.decode_mask
    if mask is None:  # one sequence: cut the padding instead of masking it
        kv = kv[:, :, : md.decode_seq_len]
    kv = kv.transpose(2, 3).to(q.dtype)  # [2, Bd, Hkv, L, D]; a bf16 cache is read as float32
    qg = q.view(Bd, Hkv, H // Hkv, D)  # query heads grouped by their KV head
    o = F.scaled_dot_product_attention(qg, kv[0], kv[1], attn_mask=mask, scale=scale)  # [Bd, Hkv, G, D]
    return o.view(Bd, H, D)
