"""Graphwalks: multi-hop reasoning over a long edge list, generated locally.

The format follows OpenAI's ``openai/graphwalks`` dataset card (2025): the prompt lists the
directed edges of a random graph, one ``source -> target`` line each, node ids of 10 lowercase
hex characters, after three worked examples; the operation is either

- ``bfs``: "Perform a BFS from node X with depth N." — the nodes whose shortest distance from X
  is exactly N (X itself excluded), or
- ``parents``: "Find the parents of node X." — the nodes with an edge into X.

The model ends its reply with ``Final Answer: [id1, id2, ...]``. Scoring, as on the card: F1
between the predicted and the true node sets (both empty -> 1.0; a missing or malformed final
line counts as the empty prediction). The prompt wording here is OpenMini's own.

Prompt lengths (``--lengths``, tokens) are reached by the number of edges, measured in the
served model's tokens through the server (see `tokens`). Problems come from a seeded generator
(``--seed``): the same flags and server give the same prompts.

Outputs in ``<out>/graphwalks/<model>/``: ``results.jsonl``, ``summary.json``, ``summary.md``.
"""

from __future__ import annotations

import argparse
import random
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from openmini.evals import common
from openmini.evals.tokens import ServerTokenCounter

PROBLEM_TYPES = ("bfs", "parents")
DEFAULT_LENGTHS = "1024,4096"
MAX_BFS_DEPTH = 3
EDGES_PER_NODE = 1.6  # mean out-degree of the generated graphs

INSTRUCTIONS = """\
You are given a directed graph as a list of edges, one per line, written `source -> target`. \
Every node appears in at least one edge. You are also given an operation to perform on the graph. \
Carry out the operation and return the set of nodes it produces.
- For a breadth-first search (BFS) from a node with depth N, return only the nodes whose shortest \
distance from the starting node is exactly N; do not include the starting node.
- For the parents of a node, return only the nodes that have an edge pointing to that node; do not \
include the node itself.
End your reply with a last line of the form `Final Answer: [node1, node2, ...]` \
(write `Final Answer: []` when the set is empty)."""


@dataclass(frozen=True)
class Graph:
    """A directed graph: ``edges`` in prompt order (no self-loops, no duplicates)."""

    nodes: tuple[str, ...]
    edges: tuple[tuple[str, str], ...]

    def text(self) -> str:
        """The edge list as prompt lines ``source -> target``."""
        return "\n".join(f"{a} -> {b}" for a, b in self.edges)


@dataclass(frozen=True)
class Problem:
    """One question: ``kind`` in `PROBLEM_TYPES`, the node asked about, BFS ``depth`` (0 for
    parents) and the true answer (sorted node ids)."""

    kind: str
    graph: Graph
    node: str
    depth: int
    answer: tuple[str, ...]

    def operation(self) -> str:
        if self.kind == "bfs":
            return f"Perform a BFS from node {self.node} with depth {self.depth}."
        return f"Find the parents of node {self.node}."


# ---- graphs and answers ---------------------------------------------------------------------

