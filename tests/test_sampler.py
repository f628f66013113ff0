"""Sampler tests against brute-force references written plainly in numpy / Python."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from openmini.engine.request import Request
from openmini.engine.sampler import (
    NoAllowedTokenError,
    Sampler,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    sample_from_logits,
)
from openmini.sampling_params import SamplingParams

NEG_INF = float("-inf")


def make_request(rid: str = "r0", prompt=(1, 2, 3), output=(), index: int = 0,
                 eos=(), **params) -> Request:
    return Request(request_id=rid, prompt_token_ids=list(prompt),
                   sampling_params=SamplingParams(**params), eos_token_ids=frozenset(eos),
                   index=index, output_token_ids=list(output))


# ------------------------------------------------------------------ brute-force references


def ref_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.where(np.isfinite(x), np.exp(x - np.max(x)), 0.0)
    return e / e.sum()


def ref_top_k_keep(x: np.ndarray, k: int) -> np.ndarray:
    """Keep t iff fewer than k tokens have a strictly larger logit."""
    if k <= 0 or k >= len(x):
        return np.ones(len(x), dtype=bool)
    return np.array([sum(1 for v in x if v > x[t]) < k for t in range(len(x))])


def ref_top_p_keep(p: np.ndarray, top_p: float) -> np.ndarray:
    """Keep t iff the mass of tokens strictly more likely than t is < top_p."""
    if top_p >= 1.0:
        return np.ones(len(p), dtype=bool)
    bigger = p[None, :] > p[:, None]  # [t, j]: p_j > p_t
    return (bigger * p[None, :]).sum(axis=1) < top_p


def ref_min_p_keep(p: np.ndarray, min_p: float) -> np.ndarray:
    return p >= min_p * p.max()


def ref_top_p_is_ambiguous(p: np.ndarray, top_p: float, tol: float = 1e-5) -> bool:
    """True when top_p sits within tol of a cumulative mass (float32 could round either way)."""
    if top_p >= 1.0:
        return False  # top_p = 1 disables the filter
    masses = [p[p > v].sum() + p[p == v].sum() for v in np.unique(p)]
    return any(abs(m - top_p) < tol for m in masses)


def ref_penalized(x: np.ndarray, prompt: list[int], output: list[int], rep: float,
                  presence: float, frequency: float) -> np.ndarray:
    out = np.array(x, dtype=np.float64)
    seen = set(prompt) | set(output)
    for t in range(len(out)):
        if t in seen and rep != 1.0:
            out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in range(len(out)):
        c = output.count(t)
        out[t] -= frequency * c + presence * (1.0 if c > 0 else 0.0)
    return out


def ref_distribution(x: np.ndarray, params: SamplingParams, prompt: list[int],
                     output: list[int]) -> np.ndarray:
    """The whole pipeline, one transform after another, in float64."""
    z = np.array(x, dtype=np.float64)
    for tok, b in params.logit_bias.items():
        z[tok] += b
    z = ref_penalized(z, prompt, output, params.repetition_penalty,
                      params.presence_penalty, params.frequency_penalty)
    z = z / params.temperature
    z[~ref_top_k_keep(z, params.top_k)] = NEG_INF
    p = ref_softmax(z)
    p = np.where(ref_top_p_keep(p, params.top_p), p, 0.0)
    p = p / p.sum()
    p = np.where(ref_min_p_keep(p, params.min_p), p, 0.0)
    return p / p.sum()


def chi_square_critical(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at normal score z."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def kept(t: torch.Tensor) -> np.ndarray:
    return torch.isfinite(t).numpy()


# ------------------------------------------------------------------ truncation transforms


@pytest.mark.parametrize("ties", [False, True])
def test_top_k_kept_set_matches_brute_force(ties):
    rng = np.random.default_rng(0)
    V = 17
    for trial in range(30):
        x = rng.integers(-3, 3, V).astype(np.float32) if ties else \
            rng.normal(size=V).astype(np.float32)
        ks = [-1, 0, 1, 2, 3, 5, 8, V - 1, V, V + 5]
        logits = torch.tensor(np.stack([x] * len(ks)))
        out = apply_top_k(logits, torch.tensor(ks))
        for row, k in enumerate(ks):
            np.testing.assert_array_equal(kept(out[row]), ref_top_k_keep(x, k),
                                          err_msg=f"trial {trial} k={k}")
            finite = kept(out[row])
            np.testing.assert_array_equal(out[row].numpy()[finite], x[finite])


def test_top_k_ties_keep_every_tied_token():
    x = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0]])
    out = apply_top_k(x, torch.tensor([2]))
    assert kept(out[0]).tolist() == [False, True, True, True, True, False]


@pytest.mark.parametrize("ties", [False, True])
def test_top_p_kept_set_matches_brute_force(ties):
    rng = np.random.default_rng(1)
    V = 23
    rows, top_ps = [], []
    for _ in range(150):
        x = (rng.integers(-4, 4, V) / 2).astype(np.float32) if ties else \
            (rng.normal(size=V) * 2).astype(np.float32)
        for top_p in (0.05, 0.3, 0.5, 0.8, 0.95, 0.999, 1.0):
            if not ref_top_p_is_ambiguous(ref_softmax(x), top_p):
                rows.append(x)
                top_ps.append(top_p)
    assert len(rows) > 800
    out = apply_top_p(torch.tensor(np.stack(rows)), torch.tensor(top_ps))
    for x, top_p, got in zip(rows, top_ps, out):
        np.testing.assert_array_equal(kept(got), ref_top_p_keep(ref_softmax(x), top_p),
                                      err_msg=f"x={x.tolist()} top_p={top_p}")


def test_top_p_one_keeps_even_negligible_tokens():
    x = torch.tensor([[10.0, 0.0, -80.0, -200.0]])
    assert kept(apply_top_p(x, torch.tensor([1.0]))[0]).all()


def test_top_p_keeps_at_least_the_most_likely_token():
    x = torch.tensor([[0.0, 5.0, 1.0], [2.0, 2.0, 1.0]])
    out = apply_top_p(x, torch.tensor([1e-6, 1e-6]))
    assert kept(out).tolist() == [[False, True, False], [True, True, False]]


def test_top_p_wide_nucleus_uses_full_sort_and_matches_brute_force():
    # Near-uniform over 3000 tokens: the nucleus is wider than the first topk candidates.
    rng = np.random.default_rng(2)
    V = 3000
    x = (rng.random(V) * 0.5).astype(np.float32)
    peaked = x.copy()
    peaked[:5] += 12.0
    p_flat, p_peak = ref_softmax(x), ref_softmax(peaked)
    assert not ref_top_p_is_ambiguous(p_flat, 0.9)
    assert not ref_top_p_is_ambiguous(p_peak, 0.9)
    out = apply_top_p(torch.tensor(np.stack([x, peaked])), torch.tensor([0.9, 0.9]))
    ref_flat = ref_top_p_keep(p_flat, 0.9)
    assert ref_flat.sum() > 1024
    np.testing.assert_array_equal(kept(out[0]), ref_flat)
    np.testing.assert_array_equal(kept(out[1]), ref_top_p_keep(p_peak, 0.9))


def test_top_p_large_vocab_matches_sorted_reference():
    # V = 20000: one nucleus fits the second candidate width, one needs the full sort.
    rng = np.random.default_rng(10)
    V = 20_000
    flat = rng.permutation(np.linspace(0.0, 0.3, V)).astype(np.float32)  # distinct values
    mid = flat.copy()
    mid[:4000] += 2.0
    rows = np.stack([flat, mid])
    aboves, top_ps = [], []
    for x in rows:
        assert len(np.unique(x)) == V  # no ties: mass above t = exclusive cumsum at its rank
        p = ref_softmax(x)
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        above = np.empty(V)
        above[order] = cum - p[order]
        m = int(np.searchsorted(cum, 0.9))
        aboves.append(above)
        top_ps.append((cum[m - 1] + cum[m]) / 2)  # half a token's mass from any boundary
    out = apply_top_p(torch.tensor(rows), torch.tensor(top_ps))
    sizes = []
    for above, top_p, got in zip(aboves, top_ps, out):
        np.testing.assert_array_equal(kept(got), above < top_p)
        sizes.append(int((above < top_p).sum()))
    assert sizes[0] > 16384 and 1024 < sizes[1] <= 16384, sizes


def test_min_p_kept_set_matches_brute_force():
    rng = np.random.default_rng(3)
    V = 19
    for _ in range(50):
        x = (rng.normal(size=V) * 2).astype(np.float32)
        p = ref_softmax(x)
        for min_p in (0.0, 0.01, 0.1, 0.5, 0.9):
            ratios = p / p.max()
            if min_p > 0 and np.any(np.abs(ratios - min_p) < 1e-5):
                continue
            out = apply_min_p(torch.tensor(x)[None], torch.tensor([min_p], dtype=torch.float64))
            np.testing.assert_array_equal(kept(out[0]), ref_min_p_keep(p, min_p))


def test_min_p_edges():
    x = torch.tensor([[1.0, 3.0, 3.0, -50.0]])
    assert kept(apply_min_p(x, torch.tensor([0.0], dtype=torch.float64))).all()
    one = apply_min_p(x, torch.tensor([1.0], dtype=torch.float64))
    assert kept(one[0]).tolist() == [False, True, True, False]


# ------------------------------------------------------------------ penalties and bias


def test_penalties_match_exact_formulas():
    rng = np.random.default_rng(4)
    V = 12
    rows = [  # prompt, output, repetition, presence, frequency
        ([1, 2, 2, 7], [3, 3, 3, 7, 0], 1.3, 0.5, 0.25),
        ([4, 5], [5, 6, 6], 0.8, -0.7, 1.5),
        ([], [11, 11], 1.0, 2.0, -2.0),
        ([0, 1, 2, 3], [], 2.0, 1.0, 1.0),
    ]
    x = rng.normal(size=(len(rows), V)).astype(np.float32) * 3
    x[0, 3] = 0.0  # a zero logit stays zero under the repetition penalty
    # Rows 1 and 3 of a 5-row batch are described; the others must stay untouched.
    batch = np.concatenate([x, rng.normal(size=(1, V)).astype(np.float32)])
    order = [4, 1, 0, 3]  # batch row of each entry of `rows`; batch row 2 gets nothing
    batch_in = batch.copy()
    batch_in[order] = x
    ids = lambda lists: [torch.tensor(t, dtype=torch.long) for t in lists]  # noqa: E731
    out = apply_penalties(torch.tensor(batch_in), order, ids([r[0] for r in rows]),
                          ids([r[1] for r in rows]), torch.tensor([r[2] for r in rows]),
                          torch.tensor([r[3] for r in rows]), torch.tensor([r[4] for r in rows]))
    for i, (prompt, output, rep, pres, freq) in enumerate(rows):
        np.testing.assert_allclose(out[order[i]].numpy(),
                                   ref_penalized(x[i], prompt, output, rep, pres, freq),
                                   rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out[2].numpy(), batch_in[2])
    # Spot-check the sign rule: a positive prompt-only logit is divided, a negative multiplied.
    xi = torch.tensor([[2.0, -2.0, 1.0]])
    got = apply_penalties(xi, [0], ids([[0, 1, 1, 99]]), ids([[]]), torch.tensor([2.0]),
                          torch.tensor([0.0]), torch.tensor([0.0]))
    assert got.tolist() == [[1.0, -4.0, 1.0]]


def test_penalties_through_sampler_change_greedy_choice():
    sampler = Sampler(vocab_size=4)
    logits = torch.tensor([[1.0, 3.0, 2.5, 0.0]])
    # Token 1 generated twice: 3.0 - 2*0.4 - 0.0 = 2.2 < 2.5 -> token 2.
    r = make_request(output=[1, 1], temperature=0.0, frequency_penalty=0.4)
    assert sampler(logits, [r]).token_ids == [2]
    r = make_request(prompt=[1], temperature=0.0, repetition_penalty=1.5)  # 3/1.5 = 2 < 2.5
    assert sampler(logits, [r]).token_ids == [2]
    r = make_request(prompt=[1], temperature=0.0, presence_penalty=2.0)  # output only: no-op
    assert sampler(logits, [r]).token_ids == [1]


def test_logit_bias_bans_and_forces():
    sampler = Sampler(vocab_size=50, base_seed=0)
    rng = np.random.default_rng(5)
    logits = torch.tensor(rng.normal(size=(200, 50)).astype(np.float32) * 2)
    best = logits.argmax(dim=1)
    banned = [make_request(f"b{i}", temperature=1.0, logit_bias={int(best[i]): -100})
              for i in range(200)]
    out = sampler(logits, banned).token_ids
    assert all(t != int(best[i]) for i, t in enumerate(out))
    greedy = [make_request(f"g{i}", temperature=0.0, logit_bias={int(best[i]): -100})
              for i in range(200)]
    second = logits.topk(2, dim=1).indices[:, 1]
    assert sampler(logits, greedy).token_ids == second.tolist()
    forced = [make_request(f"f{i}", temperature=1.0, logit_bias={7: 100, 10_000: 5})
              for i in range(200)]
    assert sampler(logits, forced).token_ids == [7] * 200


# ------------------------------------------------------------------ greedy


def test_greedy_is_argmax_and_ignores_padding_columns():
    rng = np.random.default_rng(6)
    V, pad = 40, 8
    logits = torch.tensor(rng.normal(size=(9, V + pad)).astype(np.float32))
    logits[:, V:] = 1e4  # LM-head padding must never win
    reqs = [make_request(f"r{i}", temperature=0.0) for i in range(9)]
    out = Sampler(vocab_size=V)(logits, reqs)
    assert out.token_ids == [int(np.argmax(row[:V])) for row in logits.numpy()]
    assert out.logprobs == [None] * 9
    assert all(r.sampler_state is None for r in reqs)  # greedy never needs a generator
    # Sampled rows never pick padding either.
    reqs = [make_request(f"s{i}", temperature=2.0, seed=i) for i in range(9)]
    assert all(t < V for t in Sampler(vocab_size=V)(logits, reqs).token_ids)


def test_greedy_with_processing_matches_reference_argmax():
    rng = np.random.default_rng(7)
    V = 30
    x = rng.normal(size=V).astype(np.float32)
    params = dict(temperature=0.0, logit_bias={3: 1.5, 4: -2.0}, repetition_penalty=1.2,
                  presence_penalty=0.3, frequency_penalty=0.2)
    r = make_request(prompt=[1, 3, 5], output=[3, 4, 9, 9], **params)
    z = np.array(x, dtype=np.float64)
    for tok, b in r.sampling_params.logit_bias.items():
        z[tok] += b
    z = ref_penalized(z, [1, 3, 5], [3, 4, 9, 9], 1.2, 0.3, 0.2)
    assert Sampler(vocab_size=V)(torch.tensor(x)[None], [r]).token_ids == [int(np.argmax(z))]


# ------------------------------------------------------------------ sampling distribution


DIST_LOGITS = np.array([2.0, 1.6, 1.1, 0.9, 0.35, -0.2, -0.8, -1.5, -2.4, 0.6],
                       dtype=np.float32)


@pytest.mark.parametrize("params", [
    dict(temperature=1.0, top_k=50, top_p=1.0, min_p=0.0),  # top_k >= V: no truncation
    dict(temperature=0.6),
    dict(temperature=1.3, top_k=5),
    dict(temperature=1.0, top_p=0.75),
    dict(temperature=0.9, min_p=0.12),
    dict(temperature=0.8, top_k=7, top_p=0.9, min_p=0.05, logit_bias={8: 2.5},
         repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.3),
])
def test_empirical_distribution_matches_brute_force(params):
    prompt, output = [0, 4], [1, 1, 9]
    sp = SamplingParams(**params)
    ref = ref_distribution(DIST_LOGITS, sp, prompt, output)
    # Preconditions: no truncation boundary is within float rounding of a threshold.
    z = np.array(DIST_LOGITS, dtype=np.float64)
    for tok, b in sp.logit_bias.items():
        z[tok] += b
    z = ref_penalized(z, prompt, output, sp.repetition_penalty, sp.presence_penalty,
                      sp.frequency_penalty) / sp.temperature
    z[~ref_top_k_keep(z, sp.top_k)] = NEG_INF
    assert not ref_top_p_is_ambiguous(ref_softmax(z), sp.top_p, tol=1e-3)

    n = 12_000
    shared = SamplingParams(seed=1000, **params)  # n siblings: seeds 1000 + index
    reqs = [Request(f"r#{i}", list(prompt), shared, output_token_ids=list(output), index=i)
            for i in range(n)]
    logits = torch.tensor(np.tile(DIST_LOGITS, (n, 1)))
    tokens = Sampler(vocab_size=len(DIST_LOGITS))(logits, reqs).token_ids
    counts = np.bincount(tokens, minlength=len(DIST_LOGITS))
    assert np.all(counts[ref == 0] == 0), (counts, ref)
    support = ref > 0
    expected = ref[support] * n
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert chi2 < chi_square_critical(df), (chi2, counts, expected)
    tv = 0.5 * np.abs(counts / n - ref).sum()
    assert tv < 0.025, (tv, counts / n, ref)


def test_sample_from_logits_never_returns_zero_probability_tokens():
    x = torch.tensor([[NEG_INF, 0.0, 1.0, NEG_INF, NEG_INF]] * 4)
    u = torch.tensor([0.0, 0.5, np.nextafter(1.0, 0.0), 0.999999999], dtype=torch.float64)
    out = sample_from_logits(x, u).tolist()
    assert out[0] == 1 and out[2] == 2 and out[3] == 2
    assert set(out) <= {1, 2}


# ------------------------------------------------------------------ seeds and determinism


def run_steps(sampler: Sampler, step_logits: list[torch.Tensor], target: Request,
              others_factory=None, position: int = 0) -> list[int]:
    """Sample len(step_logits) tokens for target; optionally batch it with other rows."""
    others = others_factory() if others_factory else []
    rng = torch.Generator().manual_seed(99)
    tokens = []
    for logits_row in step_logits:
        batch = list(others)
        batch.insert(position, target)
        rows = torch.randn(len(batch), logits_row.shape[0], generator=rng)
        rows[position] = logits_row
        out = sampler(rows, batch)
        for r, t in zip(batch, out.token_ids):
            r.output_token_ids.append(t)
        tokens.append(out.token_ids[position])
    return tokens


def random_others() -> list[Request]:
    return [
        make_request("o1", temperature=0.0),
        make_request("o2", temperature=1.0),  # unseeded
        make_request("o3", temperature=0.7, top_p=0.5, seed=5, logprobs=3),
        make_request("o4", temperature=1.2, top_k=10, frequency_penalty=0.5, seed=6),
    ]


def test_seeded_request_is_identical_alone_and_batched():
    V = 500
    gen = torch.Generator().manual_seed(11)
    steps = [torch.randn(V, generator=gen) for _ in range(16)]

    def target():
        return make_request("t", temperature=1.0, top_p=0.95, frequency_penalty=0.3, seed=1234)

    alone = run_steps(Sampler(V, base_seed=1), steps, target())
    batched = run_steps(Sampler(V, base_seed=2), steps, target(), random_others, position=2)
    assert alone == batched
    other_seed = run_steps(Sampler(V, base_seed=1), steps,
                           make_request("t", temperature=1.0, top_p=0.95,
                                        frequency_penalty=0.3, seed=1235))
    assert other_seed != alone


def test_unseeded_requests_follow_the_engine_seed():
    V = 500
    gen = torch.Generator().manual_seed(12)
    steps = [torch.randn(V, generator=gen) for _ in range(12)]
    a = run_steps(Sampler(V, base_seed=7), steps, make_request("u", temperature=1.0))
    b = run_steps(Sampler(V, base_seed=7), steps, make_request("u", temperature=1.0))
    c = run_steps(Sampler(V, base_seed=8), steps, make_request("u", temperature=1.0))
    assert a == b
    assert a != c


@pytest.mark.parametrize("seed", [7, None])
def test_n_siblings_differ(seed):
    V = 500
    sampler = Sampler(V, base_seed=3)
    siblings = [make_request(f"p#{i}", index=i, temperature=1.0, seed=seed) for i in range(4)]
    gen = torch.Generator().manual_seed(13)
    seqs = [[] for _ in siblings]
    for _ in range(10):
        row = torch.randn(V, generator=gen)
        out = sampler(row.expand(len(siblings), V).clone(), siblings)
        for s, t in zip(seqs, out.token_ids):
            s.append(t)
    assert len({tuple(s) for s in seqs}) == len(siblings)


# ------------------------------------------------------------------ logprobs


def test_logprobs_come_from_raw_logits():
    rng = np.random.default_rng(8)
    V, pad = 30, 6
    logits = torch.tensor(rng.normal(size=(3, V + pad)).astype(np.float32) * 2)
    logits[:, V:] = 50.0  # padding must not enter the normalization
    reqs = [
        make_request("a", temperature=0.5, logprobs=5, logit_bias={0: 30}, seed=1),
        make_request("b", temperature=0.0, logprobs=0, frequency_penalty=1.0, output=[2]),
        make_request("c", temperature=1.0),
    ]
    before = logits.clone()
    out = Sampler(vocab_size=V)(logits, reqs)
    assert torch.equal(logits, before)  # the caller's logits are not modified
    raw_lp = torch.log_softmax(logits[:, :V].double(), dim=1)
    a, b, c = out.logprobs
    assert c is None
    assert out.token_ids[0] == 0  # the bias forced it, but logprobs stay raw
    assert a.sampled.token_id == 0
    assert a.sampled.logprob == pytest.approx(float(raw_lp[0, 0]), abs=1e-5)
    order = torch.argsort(raw_lp[0], descending=True)[:5].tolist()
    assert [lp.token_id for lp in a.top] == order
    assert [lp.logprob for lp in a.top] == pytest.approx(raw_lp[0, order].tolist(), abs=1e-5)
    assert all(x.logprob >= y.logprob for x, y in zip(a.top, a.top[1:]))
    assert all(lp.decoded == "" for lp in a.top)
    assert b.top == []
    assert b.sampled.token_id == out.token_ids[1]
    assert b.sampled.logprob == pytest.approx(float(raw_lp[1, out.token_ids[1]]), abs=1e-5)


def test_top_logprobs_20_cover_the_whole_small_vocab():
    V = 20
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(4))
    reqs = [make_request("x", temperature=0.0, logprobs=20),
            make_request("y", temperature=1.0, logprobs=20, seed=3)]
    out = Sampler(vocab_size=V)(logits, reqs)
    for row, entry in enumerate(out.logprobs):
        assert sorted(lp.token_id for lp in entry.top) == list(range(V))
        assert sum(math.exp(lp.logprob) for lp in entry.top) == pytest.approx(1.0, abs=1e-5)
        vals = [lp.logprob for lp in entry.top]
        assert vals == sorted(vals, reverse=True)
        expected = torch.log_softmax(logits[row].double(), 0)[out.token_ids[row]]
        assert entry.sampled.logprob == pytest.approx(float(expected), abs=1e-5)


# ------------------------------------------------------------------ grammar mask, min_tokens


def test_grammar_mask_is_respected():
    V = 40
    rng = np.random.default_rng(9)
    n = 300
    logits = torch.tensor(rng.normal(size=(n, V)).astype(np.float32) * 3)
    allowed_ids = [5, 17, 33]
    mask = torch.zeros(V, dtype=torch.bool)
    mask[allowed_ids] = True
    reqs = [make_request(f"r{i}", temperature=1.5, seed=i) for i in range(n)]
    out = Sampler(V)(logits, reqs, [mask] * n)
    assert set(out.token_ids) <= set(allowed_ids)
    assert len(set(out.token_ids)) == 3
    greedy = [make_request(f"g{i}", temperature=0.0) for i in range(n)]
    out = Sampler(V)(logits, greedy, [mask] * n)
    assert out.token_ids == [allowed_ids[int(np.argmax(row[allowed_ids]))]
                             for row in logits.numpy()]
    # A shorter mask disallows the missing tail; None leaves a row free.
    short = torch.ones(10, dtype=torch.bool)
    out = Sampler(V)(logits[:2], [make_request("s", temperature=0.0),
                                   make_request("t", temperature=0.0)], [short, None])
    assert out.token_ids[0] == int(np.argmax(logits[0, :10].numpy()))
    assert out.token_ids[1] == int(np.argmax(logits[1].numpy()))


def test_mask_allowing_nothing_raises_before_drawing():
    V = 10
    reqs = [make_request("ok", temperature=1.0, seed=1), make_request("bad", temperature=1.0)]
    masks = [None, torch.zeros(V, dtype=torch.bool)]
    with pytest.raises(NoAllowedTokenError) as err:
        Sampler(V)(torch.zeros(2, V), reqs, masks)
    assert err.value.request_id == "bad"
    assert all(r.sampler_state is None for r in reqs)


def test_min_tokens_bans_eos_and_stop_tokens():
    V = 6
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 8.0, 3.0]])
    r = make_request(eos=[3], temperature=0.0, min_tokens=2, stop_token_ids=[4])
    assert Sampler(V)(logits, [r]).token_ids == [5]
    r.output_token_ids = [5, 5]
    assert Sampler(V)(logits, [r]).token_ids == [3]
    r = make_request(eos=[3], output=[], temperature=0.0, min_tokens=2, ignore_eos=True)
    assert Sampler(V)(logits, [r]).token_ids == [3]
    # The grammar wins when it allows only banned tokens.
    only_eos = torch.tensor([False, False, False, True, False, False])
    r = make_request(eos=[3], temperature=0.0, min_tokens=2)
    assert Sampler(V)(logits, [r], [only_eos]).token_ids == [3]
