"""Paged KV cache bookkeeping: blocks, ref counts, prefix cache, LRU eviction. No torch.

The KV pool (one tensor per layer, ``[2, num_blocks, block_size, num_kv_heads, head_dim]``,
see ``openmini.models.attention``) is cut into ``num_blocks`` blocks of ``block_size`` token
slots. This module only decides which block ids each request owns; the model runner turns
them into a block table and a slot mapping (``slot = block_id * block_size + offset``).

Design after vLLM v1's ``KVCacheManager`` / ``BlockPool`` and nano-vllm's ``BlockManager``
(Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention"):

- A block is shared by several requests through its ref count.
- A *full* block whose tokens have been computed is registered in the prefix cache under a
  chained hash ``hash((parent_hash, token_ids_of_block, extra_keys))``; the chain makes the
  hash stand for the whole prefix up to and including the block.
- A block whose ref count drops to 0 goes back to the free queue but keeps its hash (and
  its KV), so a later request with the same prefix can take it back (a prefix-cache hit).
  Allocation takes blocks from the head of the free queue (least recently freed first) and
  only then drops their old hash (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from openmini.engine.request import Request

# Parent hash of a request's first block. A fixed int (not None: ``hash(None)`` is
# id-based, hence different in every process, before Python 3.12).
ROOT_BLOCK_HASH = 0x6F70656E6D696E69  # b"openmini"

# Extra hash input for blocks whose KV depends on more than their token ids (multimodal
# inputs, LoRA adapters, cache salts). Text-only requests use this empty tuple.
NO_EXTRA_KEYS: tuple = ()

# cache_full_blocks progress marker of a request that must register no more blocks
_NEVER = 1 << 62


class KVCacheInvariantError(RuntimeError):
    """The manager's bookkeeping is inconsistent (raised by ``check_invariants``)."""


def hash_block_tokens(parent_hash: int, token_ids: tuple[int, ...],
                      extra_keys: tuple = NO_EXTRA_KEYS) -> int:
    """Chained hash of one full block.

    Args:
        parent_hash: hash of the previous block of the sequence, or ``ROOT_BLOCK_HASH``.
        token_ids: the block's ``block_size`` token ids.
        extra_keys: anything else the block's KV depends on (empty for plain text).

    Returns:
        Python's 64-bit ``hash`` of ``(parent_hash, token_ids, extra_keys)``. For tuples of
        ints it is deterministic across processes and runs (``PYTHONHASHSEED`` randomizes
        only str / bytes / datetime hashing), so two engines agree on block hashes. Keep
        ``extra_keys`` to ints / tuples of ints to preserve that. The hash is not
        cryptographic; the manager therefore also compares the stored token ids on every
        cache hit, so a colliding block is treated as a miss.
    """
    return hash((parent_hash, token_ids, extra_keys))


def kv_bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                       dtype_bytes: int) -> int:
    """Bytes one block takes across all layers, K and V.

    Formula: the per-layer pool is ``[2, num_blocks, block_size, num_kv_heads, head_dim]``,
    so one block is ``2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes``.
    """
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes


def num_blocks_from_memory(kv_cache_memory_bytes: int, bytes_per_block: int,
                           min_blocks: int = 2) -> int:
    """How many KV blocks fit in a memory budget.

    Args:
        kv_cache_memory_bytes: bytes reserved for the whole KV pool.
        bytes_per_block: see ``kv_bytes_per_block``.
        min_blocks: the smallest usable pool.

    Returns:
        ``kv_cache_memory_bytes // bytes_per_block``.

    Raises:
        ValueError: a non-positive ``bytes_per_block``, or fewer than ``min_blocks`` blocks.
    """
    if bytes_per_block <= 0:
        raise ValueError(f"bytes_per_block must be positive, got {bytes_per_block}.")
    num_blocks = kv_cache_memory_bytes // bytes_per_block
    if num_blocks < min_blocks:
        raise ValueError(
            f"KV cache memory of {kv_cache_memory_bytes} bytes holds {num_blocks} blocks of "
            f"{bytes_per_block} bytes; at least {min_blocks} are needed. "
            f"Raise the KV cache memory.")
    return num_blocks


