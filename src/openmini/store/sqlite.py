"""``SQLiteResponseStore``: the ``ResponseStore`` on one SQLite file (stdlib ``sqlite3``).

Durability and atomicity (https://www.sqlite.org/wal.html, https://www.sqlite.org/pragma.html#pragma_synchronous):

* ``journal_mode=WAL``: readers never block the writer, and a commit appends to the
  write-ahead log; a crash at any moment leaves the database at the last commit (a torn
  WAL frame is ignored on recovery because its checksum does not match).
* ``synchronous=FULL`` (the default here): every commit fsyncs the WAL before returning,
  so a committed response survives a kill -9 *and* a power loss or OS crash. ``NORMAL``
  with WAL would also survive kill -9 (the log is in the OS page cache once ``write()``
  returned) but may lose the last commits on power loss; its only advantage is one fsync
  less per state change, which costs ~1 ms against the tens of milliseconds to seconds a
  response takes to generate, so FULL is the default. ``synchronous`` can be lowered by
  callers that accept that risk.
* Every state change is one ``BEGIN IMMEDIATE … COMMIT`` transaction (see
  ``openmini.store.base``), so a half-written response is never visible.

Schema changes are numbered migrations recorded in ``schema_migrations``; opening a file
applies the missing ones in order, each in its own transaction, and refuses a file written
by a newer version. One connection (``check_same_thread=False``) guarded by a lock serves
the event loop thread and any worker thread. One server process per file: start-up
recovery (marking unfinished responses failed) assumes nobody else is generating.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

from openmini.store.base import UNFINISHED_STATUSES, InputItemPage, StoreError

MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (1, "responses and their items", (
        """CREATE TABLE responses (
               id          TEXT PRIMARY KEY,
               status      TEXT NOT NULL,
               created_at  REAL NOT NULL,
               updated_at  REAL NOT NULL,
               body        TEXT NOT NULL
           )""",
        "CREATE INDEX responses_by_status ON responses(status)",
        """CREATE TABLE items (
               response_id TEXT NOT NULL REFERENCES responses(id) ON DELETE CASCADE,
               kind        TEXT NOT NULL CHECK (kind IN ('input', 'output')),
               position    INTEGER NOT NULL,
               item_id     TEXT NOT NULL,
               body        TEXT NOT NULL,
               PRIMARY KEY (response_id, kind, position)
           ) WITHOUT ROWID""",
        "CREATE INDEX items_by_item_id ON items(item_id)",
    )),
)
"""(version, description, statements): append new versions, never edit applied ones."""

SCHEMA_VERSION = MIGRATIONS[-1][0]

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class SQLiteResponseStore:
    """A ``ResponseStore`` backed by an SQLite database file.

    Args:
        path: database file (parent folders are created), or ``":memory:"`` for a
            store that lives as long as the object (tests, ``store`` without a data dir).
        synchronous: SQLite ``synchronous`` level: ``FULL`` (default, durable against
            power loss) or ``NORMAL`` (durable against process crashes only); see the
            module docstring.
        timeout: seconds to wait for another connection's write lock.

    Raises:
        StoreError: the file cannot be opened or was written by a newer schema version.
    """

    def __init__(self, path: str | os.PathLike[str], synchronous: str = "FULL",
                 timeout: float = 10.0):
        if synchronous.upper() not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {_SYNCHRONOUS}, got {synchronous!r}")
        self.path = str(path)
        self._lock = threading.RLock()
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            self.journal_mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            self._conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open the response store {self.path}: {exc}") from exc

    # ---- schema ---------------------------------------------------------------------------

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                             version     INTEGER PRIMARY KEY,
                             description TEXT NOT NULL,
                             applied_at  REAL NOT NULL)""")
        current = self.schema_version
        if current > SCHEMA_VERSION:
            raise StoreError(f"{self.path} has schema version {current}, newer than this "
                             f"OpenMini understands ({SCHEMA_VERSION}); upgrade OpenMini")
        for version, description, statements in MIGRATIONS:
            if version <= current:
                continue
            with self._tx() as c:
                for sql in statements:
                    c.execute(sql)
                c.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)",
                          (version, description, time.time()))

    @property
    def schema_version(self) -> int:
        """The highest applied migration (0 for a new file)."""
        with self._lock:
            row = self._conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        return row[0] or 0

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): all or nothing."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent read snapshot (several SELECTs see the same commit)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    # ---- ResponseStore --------------------------------------------------------------------

    def create(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        """See ``ResponseStore.create``."""
        now = time.time()
        try:
            with self._tx() as c:
                c.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?)",
                          (response["id"], response.get("status") or "completed",
                           float(response.get("created_at") or now), now, _dumps(response)))
                c.executemany(
                    "INSERT INTO items VALUES (?, 'input', ?, ?, ?)",
                    [(response["id"], i, item["id"], _dumps(item))
                     for i, item in enumerate(input_items)])
                self._index_output(c, response)
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"response {response['id']} exists already: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write response {response['id']}: {exc}") from exc

    def update(self, response: dict[str, Any]) -> bool:
        """See ``ResponseStore.update``."""
        try:
            with self._tx() as c:
                cur = c.execute("UPDATE responses SET status = ?, updated_at = ?, body = ? "
                                "WHERE id = ?", (response.get("status") or "completed",
                                                 time.time(), _dumps(response), response["id"]))
                if cur.rowcount == 0:
                    return False
                c.execute("DELETE FROM items WHERE response_id = ? AND kind = 'output'",
                          (response["id"],))
                self._index_output(c, response)
            return True
        except sqlite3.Error as exc:
            raise StoreError(f"cannot update response {response['id']}: {exc}") from exc

    @staticmethod
    def _index_output(c: sqlite3.Connection, response: dict[str, Any]) -> None:
        c.executemany("INSERT INTO items VALUES (?, 'output', ?, ?, ?)",
                      [(response["id"], i, item["id"], _dumps(item))
                       for i, item in enumerate(response.get("output") or [])
                       if item.get("id")])

    def get(self, response_id: str) -> dict[str, Any] | None:
        """See ``ResponseStore.get``."""
        with self._lock:
            row = self._conn.execute("SELECT body FROM responses WHERE id = ?",
                                     (response_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def delete(self, response_id: str) -> bool:
        """See ``ResponseStore.delete``."""
        try:
            with self._tx() as c:
                c.execute("DELETE FROM items WHERE response_id = ?", (response_id,))
                return c.execute("DELETE FROM responses WHERE id = ?",
                                 (response_id,)).rowcount > 0
        except sqlite3.Error as exc:
            raise StoreError(f"cannot delete response {response_id}: {exc}") from exc

    def input_items(self, response_id: str) -> list[dict[str, Any]] | None:
        """See ``ResponseStore.input_items``."""
        with self._read() as c:
            if c.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone() is None:
                return None
            rows = c.execute("SELECT body FROM items WHERE response_id = ? AND kind = 'input' "
                             "ORDER BY position", (response_id,)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def list_input_items(self, response_id: str, *, limit: int = 20,
                         order: Literal["asc", "desc"] = "desc",
                         after: str | None = None) -> InputItemPage | None:
        """See ``ResponseStore.list_input_items``."""
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        desc = order == "desc"
        with self._read() as c:
            if c.execute("SELECT 1 FROM responses WHERE id = ?", (response_id,)).fetchone() is None:
                return None
            if after is None:
                bound = None
            else:
                row = c.execute("SELECT position FROM items WHERE response_id = ? AND "
                                "kind = 'input' AND item_id = ? ORDER BY position LIMIT 1",
                                (response_id, after)).fetchone()
                if row is None:
                    raise KeyError(after)
                bound = row[0]
            sql = "SELECT body FROM items WHERE response_id = ? AND kind = 'input'"
            args: list[Any] = [response_id]
            if bound is not None:
                sql += " AND position < ?" if desc else " AND position > ?"
                args.append(bound)
            sql += f" ORDER BY position {'DESC' if desc else 'ASC'} LIMIT ?"
            args.append(limit + 1)
            rows = c.execute(sql, args).fetchall()
        return InputItemPage(data=[json.loads(r[0]) for r in rows[:limit]],
                             has_more=len(rows) > limit)

    def find_item(self, item_id: str) -> dict[str, Any] | None:
        """See ``ResponseStore.find_item``."""
        with self._lock:
            row = self._conn.execute("SELECT body FROM items WHERE item_id = ? LIMIT 1",
                                     (item_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def unfinished(self) -> list[dict[str, Any]]:
        """See ``ResponseStore.unfinished``."""
        marks = ", ".join("?" for _ in UNFINISHED_STATUSES)
        with self._lock:
            rows = self._conn.execute(f"SELECT body FROM responses WHERE status IN ({marks}) "
                                      f"ORDER BY created_at", UNFINISHED_STATUSES).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        """Close the connection (a WAL checkpoint runs when the last connection closes)."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> "SQLiteResponseStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
