"""NIAH fidelity: does transformers, on the same GGUF, answer a NIAH cell as the server did?

A missed needle can be the model's limit or an engine fault (a RoPE, KV-cache or chunked-prefill
bug shows up first at long contexts). This script re-runs chosen cells of a finished
``openmini eval niah`` run with ``transformers`` (``from_pretrained(dir, gguf_file=...)``,
float32, greedy) on the SAME prompt token ids, rendered with OpenMini's tokenizer and chat
template from the GGUF, and compares:

- the prompt length with the server's ``usage.prompt_tokens`` for that cell;
- the needle's character offset with the one the run recorded (same haystack, same placement);
- the score (`openmini.evals.niah.score_answer`) of transformers' answer with the server's.

The haystack is rebuilt exactly as the run built it, from the run's ``token_counts.json``; every
count must already be there (the script asks no server). Prints a line per cell and exits 1 when
any cell's score or prompt length differs.

Cost: transformers prefills the whole prompt in float32 (about 2 minutes for a 4k-token cell of
Qwen2.5-0.5B on 2 cores, an hour or more at 32k).

Usage::

    .venv/bin/python evals/niah_fidelity.py --model qwen2.5-coder-0.5b-instruct \\
        --cells 4096:50 --out evals/results
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mmlu_fidelity import gguf_reference, load_transformers  # this script's neighbour in evals/
from openmini.evals import niah
from openmini.evals.data import dataset_path
from openmini.evals.tokens import ServerTokenCounter


class _NoServer:
    """Stands in for the OpenAI client: a token count missing from the cache is an error."""

    class chat:  # noqa: N801 - mirrors client.chat.completions
        class completions:  # noqa: N801
            @staticmethod
            def create(**_: object) -> None:
                raise SystemExit("a token count is missing from token_counts.json; "
                                 "run `openmini eval niah` for this length first")


def parse_cells(text: str) -> list[tuple[int, int]]:
    """``"4096:50,32000:100"`` -> [(4096, 50), (32000, 100)] (length in tokens, depth in %).

    Raises:
        argparse.ArgumentTypeError: an item is not ``LENGTH:DEPTH`` with integers.
    """
    cells = []
    for item in text.split(","):
        try:
            length, depth = item.split(":")
            cells.append((int(length), int(depth)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LENGTH:DEPTH, got {item!r}") from None
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="served model name (the run's folder name)")
    p.add_argument("--gguf", default=None, help="GGUF file (default: the registry model named --model)")
    p.add_argument("--cells", type=parse_cells, required=True, help="LENGTH:DEPTH[,LENGTH:DEPTH...]")
    p.add_argument("--out", default="evals/results", help="results folder of the NIAH run")
    p.add_argument("--max-new-tokens", type=int, default=64, help="answer budget (the run's --max-tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    run = Path(args.out) / "niah" / args.model
    if not (run / "results.jsonl").is_file():
        raise FileNotFoundError(f"no NIAH run to check: {run / 'results.jsonl'} does not exist")
    records = {}
    for line in (run / "results.jsonl").read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            records[(r["length"], r["depth"])] = r
    missing = [f"{length}:{depth}" for length, depth in args.cells if (length, depth) not in records]
    if missing:
        raise ValueError(f"cell(s) {', '.join(missing)} not in {run / 'results.jsonl'} "
                         f"(it has {', '.join(f'{a}:{b}' for a, b in sorted(records))})")
    counter = ServerTokenCounter(_NoServer(), args.model, niah.messages_for, run / "token_counts.json")
    source = niah.load_source(dataset_path("paul_graham_essays"))
    needle_tokens = counter.count(" " + niah.NEEDLE)

    gguf, tokenizer, template = gguf_reference(args.gguf or args.model)
    hf = load_transformers(gguf)
    failures = 0
    for length, depth in args.cells:
        server = records[(length, depth)]
        hay = niah.build_haystack(source, length - counter.overhead() - needle_tokens,
                                  counter.count, counter.count_many, batch=1)
        pos = niah.needle_position(hay, depth)
        ids = template.render_ids(niah.messages_for(niah.insert_needle(hay.text, pos)),
                                  add_generation_prompt=True)
        with torch.no_grad():
            out = hf.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True)
        score = niah.score_answer(answer)
        same = (score == server["score"] and len(ids) == server["prompt_tokens"]
                and pos == server["needle_char"])
        failures += not same
        print(f"{length}:{depth}  prompt tokens {len(ids)} (server {server['prompt_tokens']}), "
              f"needle at char {pos} (run {server['needle_char']}), "
              f"score {score} (server {server['score']})  {'same' if same else 'DIFFERENT'}")
        print(f"  transformers: {answer.strip()[:200]!r}")
        print(f"  server      : {server['answer'].strip()[:200]!r}")
    return 1 if failures else 0


if __name__ == "__main__":
    from openmini.evals.tasks import script_main

    raise SystemExit(script_main("niah_fidelity", main))
