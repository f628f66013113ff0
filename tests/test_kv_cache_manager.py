"""KVCacheManager: ref counts, prefix cache, LRU eviction, invariants. No torch, milliseconds."""

from __future__ import annotations

import random

import pytest

import openmini.engine.kv_cache_manager as kvm
from openmini.engine.kv_cache_manager import (
    ROOT_BLOCK_HASH,
    KVCacheInvariantError,
    KVCacheManager,
    hash_block_tokens,
    kv_bytes_per_block,
    num_blocks_from_memory,
)
from openmini.engine.request import Request
from openmini.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(tokens),
                   sampling_params=SamplingParams(max_tokens=1000), max_tokens=1000)


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None) -> bool:
    """What the scheduler does for a waiting request: look up hits, allocate, mark computed."""
    ids, num_hit = kv.get_computed_blocks(r)
    k = r.num_tokens - num_hit if num_new is None else num_new
    if not kv.allocate_slots(r, k, ids):
        return False
    r.num_computed_tokens = num_hit
    return True


def compute(kv: KVCacheManager, r: Request, k: int) -> None:
    """What a finished step does: advance computed tokens, register full blocks."""
    r.num_computed_tokens += k
    kv.cache_full_blocks(r)


def snapshot(kv: KVCacheManager):
    return (list(kv._free), dict(kv._cached),
            {rid: [b.block_id for b in bl] for rid, bl in kv._req_blocks.items()},
            [(b.ref_cnt, b.block_hash, b.token_ids) for b in kv.blocks],
            dict(kv._num_handled), kv.prefix_cache_stats)


def reference_hashes(tokens: list[int], bs: int) -> list[int]:
    out, parent = [], ROOT_BLOCK_HASH
    for i in range(len(tokens) // bs):
        parent = hash((parent, tuple(tokens[i * bs:(i + 1) * bs]), ()))
        out.append(parent)
    return out


# ---- basics -----------------------------------------------------------------------------

def test_allocate_covers_tokens_and_free_returns_everything():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    r = req("a", range(10))
    assert admit(kv, r)
    assert len(kv.get_block_ids("a")) == 3  # ceil(10 / 4)
    assert kv.num_used_blocks == 3 and kv.num_free_blocks == 7
    assert kv.usage == pytest.approx(0.3)
    compute(kv, r, 10)
    r.output_token_ids.append(99)  # decode step: 1 more slot (token 10) fits block 2
    assert kv.allocate_slots(r, 1) and len(kv.get_block_ids("a")) == 3
    compute(kv, r, 1)
    r.output_token_ids.append(98)  # token 11 still fits block 2
    assert kv.allocate_slots(r, 1) and len(kv.get_block_ids("a")) == 3
    compute(kv, r, 1)
    r.output_token_ids.append(97)  # token 12 needs a 4th block
    assert kv.allocate_slots(r, 1) and len(kv.get_block_ids("a")) == 4
    kv.check_invariants()
    kv.free(r)
    kv.free(r)  # idempotent
    kv.free("unknown")
    assert kv.num_free_blocks == 10 and kv.get_block_ids("a") == []
    kv.check_invariants()


def test_failed_allocation_changes_nothing():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = req("a", range(16))
    assert admit(kv, a)
    compute(kv, a, 16)
    kv.free(a)  # 4 cached free blocks, 2 uncached
    b = req("b", list(range(16)) + list(range(100, 120)))  # 4 hit blocks (cap) + 5 new
    ids, hit = kv.get_computed_blocks(b)
    assert hit == 16
    before = snapshot(kv)
    assert not kv.can_allocate(b, b.num_tokens - hit, ids)
    assert not kv.allocate_slots(b, b.num_tokens - hit, ids)
    assert snapshot(kv) == before
    # the hit blocks themselves are free: reviving them must not count as free space
    c = req("c", list(range(16)) + list(range(200, 212)))  # 4 hits + 3 new > 2 uncached
    ids, hit = kv.get_computed_blocks(c)
    assert hit == 16 and not kv.allocate_slots(c, c.num_tokens - hit, ids)
    assert snapshot(kv) == before
    kv.check_invariants()


def test_allocate_rejects_misuse():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", range(8))
    assert admit(kv, a)
    with pytest.raises(ValueError):
        kv.allocate_slots(a, -1)
    b = req("b", range(8))
    with pytest.raises(ValueError):  # block 0 holds no cached hash yet
        kv.allocate_slots(b, 4, [kv.get_block_ids("a")[0]])
    compute(kv, a, 8)
    ids, _ = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 4, ids)
    with pytest.raises(ValueError):  # hits only at the first allocation
        kv.allocate_slots(b, 1, ids)
    with pytest.raises(ValueError):
        KVCacheManager(0, 4)
    with pytest.raises(ValueError):
        KVCacheManager(4, 0)


