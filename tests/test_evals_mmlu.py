"""MMLU task: simple-evals answer extraction, loglik letter picking, data cleaning and the
fixed stratified subset."""

from __future__ import annotations

import math

import pytest

from openmini.evals import mmlu


@pytest.mark.parametrize("text, letter", [
    ("Let me think. The sky is blue.\nAnswer: B", "B"),
    ("**Answer:** c", "C"),
    ("Answer : $D$", "D"),
    ("answer:A because...", "A"),
    ("The final answer is $\\boxed{B}$.\nAnswer: B", "B"),
    ("Answer: A\nWait, no. Answer: C", "A"),  # first match, as simple-evals' re.search
])
def test_extract_answer(text, letter):
    assert mmlu.extract_answer(text) == letter


@pytest.mark.parametrize("text", ["", None, "I think it is B.", "Answer: E", "Answer - B", "(B)"])
def test_extract_answer_malformed(text):
    assert mmlu.extract_answer(text) is None


def test_letter_logprobs_and_pick():
    top = [("The", -0.5), (" B", -1.0), ("B", -1.5), ("A", -2.0), ("a", -0.1), ("Answer", -0.2), ("D ", -3.0)]
    scores = mmlu.letter_logprobs(top)
    assert scores == {"A": -2.0, "B": -1.0, "C": -math.inf, "D": -3.0}
    assert mmlu.pick_letter(scores) == "B"
    assert mmlu.pick_letter(mmlu.letter_logprobs([("The", -0.1), ("a", -1.0)])) is None
    assert mmlu.pick_letter({"A": -1.0, "B": -1.0, "C": -2.0, "D": -math.inf}) == "A"  # tie -> first


def test_header_rows_dropped():
    qs = mmlu.load_questions()
    assert len(qs) == 14042
    assert all(q.answer in "ABCD" and q.question != "question" for q in qs)
    assert [q.index for q in qs] == list(range(14042))
    assert len({q.subject for q in qs}) == 57


def test_stratified_570_is_fixed():
    qs = mmlu.load_questions()
    sub = mmlu.select(qs, per_subject=mmlu.SUBSETS["stratified-570"])
    assert len(sub) == 570
    counts: dict[str, int] = {}
    for q in sub:
        counts[q.subject] = counts.get(q.subject, 0) + 1
    assert len(counts) == 57 and set(counts.values()) == {10}
    # first 10 of each subject in file order, stable across loads
    first = [q for q in qs if q.subject == "astronomy"][:10]
    assert [q for q in sub if q.subject == "astronomy"] == first
    assert [q.index for q in mmlu.select(mmlu.load_questions(), per_subject=10)] == [q.index for q in sub]


def test_select_subjects_and_limit():
    qs = mmlu.load_questions()
    sub = mmlu.select(qs, subjects=["virology", "astronomy"], per_subject=3, limit=5)
    assert len(sub) == 5 and {q.subject for q in sub} <= {"virology", "astronomy"}


def test_prompts():
    q = mmlu.Question(0, "x", "What is 1+1?", ("1", "2", "3", "4"), "B")
    gen = mmlu.render_prompt(q, "generate")
    assert "'Answer: $LETTER'" in gen and gen.endswith("A) 1\nB) 2\nC) 3\nD) 4")
    assert "letter" in mmlu.render_prompt(q, "loglik")


def test_summarize():
    recs = [{"subject": "s1", "correct": True, "pred": "A"}, {"subject": "s1", "correct": False, "pred": None},
            {"subject": "s2", "correct": True, "pred": "C"}]
    s = mmlu.summarize(recs)
    assert s["accuracy"] == pytest.approx(200 / 3) and s["no_prediction"] == 1
    assert s["per_subject"]["s1"]["accuracy"] == 50.0


def test_end_to_end_mmlu_and_ifeval_on_tiny_server(tiny_llama, tmp_path):
    """Plumbing only: both tasks run against a real server on the tiny random model, write
    results + summaries, resume without new requests, and IFEval re-scores offline."""
    import argparse
    import json

    from server_utils import ServerThread, running_engine
    from tiny_models import MAX_POSITIONS

    from openmini.api import ServerSettings
    from openmini.evals import ifeval

    def parse(module, argv):
        p = argparse.ArgumentParser()
        module.add_args(p)
        return p.parse_args(argv)

    with running_engine(tiny_llama.hf_dir, max_model_len=MAX_POSITIONS, num_blocks=512) as eng, \
            ServerThread(eng, ServerSettings(served_model_name="tiny")) as srv:
        common = ["--base-url", srv.base_url, "--out", str(tmp_path), "--concurrency", "2"]
        args = parse(mmlu, [*common, "--mode", "loglik", "--subset", "stratified-570", "--limit", "3"])
        assert mmlu.run(args) == 0
        summary = json.loads((tmp_path / "mmlu/tiny/loglik-stratified-570-limit3/summary.json").read_text())
        assert summary["n"] == 3 and summary["selected"] == 3
        recs = [json.loads(line) for line in (tmp_path / "mmlu/tiny/results.jsonl").read_text().splitlines()]
        assert {r["id"] for r in recs} == {"0:loglik", "1:loglik", "2:loglik"}
        assert all(set(r["letter_logprobs"]) == set("ABCD") for r in recs)

        args = parse(ifeval, [*common, "--limit", "2", "--max-tokens", "8"])
        assert ifeval.run(args) == 0
        recs = [json.loads(line) for line in (tmp_path / "ifeval/tiny/results.jsonl").read_text().splitlines()]
        assert len(recs) == 2 and all(r["completion_tokens"] <= 8 for r in recs)
        assert mmlu.run(parse(mmlu, [*common, "--mode", "loglik", "--subset", "stratified-570",
                                     "--limit", "3"])) == 0  # resumed: nothing re-asked
        assert len((tmp_path / "mmlu/tiny/results.jsonl").read_text().splitlines()) == 3
    # offline re-scoring from the saved answers/responses (the server is gone)
    assert mmlu.run(parse(mmlu, ["--out", str(tmp_path), "--model", "tiny", "--mode", "loglik",
                                 "--subset", "stratified-570", "--limit", "3", "--rescore"])) == 0
    args = parse(ifeval, ["--out", str(tmp_path), "--model", "tiny", "--limit", "2", "--rescore"])
    assert ifeval.run(args) == 0
    summary = json.loads((tmp_path / "ifeval/tiny/summary.json").read_text())
    assert summary["prompts"] == 2
    assert {"prompt_level_strict", "instruction_level_strict", "prompt_level_loose",
            "instruction_level_loose"} <= set(summary)
