"""`openmini eval graphwalks`: the generator checked against an independent reachability
computation (boolean adjacency matrix, level by level), the prompt, Final Answer parsing, F1,
and one end-to-end run on the tiny random model."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest

from openmini.cli import main
from openmini.evals import graphwalks as gw


def matrix_levels(graph: gw.Graph, start: str, depth: int) -> set[str]:
    """Independent reference: frontier vectors of the boolean adjacency matrix, ``depth`` times
    (v_k = A^T v_{k-1} minus everything seen before)."""
    index = {n: i for i, n in enumerate(graph.nodes)}
    adj = np.zeros((len(index), len(index)), dtype=bool)
    for a, b in graph.edges:
        adj[index[a], index[b]] = True
    seen = np.zeros(len(index), dtype=bool)
    seen[index[start]] = True
    frontier = seen.copy()
    for _ in range(depth):
        frontier = (adj.T.astype(np.int64) @ frontier.astype(np.int64) > 0) & ~seen
        seen |= frontier
    return {graph.nodes[i] for i in np.flatnonzero(frontier)}


def matrix_parents(graph: gw.Graph, node: str) -> set[str]:
    index = {n: i for i, n in enumerate(graph.nodes)}
    adj = np.zeros((len(index), len(index)), dtype=bool)
    for a, b in graph.edges:
        adj[index[a], index[b]] = True
    return {graph.nodes[i] for i in np.flatnonzero(adj[:, index[node]])} - {node}


# ---- generator ------------------------------------------------------------------------------

@pytest.mark.parametrize("num_nodes,num_edges", [(2, 1), (5, 4), (12, 20), (40, 64), (6, 100)])
def test_random_graph_shape(num_nodes, num_edges):
    g = gw.random_graph(random.Random(num_edges), num_nodes, num_edges)
    assert len(g.nodes) == num_nodes == len(set(g.nodes))
    assert all(re.fullmatch(r"[0-9a-f]{10}", n) for n in g.nodes)
    assert len(g.edges) == min(num_edges, num_nodes * (num_nodes - 1)) == len(set(g.edges))
    assert all(a != b for a, b in g.edges)
    touched = {a for a, _ in g.edges} | {b for _, b in g.edges}
    assert touched == set(g.nodes)  # every node has degree >= 1


def test_generator_is_deterministic():
    a = gw.make_problem(random.Random("s-1"), "bfs", 50)
    b = gw.make_problem(random.Random("s-1"), "bfs", 50)
    c = gw.make_problem(random.Random("s-2"), "bfs", 50)
    assert a == b and a != c


@pytest.mark.parametrize("kind", gw.PROBLEM_TYPES)
def test_problem_answers_match_independent_computation(kind):
    depths = set()
    for i in range(60):
        p = gw.make_problem(random.Random(i), kind, 10 + 7 * i)
        assert p.answer, "the generator picks a question with a non-empty answer"
        assert list(p.answer) == sorted(p.answer)
        if kind == "bfs":
            assert 1 <= p.depth <= gw.MAX_BFS_DEPTH
            assert set(p.answer) == matrix_levels(p.graph, p.node, p.depth)
            assert p.node not in p.answer
            depths.add(p.depth)
        else:
            assert set(p.answer) == matrix_parents(p.graph, p.node)
    if kind == "bfs":
        assert depths == {1, 2, 3}


def test_bfs_and_parents_on_a_hand_made_graph():
    edges = [("a", "b"), ("a", "c"), ("b", "d"), ("c", "d"), ("d", "a"), ("d", "e"), ("e", "f")]
    assert gw.bfs_at_depth(edges, "a", 1) == {"b", "c"}
    assert gw.bfs_at_depth(edges, "a", 2) == {"d"}
    assert gw.bfs_at_depth(edges, "a", 3) == {"e"}   # "a" is at distance 0, never again
    assert gw.bfs_at_depth(edges, "a", 5) == set()
    assert gw.parents_of(edges, "d") == {"b", "c"}
    assert gw.parents_of(edges, "a") == {"d"}


def test_examples_are_correct_and_in_the_prompt():
    shots = gw.examples()
    assert [s.kind for s in shots] == ["bfs", "parents", "bfs"]
    for s in shots:
        ref = matrix_levels(s.graph, s.node, s.depth) if s.kind == "bfs" else matrix_parents(s.graph, s.node)
        assert set(s.answer) == ref
    prob = gw.make_problem(random.Random(3), "parents", 30)
    text = gw.render_prompt(prob.graph.text(), prob.operation())
    assert text.count("Final Answer: [") == 5  # 3 examples + 2 in the instructions
    assert text.endswith("Operation:\nFind the parents of node " + prob.node + ".")
    assert all(f"{a} -> {b}\n" in text + "\n" for a, b in prob.graph.edges)
    assert f"Perform a BFS from node {shots[0].node} with depth {shots[0].depth}." in text


# ---- parsing and scoring --------------------------------------------------------------------

def test_parse_final_answer():
    assert gw.parse_final_answer("thinking...\nFinal Answer: [ab12, cd34]") == ["ab12", "cd34"]
    assert gw.parse_final_answer("Final Answer: []") == []
    assert gw.parse_final_answer("Final Answer: ['AB12', \"cd34\", `ef56`]") == ["ab12", "cd34", "ef56"]
    assert gw.parse_final_answer("**Final Answer:** [x1]") == ["x1"]
    # the last Final Answer line wins
    assert gw.parse_final_answer("Final Answer: [a]\nno, wait\nFinal Answer: [b, c]\nDone.") == ["b", "c"]
    # malformed: no line, no list, or a last line without a list
    assert gw.parse_final_answer("The answer is a, b.") is None
    assert gw.parse_final_answer("Final Answer: a, b") is None
    assert gw.parse_final_answer("Final Answer: [a]\nFinal Answer: none") is None
    assert gw.parse_final_answer("") is None and gw.parse_final_answer(None) is None


def test_f1():
    assert gw.f1_score([], []) == 1.0
    assert gw.f1_score([], ["a"]) == 0.0
    assert gw.f1_score(["a"], []) == 0.0
    assert gw.f1_score(["a", "b"], ["a", "b"]) == 1.0
    assert gw.f1_score(["a", "b", "a"], ["b", "a"]) == 1.0          # a set: duplicates do not count
    assert gw.f1_score(["x"], ["a", "b"]) == 0.0
    assert gw.f1_score(["a", "x"], ["a", "b", "c"]) == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_summary():
    recs = [{"length": L, "kind": k, "f1": f, "malformed": f == 0.0, "prompt_tokens": L}
            for L in (100, 200) for k, f in (("bfs", 1.0), ("parents", 0.0))]
    summary, md = gw.summarize(recs, [100, 200], ["bfs", "parents"], "m")
    assert summary["f1"] == 0.5 and summary["problems"] == 4
    assert "| bfs | 100.0 | 100.0 | 100.0 |" in md and "| parents | 0.0 | 0.0 | 0.0 |" in md
    assert "| malformed final line | 1/2 | 1/2 | 2/4 |" in md


# ---- end to end on the tiny random model ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tiny_qwen2):
    from openmini.api import ServerSettings
    from server_utils import ServerThread, running_engine

    with running_engine(tiny_qwen2.hf_dir, max_model_len=4096, num_blocks=512) as eng, \
            ServerThread(eng, ServerSettings(served_model_name="tiny")) as srv:
        yield srv


def test_graphwalks_end_to_end(tiny_server, tmp_path, capsys):
    argv = ["eval", "graphwalks", "--base-url", tiny_server.base_url, "--lengths", "2500",
            "--per-length", "2", "--max-tokens", "4", "--out", str(tmp_path), "--seed", "7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| F1 % \\ length (tokens) | 2500 | all |" in out
    d = tmp_path / "graphwalks" / "tiny"
    recs = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == [f"len2500-{k}-{i}-seed7" for k in ("bfs", "parents") for i in (0, 1)]
    for r in recs:  # the edge count brings the prompt near the requested length
        assert 0.8 * 2500 <= r["prompt_tokens"] <= 1.2 * 2500, r["prompt_tokens"]
        assert 0.0 <= r["f1"] <= 1.0
    assert json.loads((d / "summary.json").read_text())["problems"] == 4
