"""Turn a batch of logits into one next token per request.

Order of the transforms for one row (vLLM / OpenAI conventions):

1. Logprobs are taken from ``log_softmax`` of the RAW logits (before any transform below),
   as OpenAI reports the model's own distribution, not the sampling distribution.
2. ``logit_bias``: additive, OpenAI ``logit_bias`` (-100 effectively bans, +100 forces).
3. Repetition penalty: the penalized sampling of CTRL (Keskar et al. 2019, "CTRL: A
   Conditional Transformer Language Model for Controllable Generation") in the sign-aware
   form of HF transformers / vLLM: over the SET of prompt + output tokens, positive logits
   are divided by the penalty and negative ones multiplied by it.
4. Presence / frequency penalties over OUTPUT tokens, OpenAI's formula (OpenAI API docs,
   "Frequency and presence penalties"):
   ``logit -= frequency_penalty * count + presence_penalty * (count > 0)``.
5. Allowed-token mask: the grammar mask (disallowed -> -inf), intersected with the
   ``min_tokens`` ban of EOS / stop token ids while fewer than ``min_tokens`` tokens were
   generated (vLLM's convention; the ban yields to the grammar when both together would
   allow nothing).
6. Greedy rows (``temperature < 1e-5``): argmax.
   Other rows: temperature scaling, top-k, top-p (nucleus, Holtzman et al. 2019, "The
   Curious Case of Neural Text Degeneration"), min-p (Nguyen et al. 2024, "Turning Up the
   Heat: Min-p Sampling for Creative and Coherent LLM Outputs"), then one draw from the
   renormalized distribution with the request's own generator.

Tie rules (all tie-inclusive, so the kept set never depends on the order of equal logits):
top-k keeps every token whose logit is >= the k-th largest; top-p keeps token t iff the
mass of the tokens strictly more likely than t is < top_p (the smallest set whose mass is
>= top_p, widened by ties; the most likely token always stays); min-p keeps t iff
``p_t >= min_p * p_max``.

Determinism: each request owns a ``torch.Generator`` (in ``request.sampler_state``) seeded
with ``seed + index`` (or with a seed drawn from the sampler's own engine-level generator
when the request has no seed) and draws exactly one uniform per sampled token from it. A
row's token therefore depends only on that row's logits and that row's generator, so a
seeded request gives the same tokens alone or batched with others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openmini.engine.request import Request
from openmini.outputs import Logprob, TokenLogprobs
from openmini.sampling_params import SamplingParams

# Top-p looks for the nucleus among the 1024 most likely tokens (one cheap ``topk``), then
# among 16384 for rows whose nucleus is wider, and sorts the whole row only after that.
_TOP_P_WIDTHS = (1024, 16384)
_SEED_MODULUS = 1 << 64


class NoAllowedTokenError(ValueError):
    """The allowed-token (grammar) mask of a request allows no token at all.

    Attributes:
        request_id: the engine id of the offending request.
    """

    def __init__(self, request_id: str):
        super().__init__(
            f"The allowed-token mask of request {request_id!r} allows no token; "
            "the grammar cannot continue.")
        self.request_id = request_id


@dataclass
class SamplerOutput:
    """Result of one sampler call, in batch order.

    Attributes:
        token_ids: the chosen token id of each row.
        logprobs: per row, the sampled token's log-probability and the top alternatives
            when the request asked for logprobs, else None. ``decoded`` is left "" (the
            output processor fills it).
    """

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass
class SamplerState:
    """What the sampler keeps per request (stored in ``Request.sampler_state``).

    Attributes:
        generator: CPU ``torch.Generator`` that draws this request's uniforms; created on
            the first sampled (non-greedy) token.
        prompt_tokens: ``[P]`` int64, the distinct prompt token ids (cached for the
            repetition penalty; rebuilt if the prompt's length changes).
        num_prompt_tokens: prompt length when ``prompt_tokens`` was built.
    """

    generator: torch.Generator | None = None
    prompt_tokens: torch.Tensor | None = None
    num_prompt_tokens: int = -1


# --------------------------------------------------------------------------- transforms
#
# Each transform edits ``logits`` IN PLACE and returns it. Rows that a transform leaves
# untouched cost nothing; when only some rows are active, those rows are gathered, edited
# and written back.


def apply_logit_bias(logits: torch.Tensor, rows: list[int],
                     biases: list[dict[int, float]]) -> torch.Tensor:
    """Add OpenAI ``logit_bias`` values in place.

    Args:
        logits: ``[B, V]`` float32, modified in place and returned.
        rows: the rows of ``logits`` that ``biases`` describe.
        biases: one ``{token_id: bias}`` dict per entry of ``rows``. Ids outside ``[0, V)``
            are ignored (the API layer validates them against the tokenizer).
    """
    V = logits.shape[1]
    row_idx, cols, vals = [], [], []
    for r, bias in zip(rows, biases):
        for tok, b in bias.items():
            if 0 <= tok < V:
                row_idx.append(r)
                cols.append(tok)
                vals.append(b)
    if row_idx:
        dev = logits.device
        logits.index_put_(
            (torch.tensor(row_idx, device=dev), torch.tensor(cols, device=dev)),
            torch.tensor(vals, dtype=logits.dtype, device=dev), accumulate=True)
    return logits


def _flat_index(rows: list[int], token_tensors: list[torch.Tensor], V: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in the flattened ``[B * V]`` logits of every listed token.

    Args:
        rows: batch row of each entry of ``token_tensors``.
        token_tensors: per entry, int64 token ids (repeats allowed; ids outside [0, V)
            are dropped).

    Returns:
        ``(entry, index)``: ``[N]`` entry number of each token (CPU) and ``[N]`` flat index
        ``row * V + token_id`` (on ``device``).
    """
    ids = torch.cat(token_tensors)  # [N]
    entry = torch.repeat_interleave(torch.arange(len(token_tensors)),
                                    torch.tensor([t.numel() for t in token_tensors],
                                                 dtype=torch.long))  # [N]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        keep = (ids >= 0) & (ids < V)
        entry, ids = entry[keep], ids[keep]
    return entry, (torch.tensor(rows, dtype=torch.long)[entry] * V + ids).to(device)


def apply_penalties(logits: torch.Tensor, rows: list[int], prompt_tokens: list[torch.Tensor],
                    output_tokens: list[torch.Tensor], repetition_penalty: torch.Tensor,
                    presence_penalty: torch.Tensor,
                    frequency_penalty: torch.Tensor) -> torch.Tensor:
    """Repetition (CTRL) then presence / frequency (OpenAI) penalties, in place.

    Only the logits of tokens that occurred are touched (gathers and scatters over the
    flattened logits), so the cost grows with the number of tokens, not with V. A token
    listed several times is gathered several times; the set-based steps write the same
    value for every copy, the frequency step accumulates one ``frequency`` per copy.

    Args:
        logits: ``[B, V]`` float32, contiguous; modified in place and returned.
        rows: the rows of ``logits`` the other arguments describe (R of them).
        prompt_tokens / output_tokens: per row, int64 prompt and generated token ids.
        repetition_penalty: ``[R]``; 1.0 disables. Over the SET of prompt + output tokens:
            ``x / rp`` where ``x > 0`` else ``x * rp`` (Keskar et al. 2019).
        presence_penalty / frequency_penalty: ``[R]``; over output tokens:
            ``x -= frequency * count + presence * (count > 0)`` (OpenAI).
    """
    V = logits.shape[1]
    flat = logits.view(-1)  # [B * V]
    dev = logits.device
    rp = repetition_penalty.to(torch.float32)  # [R]
    if bool((rp != 1.0).any()):
        entry, idx = _flat_index(rows + rows, prompt_tokens + output_tokens, V, dev)  # [N]
        r = rp[entry % len(rows)].to(dev)  # [N]
        vals = flat[idx]
        flat[idx] = torch.where(vals > 0, vals / r, vals * r)
    entry, idx = _flat_index(rows, output_tokens, V, dev)  # [N] one per generated token
    if idx.numel():
        presence = presence_penalty.to(torch.float32)[entry].to(dev)  # [N]
        frequency = frequency_penalty.to(torch.float32)[entry].to(dev)  # [N]
        flat[idx] = flat[idx] - presence  # same value for every copy: applied once
        flat.index_put_((idx,), -frequency, accumulate=True)  # once per occurrence
    return logits


def _active_rows(mask: torch.Tensor) -> torch.Tensor | None:
    """Row indices where ``mask`` holds, or None when it holds for every row."""
    return None if bool(mask.all()) else mask.nonzero().squeeze(1)


def _edit_rows(logits: torch.Tensor, rows: torch.Tensor | None, edit) -> torch.Tensor:
    """Apply the in-place ``edit`` to ``logits[rows]`` (all rows when None)."""
    if rows is None:
        edit(logits)
    else:
        sub = logits[rows]
        edit(sub)
        logits[rows] = sub
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep, per row, every token whose logit is >= the row's k-th largest logit (in place).

    Args:
        logits: ``[S, V]`` float32; modified in place and returned.
        top_k: ``[S]`` int; ``k <= 0`` or ``k >= V`` leaves the row untouched.

    Returns:
        ``logits`` with dropped tokens at -inf (ties at the k-th value are kept).
    """
    V = logits.shape[1]
    top_k = top_k.to(logits.device).long()
    on = (top_k > 0) & (top_k < V)  # [S]
    if not bool(on.any()):
        return logits
    rows = _active_rows(on)
    k = top_k if rows is None else top_k[rows]  # [A]

    def edit(x: torch.Tensor) -> None:  # x: [A, V]
        top_vals = x.topk(int(k.max()), dim=1).values  # [A, kmax], descending
        kth = top_vals.gather(1, (k - 1).unsqueeze(1))  # [A, 1]
        x.masked_fill_(x < kth, float("-inf"))

    return _edit_rows(logits, rows, edit)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2019) of the softmax of each row (in place).

    Keeps token t iff the probability mass of the tokens strictly more likely than t is
    < top_p: the smallest set with mass >= top_p, plus tokens tied with its least likely
    member. The most likely token always stays.

    Args:
        logits: ``[S, V]`` float32 (may hold -inf); modified in place and returned.
        top_p: ``[S]`` float; ``top_p >= 1`` leaves the row untouched.

    Returns:
        ``logits`` with dropped tokens at -inf.
    """
    V = logits.shape[1]
    top_p = top_p.to(logits.device, torch.float32)
    on = top_p < 1.0  # [S]
    if not bool(on.any()):
        return logits
    rows = _active_rows(on)
    p = (top_p if rows is None else top_p[rows]).unsqueeze(1)  # [A, 1]

    def edit(x: torch.Tensor) -> None:  # x: [A, V]
        lse = torch.logsumexp(x, dim=1, keepdim=True)  # [A, 1]
        threshold = torch.empty_like(lse)  # [A, 1] logit of the nucleus' least likely token
        todo = torch.arange(x.shape[0], device=x.device)  # rows still to resolve
        widths = iter([w for w in _TOP_P_WIDTHS if w < V] + [V])
        while todo.numel() > 0:
            width = next(widths)
            rows_left = x if todo.numel() == x.shape[0] else x[todo]  # [T, V]
            vals = rows_left.topk(width, dim=1).values  # [T, width], descending
            mass = (vals - lse[todo]).exp().cumsum(dim=1)  # [T, width]
            # The nucleus ends at the first position whose cumulative mass reaches top_p.
            done = (mass[:, -1:] >= p[todo]).squeeze(1) | (width == V)  # [T]
            end = (mass < p[todo]).sum(dim=1, keepdim=True).clamp(max=width - 1)  # [T, 1]
            threshold[todo[done]] = vals.gather(1, end)[done]
            todo = todo[~done]  # nucleus wider than the candidates: look further
        x.masked_fill_(x < threshold, float("-inf"))

    return _edit_rows(logits, rows, edit)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Min-p filtering (Nguyen et al. 2024): drop tokens with ``p < min_p * p_max`` (in place).

    Computed in the logit domain: keep t iff ``x_t >= x_max + log(min_p)``.

    Args:
        logits: ``[S, V]`` float32; modified in place and returned.
        min_p: ``[S]`` float in [0, 1]; 0 leaves the row untouched.

    Returns:
        ``logits`` with dropped tokens at -inf.
    """
    min_p = min_p.to(torch.float64)
    on = min_p > 0  # [S]
    if not bool(on.any()):
        return logits
    rows = _active_rows(on)
    log_min_p = (min_p if rows is None else min_p[rows]).log()  # [A]
    log_min_p = log_min_p.to(logits.device, logits.dtype).unsqueeze(1)  # [A, 1]

    def edit(x: torch.Tensor) -> None:  # x: [A, V]
        threshold = x.max(dim=1, keepdim=True).values + log_min_p  # [A, 1]
        x.masked_fill_(x < threshold, float("-inf"))

    return _edit_rows(logits, rows if rows is None else rows.to(logits.device), edit)


def sample_from_logits(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from ``softmax(logits)`` of each row with one uniform per row.

    Args:
        logits: ``[S, V]`` float32 with at least one finite entry per row (not modified).
        uniforms: ``[S]`` float64 in [0, 1).

    Returns:
        ``[S]`` int64 token ids; a token with probability 0 is never returned.
    """
    cdf = torch.softmax(logits, dim=1).cumsum_(dim=1)  # [S, V] (float64 accumulation on CPU)
    total = cdf[:, -1:].contiguous()  # [S, 1]
    target = (uniforms.to(cdf.device).unsqueeze(1) * total.double()).to(cdf.dtype)  # [S, 1]
    idx = torch.searchsorted(cdf, target, right=True)  # [S, 1] first index with cdf > target
    # Rounding can push target up to the total: take the last token with mass instead.
    last = torch.searchsorted(cdf, total, right=False)  # [S, 1]
    idx = torch.where(idx >= logits.shape[1], last, idx)
    return idx.squeeze(1)


# --------------------------------------------------------------------------- sampler


def _has_penalty(params: SamplingParams) -> bool:
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]``, without a copy when ``rows`` is every row in order."""
    return x if rows == list(range(x.shape[0])) else x[rows]


class Sampler:
    """Batched next-token selection with per-request seeded generators.

    Args:
        vocab_size: tokens the tokenizer can produce; logits columns at or beyond it
            (padding of the LM head) are ignored.
        base_seed: seed of the engine-level generator that seeds requests without their own
            ``seed`` (``EngineConfig.seed``).

    See the module docstring for the order of transforms, tie rules and determinism.
    """

    def __init__(self, vocab_size: int, base_seed: int = 0):
        self.vocab_size = vocab_size
        self._seed_generator = torch.Generator().manual_seed(base_seed % _SEED_MODULUS)

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 allowed_token_masks: list[torch.Tensor | None] | None = None
                 ) -> SamplerOutput:
        """Pick one token per row.

        Args:
            logits: ``[B, W]`` float32, ``W >= vocab_size`` (extra columns are padding).
                Not modified.
            requests: the B requests, in row order.
            allowed_token_masks: per row, a bool ``[V]`` mask of allowed tokens (the grammar
                bitmask) or None. A shorter mask disallows the missing tail; a longer one
                is cut at ``vocab_size``.

        Returns:
            SamplerOutput with B token ids and B logprob entries.

        Raises:
            NoAllowedTokenError: a mask allows no token (raised before any generator
                advances, so the step can be retried without that request).
            ValueError: the number of rows and requests differ.
        """
        B = len(requests)
        if logits.shape[0] != B:
            raise ValueError(f"logits have {logits.shape[0]} rows for {B} requests.")
        V = min(self.vocab_size, logits.shape[1])
        raw = logits[:, :V]  # [B, V]
        params = [r.sampling_params for r in requests]
        allowed = self._allowed_masks(requests, allowed_token_masks, V, raw.device)

        # Common case: one batched argmax, no per-row tensor work.
        if not allowed and all(p.greedy and not p.logit_bias and not _has_penalty(p)
                               and p.logprobs is None for p in params):
            return SamplerOutput(raw.argmax(dim=1).tolist(), [None] * B)

        x = raw.to(torch.float32, copy=True).contiguous()  # [B, V] working copy
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = (torch.log_softmax(_take(x, lp_rows), dim=1)
                        if lp_rows else None)  # [L, V]

        bias_rows = [i for i, p in enumerate(params) if p.logit_bias]
        if bias_rows:
            apply_logit_bias(x, bias_rows, [params[i].logit_bias for i in bias_rows])

        pen_rows = [i for i, p in enumerate(params) if _has_penalty(p)]
        if pen_rows:
            def col(name: str) -> torch.Tensor:
                return torch.tensor([getattr(params[i], name) for i in pen_rows])
            need_prompt = any(params[i].repetition_penalty != 1.0 for i in pen_rows)
            apply_penalties(
                x, pen_rows,
                [self._prompt_tokens(requests[i]) if need_prompt
                 else torch.empty(0, dtype=torch.long)
                 for i in pen_rows],
                [torch.tensor(requests[i].output_token_ids, dtype=torch.long)
                 for i in pen_rows],
                col("repetition_penalty"), col("presence_penalty"), col("frequency_penalty"))

        for i, mask in allowed.items():
            x[i].masked_fill_(~mask, float("-inf"))

        tokens = torch.empty(B, dtype=torch.long, device=x.device)  # [B]
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        if greedy_rows:
            tokens[greedy_rows] = _take(x, greedy_rows).argmax(dim=1)
        sample_rows = [i for i, p in enumerate(params) if not p.greedy]
        if sample_rows:
            sub = _take(x, sample_rows)  # [S, V]; x is ours, editing it in place is fine
            tokens[sample_rows] = self._sample(sub, [requests[i] for i in sample_rows])

        token_ids = tokens.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * B
        if lp_rows:
            entries = _gather_logprobs(raw_logprobs, tokens[lp_rows],
                                       [params[i].logprobs for i in lp_rows])
            for i, entry in zip(lp_rows, entries):
                logprobs[i] = entry
        return SamplerOutput(token_ids, logprobs)

    # ----------------------------------------------------------------------- helpers

    def _allowed_masks(self, requests: list[Request],
                       masks: list[torch.Tensor | None] | None, V: int,
                       device: torch.device) -> dict[int, torch.Tensor]:
        """Row -> bool ``[V]`` allowed mask (grammar mask & min_tokens ban), only rows with one.

        Raises:
            NoAllowedTokenError: a grammar mask allows nothing.
        """
        out: dict[int, torch.Tensor] = {}
        for i, r in enumerate(requests):
            grammar = masks[i] if masks is not None else None
            if grammar is not None:
                grammar = grammar.to(device=device, dtype=torch.bool).reshape(-1)[:V]  # [<=V]
                if grammar.shape[0] < V:
                    grammar = torch.cat([grammar, grammar.new_zeros(V - grammar.shape[0])])
                if not bool(grammar.any()):
                    raise NoAllowedTokenError(r.request_id)
            ban = _min_tokens_ban(r, V)
            if not ban:
                if grammar is not None:
                    out[i] = grammar
                continue
            not_banned = torch.ones(V, dtype=torch.bool, device=device)  # [V]
            not_banned[ban] = False
            combined = not_banned if grammar is None else grammar & not_banned
            if bool(combined.any()):
                out[i] = combined
            elif grammar is not None:
                out[i] = grammar  # the grammar wins over min_tokens
        return out

    @staticmethod
    def _state(request: Request) -> SamplerState:
        if request.sampler_state is None:
            request.sampler_state = SamplerState()
        return request.sampler_state

    def _prompt_tokens(self, request: Request) -> torch.Tensor:
        """Distinct prompt token ids ``[P]`` int64, cached in the request's state."""
        state = self._state(request)
        if state.prompt_tokens is None or state.num_prompt_tokens != request.num_prompt_tokens:
            state.prompt_tokens = torch.unique(
                torch.tensor(request.prompt_token_ids, dtype=torch.long))
            state.num_prompt_tokens = request.num_prompt_tokens
        return state.prompt_tokens

    def _generator(self, request: Request) -> torch.Generator:
        """The request's generator, created on first use (see module docstring)."""
        state = self._state(request)
        if state.generator is None:
            seed = request.sampling_params.seed
            if seed is None:
                seed = int(torch.randint(0, 1 << 62, (), generator=self._seed_generator))
            else:
                seed = seed + request.index
            state.generator = torch.Generator().manual_seed(seed % _SEED_MODULUS)
        return state.generator

    def _sample(self, x: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then one draw per row.

        Args:
            x: ``[S, V]`` float32 processed logits; overwritten.
            requests: the S requests.

        Returns:
            ``[S]`` int64 token ids.
        """
        params = [r.sampling_params for r in requests]
        V = x.shape[1]
        temps = torch.tensor([p.temperature for p in params], dtype=x.dtype)  # [S]
        if bool((temps != 1.0).any()):
            x.div_(temps.to(x.device).unsqueeze(1))
        if any(0 < p.top_k < V for p in params):
            apply_top_k(x, torch.tensor([p.top_k for p in params]))
        if any(p.top_p < 1.0 for p in params):
            apply_top_p(x, torch.tensor([p.top_p for p in params]))
        if any(p.min_p > 0 for p in params):
            apply_min_p(x, torch.tensor([p.min_p for p in params], dtype=torch.float64))
        uniforms = torch.tensor(
            [torch.rand((), dtype=torch.float64, generator=self._generator(r)).item()
             for r in requests], dtype=torch.float64)  # [S]
        return sample_from_logits(x, uniforms)


def _min_tokens_ban(request: Request, V: int) -> list[int]:
    """EOS / stop token ids to ban while fewer than ``min_tokens`` tokens were generated."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return []
    ban = set(params.stop_token_ids)
    if not params.ignore_eos:
        ban |= set(request.eos_token_ids)
    return sorted(t for t in ban if 0 <= t < V)


def _gather_logprobs(logprobs: torch.Tensor, sampled: torch.Tensor,
                     num_top: list[int]) -> list[TokenLogprobs]:
    """Sampled-token logprob and top-k alternatives per row.

    Args:
        logprobs: ``[L, V]`` log_softmax of the raw logits.
        sampled: ``[L]`` chosen token ids.
        num_top: per row, how many alternatives (0..20), most likely first.
    """
    sampled_lp = logprobs.gather(1, sampled.unsqueeze(1)).squeeze(1).tolist()  # [L]
    kmax = min(max(num_top), logprobs.shape[1])
    top_vals, top_ids = (logprobs.topk(kmax, dim=1) if kmax > 0
                         else (logprobs[:, :0], logprobs[:, :0].long()))  # [L, kmax]
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    out = []
    for r, (tok, lp, k) in enumerate(zip(sampled.tolist(), sampled_lp, num_top)):
        top = [Logprob(t, v) for t, v in zip(top_ids[r][:k], top_vals[r][:k])]
        out.append(TokenLogprobs(sampled=Logprob(tok, lp), top=top))
    return out


__all__ = [
    "NoAllowedTokenError", "Sampler", "SamplerOutput", "SamplerState", "apply_logit_bias",
    "apply_min_p", "apply_penalties", "apply_top_k", "apply_top_p", "sample_from_logits",
]