def node_ids(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct random ids of 10 lowercase hex characters."""
    seen: dict[str, None] = {}
    while len(seen) < n:
        seen.setdefault(f"{rng.getrandbits(40):010x}", None)
    return list(seen)


def random_graph(rng: random.Random, num_nodes: int, num_edges: int) -> Graph:
    """A random directed graph where every node has degree >= 1.

    A random tree with random edge directions touches every node (``num_nodes - 1`` edges);
    random extra edges follow up to ``num_edges`` (fewer if the graph is complete). The edge
    order is shuffled.
    """
    num_nodes = max(2, num_nodes)
    nodes = node_ids(rng, num_nodes)
    edges: dict[tuple[str, str], None] = {}
    for i in range(1, num_nodes):
        other = nodes[rng.randrange(i)]
        edges[(nodes[i], other) if rng.random() < 0.5 else (other, nodes[i])] = None
    limit = min(num_edges, num_nodes * (num_nodes - 1))
    while len(edges) < limit:
        a, b = rng.sample(nodes, 2)
        edges.setdefault((a, b), None)
    order = list(edges)
    rng.shuffle(order)
    return Graph(tuple(nodes), tuple(order))


def bfs_at_depth(edges: Iterable[tuple[str, str]], start: str, depth: int) -> set[str]:
    """Nodes whose shortest directed distance from ``start`` is exactly ``depth`` (>= 1)."""
    children: dict[str, list[str]] = {}
    for a, b in edges:
        children.setdefault(a, []).append(b)
    dist = {start: 0}
    queue = deque([start])
    while queue:
        u = queue.popleft()
        if dist[u] == depth:
            continue
        for v in children.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                queue.append(v)
    return {v for v, d in dist.items() if d == depth and v != start}


def parents_of(edges: Iterable[tuple[str, str]], node: str) -> set[str]:
    """Nodes with an edge into ``node`` (``node`` itself excluded)."""
    return {a for a, b in edges if b == node and a != node}


def make_problem(rng: random.Random, kind: str, num_edges: int) -> Problem:
    """A random problem of ``kind`` on a fresh graph of ``num_edges`` edges, with a non-empty
    answer when the graph allows one."""
    graph = random_graph(rng, round(num_edges / EDGES_PER_NODE) + 1, num_edges)
    candidates = list(graph.nodes)
    rng.shuffle(candidates)
    if kind == "parents":
        for node in candidates:
            ans = parents_of(graph.edges, node)
            if ans:
                return Problem(kind, graph, node, 0, tuple(sorted(ans)))
        node = candidates[0]
        return Problem(kind, graph, node, 0, tuple(sorted(parents_of(graph.edges, node))))
    if kind != "bfs":
        raise ValueError(f"unknown problem type {kind!r}")
    depth = rng.randint(1, MAX_BFS_DEPTH)
    for d in range(depth, 0, -1):  # the drawn depth, or a shallower one if nothing is that deep
        for node in candidates:
            ans = bfs_at_depth(graph.edges, node, d)
            if ans:
                return Problem(kind, graph, node, d, tuple(sorted(ans)))
    node = candidates[0]
    return Problem(kind, graph, node, 1, tuple(sorted(bfs_at_depth(graph.edges, node, 1))))


def examples() -> list[Problem]:
    """The three worked examples shown before every problem (fixed: their own seed)."""
    rng = random.Random("graphwalks-examples")
    return [make_problem(rng, "bfs", 7), make_problem(rng, "parents", 6), make_problem(rng, "bfs", 8)]


# ---- prompt ---------------------------------------------------------------------------------

def _block(graph_text: str, operation: str) -> str:
    return f"The graph has the following edges:\n{graph_text}\n\nOperation:\n{operation}"


def render_prompt(graph_text: str, operation: str, shots: Sequence[Problem] | None = None) -> str:
    """The user message: instructions, worked examples, then the graph and the operation."""
    parts = [INSTRUCTIONS, ""]
    for i, ex in enumerate(examples() if shots is None else shots, 1):
        parts += [f"Example {i}:", _block(ex.graph.text(), ex.operation()),
                  f"Final Answer: [{', '.join(ex.answer)}]", ""]
    parts += ["Now the real problem.", _block(graph_text, operation)]
    return "\n".join(parts)


def messages_for(graph_text: str, operation: str = "Find the parents of node 0123456789.",
                 shots: Sequence[Problem] | None = None) -> list[dict[str, str]]:
    """The chat prompt (one user message, as on the dataset card)."""
    return [{"role": "user", "content": render_prompt(graph_text, operation, shots)}]


# ---- answers --------------------------------------------------------------------------------

_FINAL = re.compile(r"Final Answer:[\s*_`]*\[([^\[\]]*)\]", re.IGNORECASE)


def parse_final_answer(text: str) -> list[str] | None:
    """Node ids of the last line that contains ``Final Answer:``; None when there is no such
    line or it carries no ``[...]`` list. Ids are stripped of spaces and quotes, lowercased."""
    lines = [ln for ln in (text or "").splitlines() if "final answer:" in ln.lower()]
    if not lines:
        return None
    m = _FINAL.search(lines[-1])
    if m is None:
        return None
    items = (item.strip().strip("'\"`*").strip().lower() for item in m.group(1).split(","))
    return [item for item in items if item]


def f1_score(predicted: Iterable[str], truth: Iterable[str]) -> float:
    """F1 of two node sets; 1.0 when both are empty, 0.0 when only one is."""
    p, t = set(predicted), set(truth)
    if not p and not t:
        return 1.0
    overlap = len(p & t)
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(p), overlap / len(t)
    return 2 * precision * recall / (precision + recall)


# ---- task -----------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``openmini eval graphwalks``."""
    common.add_common_args(p)
    p.add_argument("--lengths", type=common.int_list, default=common.int_list(DEFAULT_LENGTHS),
                   help=f"prompt lengths in the served model's tokens, approximate (default {DEFAULT_LENGTHS})")
    p.add_argument("--per-length", type=common.at_least(1), default=10, help="problems per type per length")
    p.add_argument("--types", default=",".join(PROBLEM_TYPES), help="problem types: bfs,parents")
    common.add_max_tokens(p, 256, "reply budget, tokens")


def edges_for_length(counter: ServerTokenCounter, length: int, sample: Graph) -> int:
    """Edges that bring the prompt to about ``length`` tokens (tokens per edge from ``sample``).

    Raises:
        ValueError: ``length`` cannot hold the prompt with a graph of 2 edges.
    """
    per_edge = counter.count(sample.text()) / max(1, len(sample.edges))
    shortest = counter.overhead() + 2 * per_edge
    if length < shortest:
        raise ValueError(f"length {length} is shorter than the shortest prompt (instructions, examples "
                         f"and a 2-edge graph: about {round(shortest)} tokens)")
    return max(2, int((length - counter.overhead()) / max(per_edge, 1e-6)))


def summarize(records: list[dict[str, Any]], lengths: Sequence[int], kinds: Sequence[str],
              model: str) -> tuple[dict[str, Any], str]:
    """(summary dict, Markdown table: rows = problem type, columns = length, cells = mean F1 %)."""
    def mean(xs: list[float]) -> float | None:
        return sum(xs) / len(xs) if xs else None

    cells: dict[str, dict[str, Any]] = {}
    for k in (*kinds, "all"):
        for L in (*lengths, "all"):
            rs = [r for r in records if (k == "all" or r["kind"] == k) and (L == "all" or r["length"] == L)]
            cells[f"{k}/{L}"] = {"f1": mean([r["f1"] for r in rs]), "n": len(rs),
                                 "malformed": sum(r["malformed"] for r in rs),
                                 "prompt_tokens": mean([r["prompt_tokens"] for r in rs if r.get("prompt_tokens")])}

    def pct(v: float | None) -> Any:
        return "-" if v is None else 100.0 * v

    rows = [[k] + [pct(cells[f"{k}/{L}"]["f1"]) for L in (*lengths, "all")] for k in (*kinds, "all")]
    rows.append(["malformed final line"] + [f"{cells[f'all/{L}']['malformed']}/{cells[f'all/{L}']['n']}"
                                            for L in (*lengths, "all")])
    rows.append(["mean prompt tokens"] + [
        "-" if cells[f"all/{L}"]["prompt_tokens"] is None else round(cells[f"all/{L}"]["prompt_tokens"])
        for L in (*lengths, "all")])
    table = common.markdown_table(["F1 % \\ length (tokens)", *map(str, lengths), "all"], rows)
    overall = cells["all/all"]["f1"]
    overall_text = "-" if overall is None else f"{100 * overall:.1f}"
    md = (f"Graphwalks — model `{model}`: mean F1 between predicted and true node sets, in %; "
          f"overall {overall_text} over {len(records)} problems\n\n{table}")
    summary = {"task": "graphwalks", "model": model, "lengths": list(lengths), "types": list(kinds),
               "f1": overall, "problems": len(records), "cells": cells}
    return summary, md


def run(args: argparse.Namespace) -> int:
    """``openmini eval graphwalks``: generate, ask, score (resumable); write the summary."""
    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in PROBLEM_TYPES]
    if unknown:
        raise ValueError(f"unknown problem type(s) {unknown}; choose from {', '.join(PROBLEM_TYPES)}")
    client = common.make_client(args)
    model = common.resolve_model(client, args.model)
    out = common.run_dir(args, "graphwalks", model)
    log = common.ResultLog(out / "results.jsonl", fresh=args.fresh)
    keys = [(L, k, i) for L in args.lengths for k in kinds for i in range(args.per_length)][:args.limit]
    common.require_items(keys, "problem")

    def item_id(L: int, k: str, i: int) -> str:
        return f"len{L}-{k}-{i}-seed{args.seed}"

    todo = [key for key in keys if item_id(*key) not in log.records]
    problems: dict[tuple[int, str, int], Problem] = {}
    if todo:
        common.check_lengths_fit(client, model, sorted({k[0] for k in todo}), args.max_tokens)
        counter = ServerTokenCounter(client, model, messages_for, out / "token_counts.json", args.concurrency)
        sample = random_graph(random.Random(f"graphwalks-sample-{args.seed}"), 40, 64)
        num_edges = {L: edges_for_length(counter, L, sample) for L in sorted({k[0] for k in todo})}
        counter.save()
        for L, k, i in todo:
            problems[(L, k, i)] = make_problem(random.Random(f"graphwalks-{args.seed}-{L}-{k}-{i}"), k, num_edges[L])

    def run_one(key: tuple[int, str, int]) -> dict[str, Any]:
        prob = problems[key]
        resp = client.chat.completions.create(model=model, messages=messages_for(prob.graph.text(), prob.operation()),
                                              temperature=0, max_tokens=args.max_tokens)
        reply = resp.choices[0].message.content or ""
        parsed = parse_final_answer(reply)
        return {"length": key[0], "kind": key[1], "index": key[2], "node": prob.node, "depth": prob.depth,
                "num_edges": len(prob.graph.edges), "num_nodes": len(prob.graph.nodes),
                "prompt_tokens": resp.usage.prompt_tokens if resp.usage else None,
                "answer": list(prob.answer), "predicted": parsed or [], "malformed": parsed is None,
                "f1": f1_score(parsed or [], prob.answer), "reply": reply}

    records, errors = common.run_items([(item_id(*key), key) for key in keys], run_one, log,
                                       args.concurrency, f"graphwalks {model}")
    common.require_scored(records, errors, "item")
    lengths = [L for L in args.lengths if any(key[0] == L for key in keys)]
    summary, md = summarize(records, lengths, kinds, model)
    summary["errors"] = len(errors)
    summary["seed"] = args.seed
    common.write_summary(out, summary, md)
    return 1 if errors else 0
