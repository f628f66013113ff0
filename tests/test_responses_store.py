"""``SQLiteResponseStore``: the ResponseStore contract (openmini/store/base.py), schema
migrations, atomic writes, and durability against kill -9 of a writing process."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from openmini.store import SCHEMA_VERSION, SQLiteResponseStore, StoreError
from openmini.store.sqlite import MIGRATIONS
from server_utils import REPO


def response(rid: str, status: str = "completed", output: list | None = None) -> dict:
    return {"id": rid, "object": "response", "created_at": 1700000000, "status": status,
            "output": output or [], "text": {"format": {"type": "text"}},
            "metadata": {"ключ": "значение 🦊"}}


def items(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}{i}", "type": "message", "role": "user",
             "content": [{"type": "input_text", "text": f"text {i}"}], "status": "completed"}
            for i in range(n)]


@pytest.fixture
def store(tmp_path):
    with SQLiteResponseStore(tmp_path / "r.sqlite3") as s:
        yield s


def test_file_settings_and_schema(store, tmp_path):
    assert store.journal_mode == "wal"
    conn = sqlite3.connect(tmp_path / "r.sqlite3")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = conn.execute("SELECT version, description FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == [m[0] for m in MIGRATIONS] and store.schema_version == \
        SCHEMA_VERSION
    conn.close()
    with store._lock:  # synchronous=FULL: every commit is fsynced (2 == FULL)
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.sqlite3"
    SQLiteResponseStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        SQLiteResponseStore(path)


def test_create_get_update_delete_roundtrip(store):
    r = response("resp_a", "in_progress")
    store.create(r, items("msg_in", 3))
    assert store.get("resp_a") == r
    assert store.input_items("resp_a") == items("msg_in", 3)
    done = response("resp_a", "completed", output=[{"id": "msg_out", "type": "message"},
                                                  {"id": "fc_1", "type": "function_call"}])
    assert store.update(done) is True
    assert store.get("resp_a") == done
    assert store.find_item("fc_1") == {"id": "fc_1", "type": "function_call"}
    assert store.find_item("msg_in1")["content"][0]["text"] == "text 1"
    # re-indexing replaces the output items
    assert store.update(response("resp_a", "completed", output=[{"id": "msg_new"}]))
    assert store.find_item("msg_out") is None and store.find_item("msg_new") == {"id": "msg_new"}
    with pytest.raises(StoreError):
        store.create(response("resp_a"), [])
    assert store.delete("resp_a") is True
    assert store.get("resp_a") is None and store.input_items("resp_a") is None
    assert store.find_item("msg_in0") is None and store.find_item("msg_new") is None
    assert store.delete("resp_a") is False
    assert store.update(done) is False  # never resurrects a deleted response
    assert store.get("resp_a") is None


def test_failed_create_leaves_nothing(store):
    bad = items("msg_", 3)
    del bad[2]["id"]  # fails inside the transaction, after the response row was inserted
    with pytest.raises(KeyError):
        store.create(response("resp_b"), bad)
    assert store.get("resp_b") is None and store.find_item("msg_0") is None
    store.create(response("resp_b"), items("msg_", 2))  # the id is free again
    assert len(store.input_items("resp_b")) == 2


@pytest.mark.parametrize("order", ["asc", "desc"])
@pytest.mark.parametrize("limit", [1, 2, 3, 7, 20])
def test_list_input_items_pages(store, order, limit):
    store.create(response("resp_c"), items("msg_", 7))
    expected = [f"msg_{i}" for i in range(7)]
    if order == "desc":
        expected.reverse()
    seen, after = [], None
    while True:
        page = store.list_input_items("resp_c", limit=limit, order=order, after=after)
        assert len(page.data) <= limit
        seen += [d["id"] for d in page.data]
        assert page.has_more == (len(seen) < 7)
        if not page.has_more:
            break
        assert page.last_id == page.data[-1]["id"] and page.first_id == page.data[0]["id"]
        after = page.last_id
    assert seen == expected
    empty = store.list_input_items("resp_c", limit=limit, order=order, after=expected[-1])
    assert empty.data == [] and not empty.has_more and empty.first_id is None
    assert store.list_input_items("resp_nope") is None
    with pytest.raises(KeyError):
        store.list_input_items("resp_c", after="msg_nope")


def test_unfinished(store):
    store.create(response("resp_1", "queued"), [])
    store.create(response("resp_2", "in_progress"), [])
    store.create(response("resp_3", "completed"), [])
    store.create(response("resp_4", "failed"), [])
    assert sorted(r["id"] for r in store.unfinished()) == ["resp_1", "resp_2"]


def test_reopen_keeps_everything(tmp_path):
    path = tmp_path / "r.sqlite3"
    with SQLiteResponseStore(path) as s:
        s.create(response("resp_x"), items("msg_", 4))
    with SQLiteResponseStore(path) as s:
        assert s.get("resp_x") == response("resp_x")
        assert s.input_items("resp_x") == items("msg_", 4)


WRITER = textwrap.dedent("""
    import sys
    from openmini.store import SQLiteResponseStore
    store = SQLiteResponseStore(sys.argv[1])
    i = 0
    while True:
        rid = f"resp_{i}"
        items = [{"id": f"msg_{i}_{k}", "type": "message", "text": "x" * 200}
                 for k in range(20)]
        store.create({"id": rid, "status": "in_progress", "created_at": i, "output": []},
                     items)
        store.update({"id": rid, "status": "completed", "created_at": i,
                      "output": [{"id": f"out_{i}", "text": "y" * 500}]})
        print(i, flush=True)
        i += 1
""")


def test_kill_9_while_writing_loses_no_commit_and_shows_no_half_write(tmp_path):
    path = tmp_path / "r.sqlite3"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    committed = -1
    while committed < 40:
        line = proc.stdout.readline()
        assert line, "the writer died"
        committed = int(line)
    proc.send_signal(signal.SIGKILL)  # mid-transaction, most likely
    proc.wait()
    with SQLiteResponseStore(path) as s:
        for i in range(committed + 1):
            r = s.get(f"resp_{i}")
            assert r == {"id": f"resp_{i}", "status": "completed", "created_at": i,
                         "output": [{"id": f"out_{i}", "text": "y" * 500}]}
            assert len(s.input_items(f"resp_{i}")) == 20
        # whatever the killed transaction left: all of it or nothing
        for extra in (committed + 1, committed + 2):
            r = s.get(f"resp_{extra}")
            if r is not None:
                assert len(s.input_items(f"resp_{extra}")) == 20
                assert (r["status"], len(r["output"])) in (("in_progress", 0),
                                                           ("completed", 1))
        with s._lock:
            assert s._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            json.dumps(s.unfinished())
