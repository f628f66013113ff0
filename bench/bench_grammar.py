"""Per-decode-step cost of grammar-constrained decoding vs unconstrained decoding.

Two measurements on a real model (default: the embedded SmolLM2-135M; ``--model`` for Qwen):

1. Engine steps: B sequences decoding together (B = 1 and 8), median wall time of one decode
   step (``Engine.step()``) with no grammar, with a grammar that allows any text (the same
   tokens as unconstrained, so the difference is pure grammar overhead: mask fill, mask
   expansion, masking in the sampler, token acceptance), and with a JSON schema grammar;
   the three modes run interleaved for ``--rounds`` rounds, medians reported.
2. Grammar operations alone, per token, along a JSON output (one torch thread): fill the
   bitmask (llguidance), expand it to a bool mask, apply it to a row of logits (clone
   included), accept the token.
3. Budget-aware closing (``openmini.structured.closing``): the time of one closing plan
   at random points of JSON outputs, and the closer's cost per token over whole outputs
   with a budget (plans are recomputed only now and then, so this is the figure that
   adds to a decode step).

Usage: ``python bench/bench_grammar.py [--model NAME|PATH] [--steps 16] [--rounds 5]
[--threads 2] [--skip-steps]``.
Prints Markdown tables (docs/structured_outputs.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from openmini import LLM, SamplingParams
from openmini.sampling_params import JsonSchemaConstraint, StructuredOutputSpec

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string"}},
                "required": ["city", "zip"], "additionalProperties": False}},
    "required": ["name", "age", "tags", "address"], "additionalProperties": False}

FREE_TEXT = StructuredOutputSpec()  # start: TEXT (any text, special tokens but EOS masked)
JSON_SPEC = StructuredOutputSpec(answer=JsonSchemaConstraint(json.dumps(SCHEMA)))


def decode_step_ms(llm: LLM, batch: int, steps: int, spec: StructuredOutputSpec | None
                   ) -> float:
    """Median ms of one engine step while ``batch`` sequences decode (prefill excluded)."""
    engine = llm.engine
    tok = llm.get_tokenizer()
    prompt = engine.chat_template.render_ids(
        [{"role": "user", "content": "Describe a person as JSON with name, age, tags and "
                                     "address. Then explain."}])
    # keep going: unconstrained ignores EOS (greedy fast path untouched); a grammar accepts
    # EOS where it may end, so there EOS is pushed down with logit_bias
    eos_ban = {i: -100.0 for i in tok.eos_token_ids} if spec is not None else {}
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=spec is None,
                            logit_bias=eos_ban, structured_output=spec)
    ids = [f"bench-{time.monotonic_ns()}-{i}" for i in range(batch)]
    for rid in ids:
        engine.add_request(rid, prompt, params)
    times = []
    while engine.has_unfinished_requests():
        running = engine.scheduler.num_running
        decoding = all(r.num_computed_tokens >= r.num_prompt_tokens
                       for r in engine.scheduler.running) and running == batch
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - t0)
        if len(times) >= steps:
            for rid in ids:
                engine.abort_request(rid)
            break
    return 1000 * statistics.median(times) if times else float("nan")


def grammar_ops_us(llm: LLM, tokens: int = 200) -> dict[str, float]:
    """Median µs per token of each grammar operation along a random JSON output, with one
    torch thread (the work of one sequence; small multi-threaded ops only add sync cost)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _grammar_ops_us(llm, tokens)
    finally:
        torch.set_num_threads(threads)