def test_num_blocks_from_memory():
    per_block = kv_bytes_per_block(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16,
                                   dtype_bytes=2)
    assert per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert num_blocks_from_memory(1 << 30, per_block) == (1 << 30) // per_block
    assert num_blocks_from_memory(10 * per_block + 5, per_block) == 10
    with pytest.raises(ValueError):
        num_blocks_from_memory(per_block, per_block)  # 1 block < default minimum of 2
    with pytest.raises(ValueError):
        num_blocks_from_memory(1 << 20, 0)


# ---- prefix cache -------------------------------------------------------------------------

def test_block_hashes_are_chained_and_incremental(monkeypatch):
    kv = KVCacheManager(num_blocks=16, block_size=4)
    r = req("a", range(10))
    kv.get_computed_blocks(r)
    assert r.block_hashes == reference_hashes(list(range(10)), 4)
    assert r.block_hashes[0] == hash_block_tokens(ROOT_BLOCK_HASH, (0, 1, 2, 3))
    calls = []
    real = kvm.hash_block_tokens
    monkeypatch.setattr(kvm, "hash_block_tokens", lambda *a: calls.append(a) or real(*a))
    kv.get_computed_blocks(r)
    assert calls == []  # cached on the request, not recomputed
    r.output_token_ids.extend([10, 11])  # completes block 2 only
    kv.get_computed_blocks(r)
    assert len(calls) == 1 and r.block_hashes == reference_hashes(list(range(12)), 4)
    # same block content after a different prefix hashes differently
    assert (reference_hashes([9, 9, 9, 9, 4, 5, 6, 7], 4)[1]
            != reference_hashes([0, 1, 2, 3, 4, 5, 6, 7], 4)[1])


def test_prefix_hit_never_covers_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = req("a", range(12))
    assert admit(kv, a)
    compute(kv, a, 12)
    kv.free(a)
    same = req("b", range(12))  # identical: 3 cached blocks, but token 11 must be computed
    ids, hit = kv.get_computed_blocks(same)
    assert hit == 8 and ids == kv_ids_of_hashes(kv, same.block_hashes[:2])
    longer = req("c", range(13))
    assert kv.get_computed_blocks(longer)[1] == 12
    shorter = req("d", range(5))
    assert kv.get_computed_blocks(shorter)[1] == 4
    other = req("e", [7] + list(range(1, 13)))
    assert kv.get_computed_blocks(other) == ([], 0)


def kv_ids_of_hashes(kv, hashes):
    return [kv._cached[h].block_id for h in hashes]


def test_shared_prefix_takes_refs_and_survives_first_request_free():
    kv = KVCacheManager(num_blocks=200, block_size=16)
    rng = random.Random(0)
    prefix = [rng.randrange(32000) for _ in range(1000)]
    a = req("a", prefix + [1, 2, 3])
    assert admit(kv, a)
    compute(kv, a, a.num_tokens)
    kv.free(a)  # blocks go back to the free queue but stay cached
    b = req("b", prefix + [4, 5, 6, 7, 8])
    ids, hit = kv.get_computed_blocks(b)
    assert hit == 992 >= 960  # 62 full blocks of the 1000-token prefix
    assert kv.allocate_slots(b, b.num_tokens - hit, ids)
    assert kv.get_block_ids("b")[:62] == ids
    c = req("c", prefix + [9])
    ids_c, hit_c = kv.get_computed_blocks(c)
    assert hit_c == 992 and ids_c == ids
    assert kv.allocate_slots(c, c.num_tokens - hit_c, ids_c)
    assert all(kv.blocks[i].ref_cnt == 2 for i in ids)
    kv.check_invariants()
    kv.free(b)
    assert all(kv.blocks[i].ref_cnt == 1 for i in ids)
    kv.free(c)
    assert kv.num_free_blocks == 200
    kv.check_invariants()
    stats = kv.prefix_cache_stats
    assert stats.queries == a.num_tokens + b.num_tokens + c.num_tokens
    assert stats.hits == 2 * 992
    assert stats.hit_rate == pytest.approx(2 * 992 / stats.queries)


