"""Scheduler: continuous batching, chunked prefill, preemption, prefix hits, aborts, stops.

No torch and no model: ``FakeModel`` stands in for the model runner + sampler. It keeps a
simulated paged KV pool addressed exactly like the real one (``slot = block_id * block_size
+ offset``): the "KV" written at position p is ``hash((kv[p-1], token[p]))`` with kv[p-1]
read back from the pool, and a sampled token is a hash of every KV value of the context
read back through the block table. So a wrong block table, a bad prefix-cache hit or a
stale block changes the tokens, and the tokens of any schedule must equal
``reference_tokens`` (plain sequential generation, no cache). Runs in milliseconds.
"""

from __future__ import annotations

import random

import pytest

from openmini.config import SchedulerConfig
from openmini.engine.kv_cache_manager import KVCacheManager
from openmini.engine.request import Request, RequestStatus
from openmini.engine.scheduler import Scheduler, SchedulerOutput
from openmini.outputs import Logprob, TokenLogprobs
from openmini.sampling_params import SamplingParams

VOCAB = 1000
KV_ROOT = 12345


def kv_chain(tokens: list[int]) -> list[int]:
    """Reference KV values of a token sequence."""
    out, prev = [], KV_ROOT
    for t in tokens:
        prev = hash((prev, t))
        out.append(prev)
    return out


def next_token(context_kv: list[int]) -> int:
    return hash(tuple(context_kv)) % VOCAB


def reference_tokens(prompt: list[int], n: int) -> list[int]:
    """n tokens generated one by one without any cache (ignoring EOS)."""
    kvs = kv_chain(prompt)
    out = []
    for _ in range(n):
        t = next_token(kvs)
        out.append(t)
        kvs.append(hash((kvs[-1], t)))
    return out


