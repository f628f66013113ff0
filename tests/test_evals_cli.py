"""`openmini eval` input validation and failure paths: bad numbers are usage errors, empty
selections and failed runs never overwrite a summary, a refused model stops the run at once,
--rescore without results is a one-line error, and the fidelity scripts fail in one line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from openmini.cli import main
from openmini.evals import common, graphwalks, niah
from openmini.evals.tokens import ServerTokenCounter

ROOT = Path(__file__).resolve().parents[1]


def dead_url() -> str:
    from server_utils import free_port
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.mark.parametrize("task", ["niah", "mmlu", "ifeval", "graphwalks"])
@pytest.mark.parametrize("flag,value,message", [
    ("--limit", "-1", "must be >= 1"), ("--limit", "0", "must be >= 1"),
    ("--concurrency", "0", "must be >= 1"), ("--timeout", "0", "must be > 0"),
    ("--timeout", "-1", "must be > 0"), ("--max-tokens", "0", "must be >= 1"),
    ("--limit", "x", "expected an integer"),
])
def test_bad_numbers_are_usage_errors(task, flag, value, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["eval", task, flag, value, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("argv,message", [
    (["niah", "--depths", "150"], "from 0 to 100"),
    (["niah", "--depths", "-10"], "from 0 to 100"),
    (["niah", "--lengths", "1024,,2048"], "comma-separated integers"),
    (["graphwalks", "--per-length", "0"], "must be >= 1"),
    (["mmlu", "--per-subject", "-1"], "must be >= 1"),
])
def test_bad_task_options_are_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["eval", *argv, "--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_int_list_drops_duplicates_in_order():
    assert common.int_list("0,50,0,100,50") == [0, 50, 100]
    assert niah.depth_list("100,0,100") == [100, 0]


class NotFoundError(Exception):
    """Named like the openai exception for an unknown model (matched by name)."""


def test_run_items_stops_at_a_refused_model(tmp_path):
    calls = []

    def refuse(item):
        calls.append(item)
        raise NotFoundError("404 model 'nosuch' not found")

    log = common.ResultLog(tmp_path / "results.jsonl")
    items = [(str(i), i) for i in range(50)]
    with pytest.raises(RuntimeError, match="refused the run.*NotFoundError"):
        common.run_items(items, refuse, log, concurrency=1, desc="t")
    assert len(calls) < 50 and not log.records


def test_run_items_keeps_going_after_other_errors(tmp_path):
    def flaky(item):
        if item % 2:
            raise TimeoutError("slow")
        return {"v": item}

    log = common.ResultLog(tmp_path / "results.jsonl")
    done, errors = common.run_items([(str(i), i) for i in range(6)], flaky, log, 2, "t")
    assert [r["v"] for r in done] == [0, 2, 4] and len(errors) == 3


@pytest.mark.parametrize("task", ["mmlu", "ifeval"])
def test_rescore_without_results_is_one_line_and_writes_nothing(task, capsys, tmp_path):
    rc = main(["eval", task, "--rescore", "--model", "tiny", "--out", str(tmp_path), "--mode", "loglik"]
              if task == "mmlu" else ["eval", task, "--rescore", "--model", "tiny", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "no saved" in err and "\n" not in err
    assert not any(tmp_path.iterdir())


def test_failed_run_keeps_the_earlier_summary(capsys, tmp_path):
    d = tmp_path / "ifeval" / "tiny"
    d.mkdir(parents=True)
    (d / "summary.md").write_text("earlier\n")
    rc = main(["eval", "ifeval", "--base-url", dead_url(), "--model", "tiny", "--limit", "2",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "no prompt was scored (2 failed" in err
    assert (d / "summary.md").read_text() == "earlier\n" and not (d / "summary.json").exists()


class WordClient:
    """``chat.completions.create`` reporting prompt_tokens = words of all messages."""

    def __init__(self):
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, max_tokens, temperature):
        n = sum(len(m["content"].split()) for m in messages)
        return SimpleNamespace(usage=SimpleNamespace(prompt_tokens=n))


def test_graphwalks_length_shorter_than_the_prompt_is_an_error():
    import random

    counter = ServerTokenCounter(WordClient(), "m", graphwalks.messages_for)
    sample = graphwalks.random_graph(random.Random(0), 40, 64)
    shortest = counter.overhead()
    with pytest.raises(ValueError, match="shorter than the shortest prompt"):
        graphwalks.edges_for_length(counter, 10, sample)
    assert graphwalks.edges_for_length(counter, shortest + 200, sample) >= 2


def load_script(name: str, monkeypatch):
    """Import ``evals/<name>.py`` as running it would: with ``evals/`` first on sys.path."""
    monkeypatch.syspath_prepend(str(ROOT / "evals"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "evals" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mmlu_fidelity_with_nothing_in_common_is_an_error(monkeypatch):
    fid = load_script("mmlu_fidelity", monkeypatch)
    with pytest.raises(ValueError, match="no question answered by both sides"):
        fid.compare({}, {1: {}})


def test_niah_fidelity_without_a_run_is_one_line(capsys, tmp_path, monkeypatch):
    from openmini.evals.tasks import script_main

    fid = load_script("niah_fidelity", monkeypatch)
    monkeypatch.setattr(sys, "argv", ["niah_fidelity"])
    rc = script_main("niah_fidelity", lambda: fid.main(["--model", "tiny", "--cells", "1024:50",
                                                         "--out", str(tmp_path)]))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("niah_fidelity: error:") and "does not exist" in err

    run = tmp_path / "niah" / "tiny"
    run.mkdir(parents=True)
    (run / "results.jsonl").write_text(json.dumps({"id": "len1024-depth0", "length": 1024, "depth": 0}) + "\n")
    rc = script_main("niah_fidelity", lambda: fid.main(["--model", "tiny", "--cells", "1024:50",
                                                         "--out", str(tmp_path)]))
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "1024:50 not in" in err and "1024:0" in err


def test_fresh_replaces_results_only_once_a_new_item_finishes(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"id": "old", "v": 1}) + "\n")

    def down(item):
        raise ConnectionError("refused")

    log = common.ResultLog(path, fresh=True)
    assert log.records == {}  # earlier records are ignored ...
    common.run_items([("a", 0)], down, log, 1, "t")
    assert json.loads(path.read_text())["id"] == "old"  # ... but not lost when nothing finishes

    log = common.ResultLog(path, fresh=True)
    common.run_items([("a", 0), ("b", 1)], lambda item: {"v": item}, log, 1, "t")
    assert sorted(json.loads(line)["id"] for line in path.read_text().splitlines()) == ["a", "b"]
    assert sorted(common.ResultLog(path).records) == ["a", "b"]