class KVBlock:
    """One block of ``block_size`` token slots in the KV pool.

    Attributes:
        block_id: index into the pool (dimension 1 of each layer's KV tensor).
        ref_cnt: how many requests hold this block.
        block_hash: chained hash when the block is full, computed and registered in the
            prefix cache; None otherwise.
        token_ids: the block's token ids while ``block_hash`` is set (checked on hits).
    """

    __slots__ = ("block_id", "ref_cnt", "block_hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


@dataclass
class PrefixCacheStats:
    """Prefix-cache counters, in tokens.

    Attributes:
        queries: tokens of requests looked up at admission (a request re-admitted after
            preemption counts again).
        hits: of those, tokens served from cached blocks.
    """

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        """``hits / queries``, 0.0 before any query."""
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Owns the block pool and each request's block list.

    Args:
        num_blocks: pool size in blocks (>= 1).
        block_size: tokens per block (>= 1).
        enable_prefix_caching: register full blocks by chained hash and reuse them.

    Raises:
        ValueError: non-positive ``num_blocks`` or ``block_size``.

    Free queue order: a freed block that is registered in the prefix cache goes to the tail
    (evicted last, least recently used first); a freed block without a hash holds nothing
    reusable and goes to the head, so it is reused before any cached block. A request's
    blocks are freed tail first, so a prefix's last blocks are evicted before its first
    ones (a shorter prefix stays usable longer).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}.")
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # block_id -> block, head = next to allocate. OrderedDict gives O(1) pop at the
        # head, append at the tail, move to the head and removal from the middle.
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[int, KVBlock] = {}  # block hash -> block
        self._req_blocks: dict[str, list[KVBlock]] = {}
        # per request: how many of its leading blocks cache_full_blocks has handled
        self._num_handled: dict[str, int] = {}
        self._stats = PrefixCacheStats()

    # ---- accounting ------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0 (cached or not); all of them can be allocated."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the pool held by requests, 0..1."""
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (held or free)."""
        return len(self._cached)

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        """A copy of the prefix-cache counters (tokens)."""
        return PrefixCacheStats(self._stats.queries, self._stats.hits)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` token slots."""
        return -(-num_tokens // self.block_size)

    def get_block_ids(self, request_id: str) -> list[int]:
        """The request's block table (block ids in token order); [] for an unknown id."""
        return [b.block_id for b in self._req_blocks.get(request_id, ())]

    def has_request(self, request_id: str) -> bool:
        """True while the request holds blocks (between its first allocation and free)."""
        return request_id in self._req_blocks

    # ---- prefix cache ----------------------------------------------------------------

    def _update_block_hashes(self, request: Request, num_full_blocks: int) -> None:
        """Extend ``request.block_hashes`` to its first ``num_full_blocks`` blocks.

        Incremental: hashes already on the request are kept (a request's tokens only
        grow; whoever rolls output tokens back must truncate ``block_hashes`` too).
        """
        hashes = request.block_hashes
        bs = self.block_size
        parent = hashes[-1] if hashes else ROOT_BLOCK_HASH
        for i in range(len(hashes), num_full_blocks):
            tokens = tuple(request.token_ids_slice(i * bs, (i + 1) * bs))
            parent = hash_block_tokens(parent, tokens)
            hashes.append(parent)

    def _lookup(self, request: Request, i: int) -> KVBlock | None:
        """The cached block for the request's block ``i`` (hash and token ids match)."""
        block = self._cached.get(request.block_hashes[i])
        if block is None:
            return None
        bs = self.block_size
        if block.token_ids != tuple(request.token_ids_slice(i * bs, (i + 1) * bs)):
            return None  # hash collision: treat as a miss
        return block

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest run of the request's leading full blocks found in the prefix cache.

        The whole sequence is never returned: at least the last token must be computed to
        get logits, so the run is capped at ``(num_tokens - 1) // block_size`` blocks.
        Takes no refs (``allocate_slots`` does). Fills ``request.block_hashes`` for the
        request's full blocks (incrementally; kept on the request across steps).

        Returns:
            (block ids in token order, number of computed tokens = len * block_size).
        """
        if not self.enable_prefix_caching:
            return [], 0
        num_tokens = request.num_tokens
        self._update_block_hashes(request, num_tokens // self.block_size)
        max_blocks = max(num_tokens - 1, 0) // self.block_size
        ids: list[int] = []
        for i in range(max_blocks):
            block = self._lookup(request, i)
            if block is None:
                break
            ids.append(block.block_id)
        return ids, len(ids) * self.block_size

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that are full of computed tokens.

        Call after ``request.num_computed_tokens`` has advanced (end of a step). A block
        whose hash is already registered to another block (two requests computed the same
        prefix at once) stays private; the request keeps using it. If a registered block
        has the same hash but different tokens (a hash collision), this request stops
        registering blocks, since its later hashes would chain from a colliding one.
        """
        rid = request.request_id
        blocks = self._req_blocks.get(rid)
        if not self.enable_prefix_caching or blocks is None:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        start = self._num_handled.get(rid, 0)
        if num_full <= start:
            return
        self._update_block_hashes(request, num_full)
        bs = self.block_size
        for i in range(start, num_full):
            block = blocks[i]
            if block.block_hash is not None:
                continue  # a prefix-cache hit: already registered
            h = request.block_hashes[i]
            tokens = tuple(request.token_ids_slice(i * bs, (i + 1) * bs))
            existing = self._cached.get(h)
            if existing is None:
                block.block_hash = h
                block.token_ids = tokens
                self._cached[h] = block
            elif existing.token_ids != tokens:
                self._num_handled[rid] = _NEVER  # collision: register nothing more
                return
        self._num_handled[rid] = num_full

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (held blocks keep their KV but are no longer shared).

        Returns:
            The number of hashes dropped.
        """
        n = len(self._cached)
        for block in self._cached.values():
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()
        return n

    # ---- allocation ------------------------------------------------------------------

    def can_allocate(self, request: Request, num_new_tokens: int,
                     new_computed_blocks: list[int] | None = None) -> bool:
        """Whether ``allocate_slots`` with the same arguments would succeed."""
        return self._num_missing_blocks(request, num_new_tokens, new_computed_blocks) <= 0

    def _num_missing_blocks(self, request: Request, num_new_tokens: int,
                            new_computed_blocks: list[int] | None) -> int:
        """Blocks still lacking after using every free block (<= 0 means it fits)."""
        held = self._req_blocks.get(request.request_id, ())
        computed = new_computed_blocks or ()
        total_tokens = (request.num_computed_tokens + len(computed) * self.block_size
                        + num_new_tokens)
        num_new_blocks = self.num_blocks_for(total_tokens) - len(held) - len(computed)
        # computed blocks taken out of the free queue are no longer available
        revived = sum(1 for bid in computed if self.blocks[bid].ref_cnt == 0)
        return num_new_blocks - (len(self._free) - revived)

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> bool:
        """Make the request's blocks cover the tokens it will have computed after a step.

        Covers ``request.num_computed_tokens + len(new_computed_blocks) * block_size +
        num_new_tokens`` token slots. ``new_computed_blocks`` (from ``get_computed_blocks``)
        are prefix-cache hits: they get a ref (leaving the free queue if unreferenced) and
        become the request's first blocks. Fresh blocks come from the head of the free
        queue; a fresh block that still had a cached hash is evicted from the cache.

        Args:
            request: the request (``num_computed_tokens`` not yet advanced for this step).
            num_new_tokens: tokens to compute this step.
            new_computed_blocks: cached block ids; only on the request's first allocation.

        Returns:
            True on success; False (and nothing changed) when the free blocks do not
            suffice.

        Raises:
            ValueError: ``num_new_tokens`` < 0, computed blocks for a request that already
                holds blocks or has computed tokens, or a computed block that is not cached.
        """
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}.")
        rid = request.request_id
        computed = new_computed_blocks or []
        if computed:
            if rid in self._req_blocks or request.num_computed_tokens:
                raise ValueError(f"Request {rid!r}: prefix-cache blocks can only be added at "
                                 f"its first allocation.")
            for bid in computed:
                if self.blocks[bid].block_hash is None:
                    raise ValueError(f"Block {bid} is not in the prefix cache.")
        if self._num_missing_blocks(request, num_new_tokens, computed) > 0:
            return False
        if rid not in self._req_blocks:
            self._stats.queries += request.num_tokens
            self._stats.hits += len(computed) * self.block_size
        blocks = self._req_blocks.setdefault(rid, [])
        for bid in computed:
            block = self.blocks[bid]
            if block.ref_cnt == 0:
                del self._free[bid]
            block.ref_cnt += 1
            blocks.append(block)
        total_tokens = request.num_computed_tokens + len(computed) * self.block_size \
            + num_new_tokens
        for _ in range(self.num_blocks_for(total_tokens) - len(blocks)):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:  # evict its old prefix-cache entry
                del self._cached[block.block_hash]
                block.block_hash = None
                block.token_ids = None
            block.ref_cnt = 1
            blocks.append(block)
        return True

    def free(self, request: Request | str) -> None:
        """Release the request's blocks (last block first) and forget the request.

        Blocks reaching ref count 0 join the free queue: cached ones at the tail, uncached
        ones at the head (see the class docstring). Unknown ids are ignored.
        """
        rid = request if isinstance(request, str) else request.request_id
        blocks = self._req_blocks.pop(rid, None)
        self._num_handled.pop(rid, None)
        if blocks is None:
            return
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    # ---- checking ----------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Verify the bookkeeping (for tests and debugging; O(num_blocks)).

        Raises:
            KVCacheInvariantError: naming the first broken invariant: a ref count differs
                from the number of requests holding the block; a block is both free and
                held; free + used != total; a request holds a block twice; a hash maps to
                a block with another hash; a hashed block is missing from the cache map or
                has no token ids; a block has a hash while prefix caching is off.
        """
        def fail(msg: str) -> None:
            raise KVCacheInvariantError(msg)

        holders = [0] * self.num_blocks
        for rid, blocks in self._req_blocks.items():
            ids = [b.block_id for b in blocks]
            if len(set(ids)) != len(ids):
                fail(f"request {rid!r} holds a block twice: {ids}")
            for bid in ids:
                holders[bid] += 1
        for block in self.blocks:
            if block.ref_cnt != holders[block.block_id]:
                fail(f"{block}: ref count {block.ref_cnt} but held by "
                     f"{holders[block.block_id]} requests")
            in_free = block.block_id in self._free
            if in_free and block.ref_cnt:
                fail(f"{block} is in the free queue but referenced")
            if not in_free and not block.ref_cnt:
                fail(f"{block} is neither free nor referenced (leaked)")
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is not block:
                    fail(f"{block} has a hash the cache map does not point back to")
                if block.token_ids is None or len(block.token_ids) != self.block_size:
                    fail(f"{block} is cached without a full block of token ids")
            elif block.token_ids is not None:
                fail(f"{block} keeps token ids without a hash")
        for h, block in self._cached.items():
            if block.block_hash != h:
                fail(f"hash {h} maps to {block} whose hash differs")
        if self._cached and not self.enable_prefix_caching:
            fail("blocks are cached while prefix caching is disabled")
        num_used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        if len(self._free) + num_used != self.num_blocks:
            fail(f"free {len(self._free)} + used {num_used} != total {self.num_blocks}")
        for bid, block in self._free.items():
            if self.blocks[bid] is not block:
                fail(f"free queue entry {bid} points to {block}")