class FakeModel:
    """Model runner + sampler stand-in over a simulated paged KV pool (see module doc)."""

    def __init__(self, kv: KVCacheManager):
        self.kv = kv
        self.bs = kv.block_size
        self.pool: list[int | None] = [None] * (kv.num_blocks * kv.block_size)

    def _slot(self, table: list[int], pos: int) -> int:
        return table[pos // self.bs] * self.bs + pos % self.bs

    def step(self, out: SchedulerOutput) -> dict[str, tuple[int, None]]:
        sampled = {}
        for req, k in out.scheduled:
            table = self.kv.get_block_ids(req.request_id)
            start, end = req.num_computed_tokens, req.num_computed_tokens + k
            assert end <= len(table) * self.bs, "KV slots not allocated"
            prev = self.pool[self._slot(table, start - 1)] if start else KV_ROOT
            for pos, tok in zip(range(start, end), req.token_ids_slice(start, end)):
                # blocks in the prefix cache are immutable: never recompute into them
                assert self.kv.blocks[table[pos // self.bs]].block_hash is None
                prev = hash((prev, tok))
                self.pool[self._slot(table, pos)] = prev
            if end == req.num_tokens:
                assert out.samples(req)
                context = [self.pool[self._slot(table, p)] for p in range(end)]
                assert context == kv_chain(req.all_token_ids), f"{req.request_id}: bad KV"
                sampled[req.request_id] = (next_token(context), None)
            else:
                assert not out.samples(req)
        return sampled


def make_sched(num_blocks=1000, block_size=4, budget=2048, max_num_seqs=32,
               max_model_len=8192, prefix_caching=True, chunk="budget"):
    kv = KVCacheManager(num_blocks, block_size, prefix_caching)
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                          max_model_len=max_model_len,
                          prefill_chunk_size=budget if chunk == "budget" else chunk)
    return Scheduler(cfg, kv), FakeModel(kv)


def make_req(rid, prompt, max_tokens=8, eos=(), wait_for=None, **params) -> Request:
    params.setdefault("ignore_eos", not eos)
    sp = SamplingParams(max_tokens=max_tokens, **params)
    return Request(request_id=rid, prompt_token_ids=list(prompt), sampling_params=sp,
                   eos_token_ids=frozenset(eos), max_tokens=max_tokens,
                   wait_for_prefill_of=wait_for)


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.config
    ks = [k for _, k in out.scheduled]
    assert out.total_num_scheduled_tokens == sum(ks) <= cfg.max_num_batched_tokens
    assert all(k >= 1 for k in ks)
    ids = [r.request_id for r, _ in out.scheduled]
    assert len(set(ids)) == len(ids) and out.num_scheduled_tokens == dict(zip(ids, ks))
    assert len(ids) <= cfg.max_num_seqs and sched.num_running <= cfg.max_num_seqs
    assert all(r.status == RequestStatus.RUNNING and r in sched.running
               for r, _ in out.scheduled)


def step(sched: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, list[Request]]:
    running_before = list(sched.running)
    out = sched.schedule()
    check_step(sched, out)
    if out.preempted_ids:  # a step that preempts admits nobody (the victims included)
        assert all(r in running_before and r.request_id not in out.preempted_ids
                   for r, _ in out.scheduled)
    changed = sched.update_from_output(out, model.step(out))
    sched.kv.check_invariants()
    return out, changed


def run(sched: Scheduler, model: FakeModel, max_steps: int = 20000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_unfinished_requests():
        outs.append(step(sched, model)[0])
        assert len(outs) < max_steps, "no progress"
    assert sched.kv.num_free_blocks == sched.kv.num_blocks
    return outs


def random_prompt(rng, n):
    return [rng.randrange(VOCAB) for _ in range(n)]


# ---- basic loop ---------------------------------------------------------------------------

def test_single_request_generates_reference_tokens():
    sched, model = make_sched()
    r = make_req("a", [1, 2, 3, 4, 5], max_tokens=6)
    sched.add_request(r)
    assert sched.num_waiting == 1 and sched.get_request("a") is r
    outs = run(sched, model)
    assert r.output_token_ids == reference_tokens([1, 2, 3, 4, 5], 6)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.finish_reason == "length"
    assert [o.num_scheduled_tokens["a"] for o in outs] == [5, 1, 1, 1, 1, 1]
    assert r.num_cached_tokens == 0
    assert sched.get_request("a") is None and sched.num_running == 0
    assert sched.schedule().finished_ids == ["a"]
    assert sched.schedule().finished_ids == []


def test_update_returns_requests_that_got_tokens():
    sched, model = make_sched(budget=4)
    a, b = make_req("a", range(6), max_tokens=2), make_req("b", [9], max_tokens=2)
    sched.add_request(a)
    sched.add_request(b)
    out, changed = step(sched, model)  # a: chunk of 4, no sample; b not admitted
    assert out.num_scheduled_tokens == {"a": 4} and changed == []
    out, changed = step(sched, model)  # a: last 2 prompt tokens, b: its prompt
    assert out.num_scheduled_tokens == {"a": 2, "b": 1} and changed == [a, b]
    out, changed = step(sched, model)
    assert changed == [a, b] and a.is_finished and b.is_finished
    assert sched.schedule().finished_ids == ["a", "b"]


# ---- chunked prefill --------------------------------------------------------------------

def test_chunked_prefill_alone():
    sched, model = make_sched(num_blocks=400, block_size=16, budget=512)
    long = make_req("long", random_prompt(random.Random(1), 6000), max_tokens=3)
    sched.add_request(long)
    outs = run(sched, model)
    first_sample = next(i for i, o in enumerate(outs) if o.samples("long")) + 1
    assert first_sample == -(-6000 // 512) == 12
    assert [o.num_scheduled_tokens["long"] for o in outs[:12]] == [512] * 11 + [6000 - 5632]
    assert long.output_token_ids == reference_tokens(long.prompt_token_ids, 3)


def test_chunked_prefill_mixes_with_decodes():
    # default grid: max(512 // 2, 512 - 32) = 480 tokens per chunk
    sched, model = make_sched(num_blocks=400, block_size=16, budget=512, chunk=None)
    short = make_req("short", [5] * 10, max_tokens=20)
    long = make_req("long", random_prompt(random.Random(2), 6000), max_tokens=3)
    sched.add_request(short)
    sched.add_request(long)
    outs = run(sched, model)
    first_sample = next(i for i, o in enumerate(outs) if o.samples("long")) + 1
    assert first_sample == 13  # 12 chunks of 480, then the last 240
    for o in outs[:13]:
        assert set(o.num_scheduled_tokens) == {"short", "long"}
        assert o.total_num_scheduled_tokens <= 512
        assert o.samples("short")  # a decode every step, next to the prefill chunk
    assert outs[0].num_scheduled_tokens == {"short": 10, "long": 480}
    assert all(o.num_scheduled_tokens == {"short": 1, "long": 480} for o in outs[1:12])
    assert outs[12].num_scheduled_tokens == {"short": 1, "long": 240}
    assert short.output_token_ids == reference_tokens(short.prompt_token_ids, 20)
    assert long.output_token_ids == reference_tokens(long.prompt_token_ids, 3)


# ---- prefix cache -------------------------------------------------------------------------

def test_shared_prefix_hits_after_first_request_is_freed():
    rng = random.Random(3)
    prefix = random_prompt(rng, 1000)
    sched, model = make_sched(num_blocks=256, block_size=16, budget=512)
    a = make_req("a", prefix + [1, 2, 3], max_tokens=4)
    sched.add_request(a)
    run(sched, model)  # a finished and freed: its blocks are free but still cached
    assert a.num_cached_tokens == 0
    b = make_req("b", prefix + [7, 8, 9, 10], max_tokens=4)
    sched.add_request(b)
    outs = run(sched, model)
    assert b.num_cached_tokens == 992 >= 960  # 62 full blocks of the shared prefix
    assert outs[0].num_scheduled_tokens["b"] == 1004 - 992 and outs[0].samples("b")
    assert b.output_token_ids == reference_tokens(b.prompt_token_ids, 4)
    assert sched.prefix_cache_hit_rate == pytest.approx(992 / (1003 + 1004))


def test_preempted_request_is_recomputed_with_its_outputs():
    sched, model = make_sched(num_blocks=8, block_size=4, budget=64)
    a = make_req("a", range(10), max_tokens=12)  # needs up to 6 blocks
    b = make_req("b", range(100, 109), max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, model)  # a: 3 blocks, b: 3 blocks
    assert set(out.num_scheduled_tokens) == {"a", "b"}
    preempted_out = None
    while preempted_out is None:
        out, _ = step(sched, model)
        if out.preempted_ids:
            preempted_out = out
    assert preempted_out.preempted_ids == ["b"]  # the newest goes
    assert list(sched.waiting) == [b] and b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0 and b.num_output_tokens > 0  # outputs are kept
    assert b.num_cached_tokens == 0  # set once, at first scheduling
    assert sched.num_preemptions == 1
    run(sched, model)
    assert a.output_token_ids == reference_tokens(a.prompt_token_ids, 12)
    assert b.output_token_ids == reference_tokens(b.prompt_token_ids, 12)


def test_a_step_that_preempts_admits_nobody():
    # Without this rule the victim would come straight back with a small chunk (the budget
    # left after the running requests) and be preempted again: thrashing.
    sched, model = make_sched(num_blocks=8, block_size=4, budget=8, prefix_caching=False)
    reqs = [make_req("a", range(5), max_tokens=16), make_req("b", range(10, 24), max_tokens=16),
            make_req("c", range(30, 33), max_tokens=16)]
    for r in reqs:
        sched.add_request(r)
    run(sched, model)  # step() asserts the rule
    assert sched.num_preemptions > 0
    assert all(r.output_token_ids == reference_tokens(r.prompt_token_ids, 16) for r in reqs)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_a_small_pool_gives_the_same_tokens(prefix_caching):
    rng = random.Random(4)
    shared = random_prompt(rng, 24)
    prompts = [(shared if i % 3 == 0 else []) + random_prompt(rng, rng.randrange(20, 50))
               for i in range(16)]
    results = {}
    for num_blocks in (2000, 40):  # 40 blocks * 4 = 160 tokens: about 2 requests at once
        sched, model = make_sched(num_blocks=num_blocks, block_size=4, budget=64,
                                  max_num_seqs=16, prefix_caching=prefix_caching)
        reqs = [make_req(f"r{i}", p, max_tokens=30) for i, p in enumerate(prompts)]
        for r in reqs:
            sched.add_request(r)
        run(sched, model)
        results[num_blocks] = [r.output_token_ids for r in reqs]
        assert all(r.status == RequestStatus.FINISHED_LENGTH for r in reqs)
        if num_blocks == 40:
            assert sched.num_preemptions > 0
        else:
            assert sched.num_preemptions == 0
    assert results[40] == results[2000] == [reference_tokens(p, 30) for p in prompts]


def test_siblings_wait_for_prefill_and_hit_the_cache():
    sched, model = make_sched(num_blocks=200, block_size=16, budget=64)
    prompt = random_prompt(random.Random(5), 100)
    sibs = [make_req("p#0", prompt, max_tokens=5)]
    sibs += [make_req(f"p#{i}", prompt, max_tokens=5, wait_for="p#0") for i in (1, 2, 3)]
    other = make_req("q", [3] * 10, max_tokens=5)
    for r in sibs + [other]:
        sched.add_request(r)
    out1, _ = step(sched, model)
    assert out1.num_scheduled_tokens == {"p#0": 64}
    out2, _ = step(sched, model)  # siblings still wait, but do not block q
    assert out2.num_scheduled_tokens == {"p#0": 36, "q": 10}
    out3, _ = step(sched, model)
    assert out3.num_scheduled_tokens == {"p#0": 1, "q": 1, "p#1": 4, "p#2": 4, "p#3": 4}
    run(sched, model)
    assert sibs[0].num_cached_tokens == 0
    assert [s.num_cached_tokens for s in sibs[1:]] == [96, 96, 96]  # (100 - 1) // 16 blocks
    ref = reference_tokens(prompt, 5)
    assert all(s.output_token_ids == ref for s in sibs)


def test_siblings_do_not_wait_without_prefix_caching():
    sched, model = make_sched(block_size=16, budget=256, prefix_caching=False)
    a = make_req("p#0", range(40), max_tokens=2)
    b = make_req("p#1", range(40), max_tokens=2, wait_for="p#0")
    sched.add_request(a)
    sched.add_request(b)
    out, _ = step(sched, model)
    assert out.num_scheduled_tokens == {"p#0": 40, "p#1": 40}


# ---- limits -------------------------------------------------------------------------------

def test_max_num_seqs_and_budget_are_respected():
    rng = random.Random(6)
    sched, model = make_sched(budget=40, max_num_seqs=3)
    reqs = [make_req(f"r{i}", random_prompt(rng, rng.randrange(5, 30)), max_tokens=6)
            for i in range(10)]
    for r in reqs:
        sched.add_request(r)
    outs = run(sched, model)  # check_step asserts both limits every step
    assert max(len(o.scheduled) for o in outs) == 3
    assert 30 <= max(o.total_num_scheduled_tokens for o in outs) <= 40  # chunks on a grid
    assert all(r.output_token_ids == reference_tokens(r.prompt_token_ids, 6) for r in reqs)


def test_add_request_validation():
    sched, _ = make_sched(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(ValueError):
        sched.add_request(make_req("empty", []))
    with pytest.raises(ValueError):  # 16 tokens fill the 16-slot pool: no room to generate
        sched.add_request(make_req("big", range(16)))
    sched.add_request(make_req("ok", range(15)))
    with pytest.raises(ValueError):
        sched.add_request(make_req("ok", range(3)))
    sched2, _ = make_sched(max_model_len=10)
    with pytest.raises(ValueError):
        sched2.add_request(make_req("long", range(10)))


# ---- stop conditions ----------------------------------------------------------------------

def drive(sched: Scheduler, script: dict[str, list[int]], logprobs=False) -> None:
    """Run with scripted sampled tokens."""
    while sched.has_unfinished_requests():
        out = sched.schedule()
        sampled = {}
        for rid in out.sampling_ids:
            tok = script[rid].pop(0)
            lp = TokenLogprobs(Logprob(tok, -0.5)) if logprobs else None
            sampled[rid] = (tok, lp)
        sched.update_from_output(out, sampled)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks


@pytest.mark.parametrize("kwargs, script, tokens, status, stop_reason", [
    (dict(eos=[7]), [5, 7, 9], [5, 7], "stop", None),
    (dict(eos=[7], max_tokens=2), [5, 7], [5, 7], "stop", None),  # EOS beats length
    (dict(eos=[7], min_tokens=2), [7, 7, 7, 9], [7, 7, 7], "stop", None),
    (dict(eos=[7], ignore_eos=True, max_tokens=3), [7, 7, 7, 7], [7, 7, 7], "length", None),
    (dict(stop_token_ids=[9]), [5, 9, 1], [5, 9], "stop", 9),
    (dict(max_tokens=3), [1, 2, 3, 4], [1, 2, 3], "length", None),
    (dict(max_tokens=100), list(range(20)), [0, 1, 2], "length", None),  # window of 8
])
def test_stop_conditions(kwargs, script, tokens, status, stop_reason):
    sched, _ = make_sched(max_model_len=8)
    r = make_req("a", [1, 2, 3, 4, 5], **kwargs)
    sched.add_request(r)
    drive(sched, {"a": list(script)})
    assert r.output_token_ids == tokens
    assert r.finish_reason == status and r.stop_reason == stop_reason


def test_pool_size_caps_the_context_window():
    sched, _ = make_sched(num_blocks=2, block_size=4)  # 8 token slots
    r = make_req("a", [1, 2, 3, 4, 5], max_tokens=100)
    sched.add_request(r)
    drive(sched, {"a": list(range(50))})
    assert r.output_token_ids == [0, 1, 2] and r.finish_reason == "length"


def test_logprobs_are_appended_when_requested():
    sched, _ = make_sched()
    a = make_req("a", [1, 2], max_tokens=3, logprobs=0)
    b = make_req("b", [1, 2], max_tokens=3)
    sched.add_request(a)
    sched.add_request(b)
    drive(sched, {"a": [4, 5, 6], "b": [4, 5, 6]}, logprobs=True)
    assert [lp.sampled.token_id for lp in a.logprobs] == [4, 5, 6]
    assert b.logprobs is None


# ---- finishing from outside (abort, stop string) ------------------------------------------

def test_finish_requests_is_idempotent_and_ignores_unknown_ids():
    sched, model = make_sched()
    a, b = make_req("a", range(5)), make_req("b", range(5))
    sched.add_request(a)
    sched.add_request(b)
    step(sched, model)
    assert sched.finish_requests(["a", "nope"], RequestStatus.FINISHED_ABORTED) == [a]
    assert sched.finish_requests("a", RequestStatus.FINISHED_STOPPED) == []
    assert a.status == RequestStatus.FINISHED_ABORTED and a.finish_reason == "abort"
    with pytest.raises(ValueError):
        sched.finish_requests("b", RequestStatus.RUNNING)
    assert sched.schedule().finished_ids == ["a"]


def test_finish_between_schedule_and_update_discards_the_result():
    sched, model = make_sched()
    a, b = make_req("a", range(5)), make_req("b", range(7))
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    sampled = model.step(out)
    sched.finish_requests("a", RequestStatus.FINISHED_STOPPED)
    assert sched.update_from_output(out, sampled) == [b]
    assert a.output_token_ids == [] and a.num_computed_tokens == 0
    assert b.num_output_tokens == 1
    sched.kv.check_invariants()
    run(sched, model)


def abort_run(target: str | None, at_step: int, phase: str):
    """Three requests under preemption and chunking; abort ``target`` at one moment."""
    sched, model = make_sched(num_blocks=6, block_size=4, budget=8)
    reqs = {rid: make_req(rid, p, max_tokens=5, wait_for=w) for rid, p, w in [
        ("a", list(range(9)), None), ("b", list(range(9)), "a"),
        ("c", list(range(50, 56)), None)]}
    for r in reqs.values():
        sched.add_request(r)
    n = 0
    while sched.has_unfinished_requests():
        if n == at_step and phase == "before_schedule":
            sched.finish_requests([target], RequestStatus.FINISHED_ABORTED)
        out = sched.schedule()
        check_step(sched, out)
        sampled = model.step(out)
        if n == at_step and phase == "before_update":
            sched.finish_requests([target], RequestStatus.FINISHED_ABORTED)
        sched.update_from_output(out, sampled)
        sched.kv.check_invariants()
        n += 1
        assert n < 1000
    sched.finish_requests([target], RequestStatus.FINISHED_ABORTED)  # after the end: no-op
    return sched, reqs, n


def test_abort_at_every_moment_frees_everything():
    sched, reqs, num_steps = abort_run(None, -1, "")
    assert sched.num_preemptions > 0
    ref = {rid: reference_tokens(r.prompt_token_ids, 5) for rid, r in reqs.items()}
    assert {rid: r.output_token_ids for rid, r in reqs.items()} == ref
    n_aborted = 0
    for target in reqs:
        for at_step in range(num_steps + 1):
            for phase in ("before_schedule", "before_update"):
                sched, got, _ = abort_run(target, at_step, phase)
                assert sched.kv.num_free_blocks == sched.kv.num_blocks
                assert not sched.has_unfinished_requests()
                assert not sched.waiting and not sched.running
                for rid, r in got.items():
                    assert r.output_token_ids == ref[rid][:r.num_output_tokens]
                    if rid != target:
                        assert r.output_token_ids == ref[rid]
                    elif r.status == RequestStatus.FINISHED_ABORTED:
                        n_aborted += 1
                        assert r.num_output_tokens < 5
    assert n_aborted > 3 * num_steps  # the aborts did land mid-flight


def test_prefill_chunks_sit_on_a_fixed_grid_whatever_else_runs():
    """Chunk boundaries are multiples of prefill_chunk_size from the sequence start, so a
    prompt is split the same way alone and beside decodes (batch invariance); a chunk that
    does not fit waits instead of shrinking."""
    sched, model = make_sched(budget=10, max_num_seqs=4, chunk=None)
    assert sched.prefill_chunk_size == 6  # max(10 // 2, 10 - 4)
    busy = [make_req(f"d{i}", [1], max_tokens=50) for i in range(4)]
    for r in busy:
        sched.add_request(r)
    step(sched, model)  # the four 1-token prompts
    long = make_req("p", range(2, 16), max_tokens=1)  # 14 prompt tokens: chunks 6, 6, 2
    sched.add_request(long)
    chunks = []
    while long.status != RequestStatus.FINISHED_LENGTH:
        out, _ = step(sched, model)
        if "p" in out.num_scheduled_tokens:
            chunks.append(out.num_scheduled_tokens["p"])
        assert out.total_num_scheduled_tokens <= 10
    assert chunks == [6, 6, 2]

    alone, model2 = make_sched(budget=10, max_num_seqs=4, chunk=None)
    solo = make_req("p", range(2, 16), max_tokens=1)
    alone.add_request(solo)
    out, _ = step(alone, model2)
    assert out.num_scheduled_tokens == {"p": 6}  # not 10: the grid, not the free budget