def _grammar_ops_us(llm: LLM, tokens: int) -> dict[str, float]:
    engine = llm.engine
    backend = engine.structured
    m = backend.new_matcher(JSON_SPEC)
    V = engine.sampler.vocab_size
    logits = torch.randn(backend.mask_size)
    import numpy as np
    bitmask = np.zeros((backend.mask_size + 31) // 32, dtype=np.int32)
    fill, expand, apply, accept = [], [], [], []
    rng = torch.Generator().manual_seed(0)
    for _ in range(tokens):
        t0 = time.perf_counter()
        m.fill_bitmask(bitmask)
        t1 = time.perf_counter()
        mask = m.allowed_token_mask()[:V]
        t2 = time.perf_counter()
        row = logits[:V].clone()
        row.masked_fill_(~mask, float("-inf"))
        t3 = time.perf_counter()
        allowed = mask.nonzero().squeeze(1)
        tok = int(allowed[torch.randint(len(allowed), (), generator=rng)])
        t4 = time.perf_counter()
        ok = m.accept_token(tok)
        t5 = time.perf_counter()
        assert ok
        fill.append(t1 - t0)
        expand.append(t2 - t1 - (t1 - t0))  # allowed_token_mask also fills: subtract it
        apply.append(t3 - t2)
        accept.append(t5 - t4)
        if m.is_terminated():
            m = backend.new_matcher(JSON_SPEC)
    med = lambda xs: 1e6 * statistics.median(xs)  # noqa: E731
    return {"fill bitmask": med(fill), "expand to bool mask": max(med(expand), 0.0),
            "mask logits row": med(apply), "accept token": med(accept)}


def closing_us(llm: LLM, outputs: int = 40, max_tokens: int = 96) -> dict[str, float]:
    """Closing-plan cost along random walks through `SCHEMA` (llguidance work, single
    threaded): the median and
    90th percentile of one `plan_completion`, and the closer's mean µs per token (its
    ``restriction`` calls summed over a budgeted output, divided by the output's tokens)."""
    from openmini.structured.closing import JsonLexState, plan_completion
    backend = llm.engine.structured
    ll = backend.ll_tokenizer()
    eos = set(backend.eos_token_ids)
    rng = torch.Generator().manual_seed(1)
    plans, per_token = [], []
    for _ in range(outputs):
        m = backend.new_matcher(JSON_SPEC, max_tokens=max_tokens)
        spent, n = 0.0, 0
        while not m.is_terminated() and n < max_tokens:
            t0 = time.perf_counter()
            m.closer.restriction(m._matcher)
            spent += time.perf_counter() - t0
            if not m.closer.closing:
                t0 = time.perf_counter()
                plan_completion(m._matcher, m.closer.lex, m.closer.vocab, ll, max_tokens)
                plans.append(time.perf_counter() - t0)
            mask = m.allowed_token_mask()
            allowed = [t for t in mask.nonzero().squeeze(1).tolist() if t not in eos] or \
                mask.nonzero().squeeze(1).tolist()
            tok = allowed[int(torch.randint(len(allowed), (), generator=rng))]
            assert m.accept_token(tok)
            n += 1
            if tok in eos:
                break
        per_token.append(spent / max(n, 1))
    plans.sort()
    return {"one plan, median": 1e6 * statistics.median(plans),
            "one plan, p90": 1e6 * plans[int(0.9 * (len(plans) - 1))],
            "closer per token (mean)": 1e6 * statistics.mean(per_token)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-steps", action="store_true",
                    help="only the per-operation tables (no engine steps)")
    args = ap.parse_args()
    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads,
              kv_cache_memory=256 << 20)
    llm.engine.structured.ll_tokenizer()  # build the token view outside the timings
    print(f"## {args.model} (vocab {llm.engine.structured.mask_size}, dtype {args.dtype}, "
          f"{args.threads} threads)\n")
    print("| batch | unconstrained ms/step | any-text grammar ms/step (overhead) | "
          "JSON-schema grammar ms/step (overhead) |")
    print("|---|---|---|---|")
    for batch in (() if args.skip_steps else (1, 8)):
        decode_step_ms(llm, batch, 4, None)  # warm-up
        runs: dict[str, list[float]] = {"base": [], "free": [], "json": []}
        for _ in range(args.rounds):  # interleaved, so load changes hit every mode alike
            runs["base"].append(decode_step_ms(llm, batch, args.steps, None))
            runs["free"].append(decode_step_ms(llm, batch, args.steps, FREE_TEXT))
            runs["json"].append(decode_step_ms(llm, batch, args.steps, JSON_SPEC))
        base, free, js = (statistics.median(runs[k]) for k in ("base", "free", "json"))
        print(f"| {batch} | {base:.2f} | {free:.2f} ({100 * (free / base - 1):+.1f}%) | "
              f"{js:.2f} ({100 * (js / base - 1):+.1f}%) |")
    ops = grammar_ops_us(llm, 400)
    print("\n| grammar operation (one sequence, one token, 1 thread) | µs |")
    print("|---|---|")
    for name, us in ops.items():
        print(f"| {name} | {us:.0f} |")
    print(f"| total | {sum(ops.values()):.0f} |")
    closing = closing_us(llm)
    print("\n| budget-aware closing (1 thread) | µs |")
    print("|---|---|")
    for name, us in closing.items():
        print(f"| {name} | {us:.0f} |")


if __name__ == "__main__":
    main()