def test_eviction_order_is_lru_and_uncached_blocks_go_first():
    kv = KVCacheManager(num_blocks=8, block_size=2)
    a = req("a", [1, 2, 3, 4, 5, 6, 7])  # blocks A0 A1 A2 full, A3 partial
    assert admit(kv, a)
    compute(kv, a, 7)
    a_ids = kv.get_block_ids("a")
    b = req("b", [11, 12, 13, 14, 15])  # B0 B1 full, B2 partial
    assert admit(kv, b)
    compute(kv, b, 5)
    b_ids = kv.get_block_ids("b")
    kv.free(a)  # freed later = evicted later
    kv.free(b)
    free_order = list(kv._free)
    # uncached: B2, A3 (moved to the head when freed) and the never used block 7;
    # then cached, LRU first: A's blocks tail first, then B's tail first
    assert set(free_order[:3]) == {a_ids[3], b_ids[2], 7}
    assert free_order[3:] == [a_ids[2], a_ids[1], a_ids[0], b_ids[1], b_ids[0]]
    n_cached = kv.num_cached_blocks
    c = req("c", [21, 22, 23, 24, 25, 26, 27, 28, 29])  # 5 fresh blocks, no hits
    assert admit(kv, c)
    assert kv.get_block_ids("c") == free_order[:5]
    # A2 and A1 were evicted (hashes dropped); A0 and B's blocks survive
    assert kv.num_cached_blocks == n_cached - 2
    assert kv.get_computed_blocks(req("x", [1, 2, 3, 4, 5, 6, 7]))[1] == 2
    assert kv.get_computed_blocks(req("y", [11, 12, 13, 14, 15]))[1] == 4
    kv.check_invariants()


def test_only_computed_full_blocks_are_cached():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    a = req("a", range(30))
    assert admit(kv, a, num_new=10)  # first prefill chunk ends inside block 2
    compute(kv, a, 10)
    assert kv.num_cached_blocks == 2
    assert kv.get_computed_blocks(req("b", range(30)))[1] == 8
    assert kv.allocate_slots(a, 10)
    compute(kv, a, 10)  # tokens 10..19: blocks 2, 3, 4 now full
    assert kv.num_cached_blocks == 5
    assert kv.get_computed_blocks(req("c", range(30)))[1] == 20
    kv.check_invariants()


