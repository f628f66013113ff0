"""`openmini eval niah`: haystack building, needle placement, scoring (fake tokenizer), the
server token counter (fake client), the CLI's error paths, and one end-to-end run on the tiny
random model."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest

from openmini.cli import main
from openmini.evals import niah, tasks
from openmini.evals.tokens import ServerTokenCounter


def words(text: str) -> int:
    """Fake tokenizer: one token per whitespace-separated word."""
    return len(text.split())


SOURCE = "".join(f"Sentence number {i} has five more words in it. " for i in range(40)) + \
    "A closing line without a stop\nthen a new line ends it.\n\n"


# ---- haystack and needle --------------------------------------------------------------------

def test_split_chunks_keeps_text_and_cuts_at_sentence_ends():
    pieces = niah.split_chunks(SOURCE, max_chars=120)
    assert "".join(pieces) == SOURCE
    assert all(len(p) <= 120 for p in pieces)
    for p in pieces[:-1]:
        assert p[-1] in ".!?\n" or SOURCE[len(p)].isspace()  # cut at a sentence end
        assert p.endswith(".")


@pytest.mark.parametrize("target", [1, 7, 50, 123, 800, 2500])
def test_haystack_length_in_fake_tokens(target):
    hay = niah.build_haystack(SOURCE, target, words, chunk_chars=100)
    text = hay.text
    assert hay.num_tokens == words(text)          # pieces add up (cut before whitespace)
    assert target - 12 <= words(text) <= target   # at most one sentence's worth short
    assert SOURCE.startswith(text[:len(SOURCE)])  # the source, repeated from its start
    if target > words(SOURCE):
        assert text.count("Sentence number 0 ") >= 2


def test_haystack_zero_target_is_empty():
    assert niah.build_haystack(SOURCE, 0, words).text == ""


def test_needle_depths():
    hay = niah.build_haystack(SOURCE, 300, words, chunk_chars=150)
    text = hay.text
    assert niah.needle_position(hay, 0) == 0
    assert niah.needle_position(hay, 100) == len(text)
    for depth in (10, 25, 50, 75, 90):
        pos = niah.needle_position(hay, depth)
        assert text[pos - 1] == "." and text[pos].isspace()       # moved back to a sentence end
        words_before = words(text[:pos])
        assert words_before <= hay.num_tokens * depth / 100 + 1      # not after the depth
        assert words_before >= hay.num_tokens * depth / 100 - 12     # by at most one sentence


def test_insert_needle_start_middle_end():
    text = "One two three. Four five six. Seven eight."
    assert niah.insert_needle(text, 0).startswith(niah.NEEDLE + " One")
    assert niah.insert_needle(text, len(text)).endswith("eight. " + niah.NEEDLE)
    mid = niah.insert_needle(text, text.index(". Four") + 1)
    assert mid == "One two three. " + niah.NEEDLE + " Four five six. Seven eight."


def test_score_answer():
    assert niah.score_answer("Eat a sandwich and sit in Dolores Park on a sunny day.") == 1.0
    assert niah.score_answer("EAT A SANDWICH in dolores\n park") == 1.0
    assert niah.score_answer("Sit in Dolores Park.") == 0.5
    assert niah.score_answer("Visit the Golden Gate Bridge.") == 0.0
    assert niah.score_answer("") == 0.0
    assert niah.score_answer(None) == 0.0


def test_summary_table_and_heatmap(tmp_path):
    recs = [{"length": L, "depth": d, "score": 1.0 if d < 100 else 0.5, "prompt_tokens": L}
            for L in (100, 200) for d in (0, 50, 100)]
    summary, md = niah.summarize(recs, [100, 200], [0, 50, 100], "m")
    assert summary["grid"] == [[1.0, 1.0], [1.0, 1.0], [0.5, 0.5]]
    assert abs(summary["mean"] - 5 / 6) < 1e-9
    assert "| 100% | 0.5 | 0.5 |" in md and "| prompt tokens | 100-100 | 200-200 |" in md
    niah.plot_heatmap(summary["grid"], [100, 200], [0, 50, 100], "t", tmp_path / "h.png")
    assert (tmp_path / "h.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- server token counter -------------------------------------------------------------------

class FakeClient:
    """``chat.completions.create`` that reports prompt_tokens = words of all messages + 5."""

    def __init__(self):
        self.calls = 0
        self.chat = SimpleNamespace(completions=SimpleNamespace(create=self.create))

    def create(self, model, messages, max_tokens, temperature):
        self.calls += 1
        n = sum(words(m["content"]) for m in messages) + 5
        return SimpleNamespace(usage=SimpleNamespace(prompt_tokens=n))


def test_server_token_counter_counts_and_caches(tmp_path):
    client = FakeClient()
    cache = tmp_path / "counts.json"
    counter = ServerTokenCounter(client, "m", niah.messages_for, cache, concurrency=2)
    assert counter.count("a b c") == 3
    assert counter.count_many(["x", "x y", "a b c"]) == [1, 2, 3]
    calls = client.calls
    again = ServerTokenCounter(client, "m", niah.messages_for, cache)
    assert again.count_many(["x", "x y", "a b c"]) == [1, 2, 3]
    assert client.calls == calls  # all from the cache file
    assert counter.overhead() == sum(words(m["content"]) for m in niah.messages_for("")) + 5


# ---- CLI ------------------------------------------------------------------------------------

def test_eval_cli_errors(capsys, monkeypatch, tmp_path):
    assert main(["eval", "nosuchtask"]) == 2
    assert "unknown task" in capsys.readouterr().err
    monkeypatch.setitem(tasks.TASKS, "ghost", "openmini.evals.no_such_module")
    assert main(["eval", "ghost"]) == 1
    assert "task not available" in capsys.readouterr().err
    from server_utils import free_port
    rc = main(["eval", "niah", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "m",
               "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("openmini eval niah: error:") and "\n" not in err


# ---- end to end on the tiny random model ----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(tiny_llama):
    from openmini.api import ServerSettings
    from server_utils import ServerThread, running_engine

    with running_engine(tiny_llama.hf_dir, max_model_len=2048, num_blocks=512) as eng, \
            ServerThread(eng, ServerSettings(served_model_name="tiny")) as srv:
        yield srv


def test_niah_end_to_end(tiny_server, tmp_path, capsys, monkeypatch):
    essays = tmp_path / "essays"
    essays.mkdir()
    (essays / "b.txt").write_text(SOURCE)
    (essays / "a.txt").write_text("First essay. It is short.\n")
    monkeypatch.setattr("openmini.evals.data.dataset_path", lambda name, **kw: essays)
    argv = ["eval", "niah", "--base-url", tiny_server.base_url, "--lengths", "300,600",
            "--depths", "0,100", "--max-tokens", "4", "--out", str(tmp_path / "out"), "--concurrency", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "| depth \\ length (tokens) | 300 | 600 |" in out
    d = tmp_path / "out" / "niah" / "tiny"
    recs = [json.loads(line) for line in (d / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in recs) == ["len300-depth0", "len300-depth100", "len600-depth0", "len600-depth100"]
    for r in recs:  # the whole prompt is the requested length in the served tokens (+- a few)
        assert abs(r["prompt_tokens"] - r["length"]) <= 8, r
    assert (d / "heatmap.png").is_file() and json.loads((d / "summary.json").read_text())["cells"] == 4
    # resumable: a rerun asks nothing and prints the same table
    assert main(argv) == 0
    assert "| depth \\ length (tokens) | 300 | 600 |" in capsys.readouterr().out
    assert len((d / "results.jsonl").read_text().splitlines()) == 4


def test_niah_length_beyond_the_window_fails_at_once(tiny_server, tmp_path, capsys):
    """The tiny server's window is 2048 tokens (GET /models/{id} reports max_model_len): a
    longer NIAH length is refused before any token-count probe, and nothing is scored."""
    rc = main(["eval", "niah", "--base-url", tiny_server.base_url, "--lengths", "1000,100000",
               "--depths", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "[100000] + --max-tokens 64 exceed the context window" in err and "(2048 tokens)" in err
    assert not (tmp_path / "niah" / "tiny" / "results.jsonl").exists()
    assert not (tmp_path / "niah" / "tiny" / "token_counts.json").exists()
