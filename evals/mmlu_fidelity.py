"""MMLU fidelity: does OpenMini score the same as transformers on the same weights?

Scores the fixed stratified MMLU subset (``--per-subject 10`` = 570 questions) in the
``loglik`` mode of `openmini.evals.mmlu` twice ((b) is computed first, then (a)):

(a) through a live OpenMini server (records already in ``<out>/mmlu/<model>/results.jsonl``
    are reused; missing ones are asked for, so this also resumes the server run);
(b) with ``transformers`` running the SAME GGUF file (``from_pretrained(dir, gguf_file=...)``,
    float32) on the SAME prompt token ids, rendered with OpenMini's own tokenizer and chat
    template from the GGUF (as the server does; each prompt's length is checked against the
    server's ``usage.prompt_tokens``).

Both sides pick the letter the same way: log-softmax of the last position's logits, its top 20
tokens (the server's ``top_logprobs=20`` cut), the best logprob per letter among those tokens
whose text (the token's bytes as UTF-8) equals A/B/C/D after stripping whitespace, letters
outside the top 20 at -inf (`mmlu.letter_logprobs` / `mmlu.pick_letter`).

Prints both accuracies (percent), the per-question agreement, the difference (points) and the
largest letter-logprob gap; writes ``<out>/mmlu/<model>/fidelity.json`` (transformers'
per-question results are cached in ``fidelity_transformers.jsonl``, so reruns resume;
``--max-seconds`` bounds the transformers side and the comparison covers the questions both
sides have). Exit status 1 when |accuracy difference| > ``--max-diff`` (0.5 points), else 0.

Usage::

    .venv/bin/python evals/mmlu_fidelity.py --base-url http://127.0.0.1:8101/v1 \\
        --model smollm2-135m-instruct --out evals/results
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from openmini.evals import common, mmlu
from openmini.engine.engine import load_tokenizer
from openmini.loaders.model_files import load_model_files
from openmini.tokenizer.chat_template import ChatTemplate
from openmini.tokenizer.tokenizer import Tokenizer

TOP_K = 20


def server_records(args: argparse.Namespace, model: str, questions: list[mmlu.Question]) -> dict[int, dict]:
    """Loglik records of the server for ``questions`` (asking for the missing ones)."""
    log = common.ResultLog(common.run_dir(args, mmlu.TASK, model) / "results.jsonl")
    items = [(f"{q.index}:loglik", q) for q in questions]
    if not args.cached_only and any(i not in log.records for i, _ in items):
        client = common.make_client(args)
        common.run_items(items, lambda q: mmlu.ask(client, model, "loglik", 1, q), log,
                         args.concurrency, "server loglik")
    return {q.index: log.records[i] for i, q in items if i in log.records}


def gguf_reference(name: str) -> tuple[Path, Tokenizer, ChatTemplate]:
    """The GGUF file of ``name`` (registry name or path) with OpenMini's tokenizer and chat
    template read from it, as the server renders prompts. Shared with ``niah_fidelity.py``.

    Raises:
        SystemExit: ``name`` is not a GGUF model.
        FileNotFoundError: unknown name or path.
    """
    files = load_model_files(name, progress=False)
    if files.source.kind != "gguf":
        raise SystemExit(f"{files.source.path} is not a GGUF model")
    tokenizer = load_tokenizer(files)
    return Path(files.source.path), tokenizer, ChatTemplate(tokenizer.chat_template, tokenizer)


def load_transformers(gguf: Path):
    """``transformers`` causal LM on the same GGUF weights, dequantized to float32, eval mode."""
    from transformers import AutoModelForCausalLM

    print(f"loading {gguf} with transformers (float32)...", file=sys.stderr)
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                dtype=torch.float32).eval()


def transformers_records(args: argparse.Namespace, model: str, questions: list[mmlu.Question]) -> dict[int, dict]:
    """Letter logprobs from transformers on the GGUF (float32), one forward pass per question."""
    gguf, tokenizer, template = gguf_reference(args.gguf or model)
    log = common.ResultLog(common.run_dir(args, mmlu.TASK, model) / "fidelity_transformers.jsonl",
                           fresh=args.fresh)
    todo = [q for q in questions if str(q.index) not in log.records]
    if args.max_seconds is not None and args.max_seconds <= 0:
        todo = []  # compare what is cached, load nothing
    if todo:
        hf = load_transformers(gguf)
        text_cache: dict[int, str] = {}

        def text(token_id: int) -> str:
            if token_id not in text_cache:
                text_cache[token_id] = tokenizer.token_bytes(token_id).decode("utf-8", "replace")
            return text_cache[token_id]

        t0 = time.monotonic()
        for n, q in enumerate(todo, 1):
            if args.max_seconds is not None and time.monotonic() - t0 > args.max_seconds:
                print(f"--max-seconds reached after {n - 1} questions; rerun to resume", file=sys.stderr)
                break
            ids = template.render_ids([{"role": "user", "content": mmlu.render_prompt(q, "loglik")}],
                                      add_generation_prompt=True)
            with torch.no_grad():
                logits = hf(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            vals, top_ids = logprobs.topk(TOP_K)
            scores = mmlu.letter_logprobs((text(int(i)), float(v)) for v, i in zip(vals, top_ids))
            pred = mmlu.pick_letter(scores)
            log.append({"id": str(q.index), "index": q.index, "subject": q.subject, "answer": q.answer,
                        "pred": pred, "correct": pred == q.answer, "prompt_tokens": len(ids),
                        "argmax_token": text(int(top_ids[0])),
                        "letter_logprobs": {k: (None if v == -math.inf else v) for k, v in scores.items()}})
            if n % 25 == 0 or n == len(todo):
                el = time.monotonic() - t0
                print(f"transformers {n}/{len(todo)} ({el:.0f} s)", file=sys.stderr, flush=True)
    return {q.index: log.records[str(q.index)] for q in questions if str(q.index) in log.records}


def compare(server: dict[int, dict], hf: dict[int, dict]) -> dict:
    """Accuracies, agreement, difference and logprob gaps over the questions both sides have.

    Raises:
        ValueError: no question was scored by both sides.
    """
    common_ids = sorted(set(server) & set(hf))
    n = len(common_ids)
    if n == 0:
        raise ValueError(f"no question answered by both sides (server {len(server)}, transformers "
                         f"{len(hf)}); run the server side first, or drop --cached-only")
    acc_s = 100.0 * sum(bool(server[i]["correct"]) for i in common_ids) / n
    acc_h = 100.0 * sum(bool(hf[i]["correct"]) for i in common_ids) / n
    agree = sum(server[i]["pred"] == hf[i]["pred"] for i in common_ids)
    gaps = []
    len_mismatch = []
    for i in common_ids:
        if server[i].get("prompt_tokens") is not None and server[i]["prompt_tokens"] != hf[i]["prompt_tokens"]:
            len_mismatch.append(i)
        for letter in mmlu.LETTERS:
            a, b = server[i]["letter_logprobs"][letter], hf[i]["letter_logprobs"][letter]
            if a is not None and b is not None:
                gaps.append(abs(a - b))
    return {
        "n": n, "server_accuracy": acc_s, "transformers_accuracy": acc_h,
        "difference_points": acc_s - acc_h, "agreement": 100.0 * agree / n, "disagreements": n - agree,
        "disagreeing_questions": [i for i in common_ids if server[i]["pred"] != hf[i]["pred"]],
        "prompt_length_mismatches": len_mismatch,
        "max_letter_logprob_gap": max(gaps) if gaps else None,
        "mean_letter_logprob_gap": sum(gaps) / len(gaps) if gaps else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(p)
    p.add_argument("--gguf", default=None, help="GGUF file (default: the registry model named --model)")
    p.add_argument("--per-subject", type=int, default=10, help="questions per subject (10 -> 570)")
    p.add_argument("--max-diff", type=float, default=0.5, help="allowed |accuracy difference|, points")
    p.add_argument("--cached-only", action="store_true",
                   help="ask the server nothing: compare the records already in results.jsonl")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop the transformers side after this long (resumable; compares what is done)")
    args = p.parse_args(argv)
    if not args.model:
        args.model = common.resolve_model(common.make_client(args), None)
    questions = mmlu.select(mmlu.load_questions(), per_subject=args.per_subject, limit=args.limit)
    hf = transformers_records(args, args.model, questions)
    server = server_records(args, args.model, questions)
    for side, got in (("the server", server), ("transformers", hf)):
        if len(got) < len(questions):
            print(f"warning: {side} answered {len(got)} of {len(questions)} questions", file=sys.stderr)
    result = compare(server, hf)
    result.update(model=args.model, selected=len(questions), max_diff=args.max_diff)
    out = common.run_dir(args, mmlu.TASK, args.model) / "fidelity.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"MMLU loglik fidelity, {args.model}, {result['n']} questions")
    print(f"  OpenMini server : {result['server_accuracy']:.2f}%")
    print(f"  transformers    : {result['transformers_accuracy']:.2f}%")
    print(f"  difference      : {result['difference_points']:+.2f} points (limit ±{args.max_diff})")
    print(f"  agreement       : {result['agreement']:.2f}% ({result['disagreements']} questions differ)")
    print(f"  letter logprob gap: max {result['max_letter_logprob_gap']}, mean {result['mean_letter_logprob_gap']}")
    print(f"  prompt-length mismatches: {len(result['prompt_length_mismatches'])}")
    print(f"  written: {out}")
    return 1 if abs(result["difference_points"]) > args.max_diff else 0


if __name__ == "__main__":
    from openmini.evals.tasks import script_main

    raise SystemExit(script_main("mmlu_fidelity", main))