def test_same_prefix_computed_twice_keeps_first_mapping():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a, b = req("a", range(9)), req("b", range(9))
    assert admit(kv, a) and admit(kv, b)  # neither finds anything cached yet
    compute(kv, a, 9)
    compute(kv, b, 9)
    a_ids, b_ids = kv.get_block_ids("a"), kv.get_block_ids("b")
    assert kv._cached[a.block_hashes[0]].block_id == a_ids[0]
    assert kv.blocks[b_ids[0]].block_hash is None  # b keeps its private copy
    kv.check_invariants()
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10
    kv.check_invariants()


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(kvm, "hash_block_tokens", lambda parent, tokens, extra=(): 42)
    kv = KVCacheManager(num_blocks=10, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    compute(kv, a, 5)
    assert kv.num_cached_blocks == 1  # block 1 collides with block 0: not registered
    b = req("b", [7, 8, 3, 4, 5])  # same (fake) hashes, different tokens
    assert kv.get_computed_blocks(b) == ([], 0)
    c = req("c", [1, 2, 9, 9, 9])
    assert kv.get_computed_blocks(c)[1] == 2  # the real match still hits
    assert admit(kv, b)
    compute(kv, b, 5)
    kv.check_invariants()
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10


def test_prefix_caching_disabled():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a = req("a", range(9))
    assert admit(kv, a)
    compute(kv, a, 9)
    kv.free(a)
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(req("b", range(9))) == ([], 0)
    kv.check_invariants()


def test_reset_prefix_cache():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", range(9))
    assert admit(kv, a)
    compute(kv, a, 9)
    assert kv.reset_prefix_cache() == 2
    kv.check_invariants()
    assert kv.get_computed_blocks(req("b", range(9))) == ([], 0)
    kv.free(a)
    assert kv.num_free_blocks == 10 and kv.num_cached_blocks == 0


# ---- invariant checker ------------------------------------------------------------------

@pytest.mark.parametrize("corrupt", ["ref", "free_and_held", "leak", "dangling_hash",
                                     "wrong_map"])
def test_check_invariants_detects_corruption(corrupt):
    kv = KVCacheManager(num_blocks=6, block_size=2)
    a = req("a", [1, 2, 3, 4, 5])
    assert admit(kv, a)
    compute(kv, a, 5)
    kv.check_invariants()
    held = kv._req_blocks["a"][0]
    if corrupt == "ref":
        held.ref_cnt += 1
    elif corrupt == "free_and_held":
        kv._free[held.block_id] = held
    elif corrupt == "leak":
        kv._free.popitem()
    elif corrupt == "dangling_hash":
        del kv._cached[held.block_hash]
    elif corrupt == "wrong_map":
        kv._cached[12345] = held
    with pytest.raises(KVCacheInvariantError):
        kv.check_invariants()


# ---- randomized -------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_allocate_free_abort_sequences(seed, prefix_caching):
    """Thousands of random admissions (with shared prefixes), chunked steps, decodes,
    finishes and aborts; invariants after every operation, and every block free at the end.
    """
    rng = random.Random(seed)
    bs = 4
    kv = KVCacheManager(num_blocks=24, block_size=bs, enable_prefix_caching=prefix_caching)
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 30))] for _ in range(4)]
    live: list[Request] = []
    n_hit_tokens = 0
    n_fail = 0
    for op in range(3000):
        choice = rng.random()
        if choice < 0.3 and len(live) < 8:
            prompt = rng.choice(prefixes) + [rng.randrange(50)
                                             for _ in range(rng.randrange(0, 12))]
            r = req(f"r{op}", prompt)
            ids, hit = kv.get_computed_blocks(r)
            assert hit % bs == 0 and hit <= r.num_tokens - 1
            if prefix_caching:
                # the hit is exactly the run of leading blocks cached with equal tokens
                for i, bid in enumerate(ids):
                    assert kv.blocks[bid].token_ids == tuple(prompt[i * bs:(i + 1) * bs])
            k = rng.randrange(1, r.num_tokens - hit + 1)  # maybe a first prefill chunk
            before = snapshot(kv)
            if kv.allocate_slots(r, k, ids):
                r.num_computed_tokens = hit
                n_hit_tokens += hit
                live.append(r)
                compute(kv, r, k)
                if r.num_computed_tokens == r.num_tokens:
                    r.output_token_ids.append(rng.randrange(50))
            else:
                n_fail += 1
                assert snapshot(kv) == before
        elif choice < 0.8 and live:
            r = rng.choice(live)  # one step: next prefill chunk or a decode
            gap = r.num_tokens - r.num_computed_tokens
            k = rng.randrange(1, gap + 1)
            before = snapshot(kv)
            if not kv.allocate_slots(r, k):
                n_fail += 1
                assert snapshot(kv) == before
                victim = live.pop()  # preempt the newest, like the scheduler
                kv.free(victim)
                continue
            compute(kv, r, k)
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(rng.randrange(50))
            assert len(kv.get_block_ids(r.request_id)) * bs >= r.num_computed_tokens
        elif live:
            r = live.pop(rng.randrange(len(live)))  # finish or abort at any point
            kv.free(r)
        kv.check_invariants()
    for r in live:
        kv.free(r)
    kv.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks and kv.num_used_blocks == 0
    assert n_fail > 0  # the pool did run out
    if prefix_caching:
        assert n_hit_tokens > 0
    else:
        assert n_hit_tokens == 0 and kv.num_cached_blocks == 0
