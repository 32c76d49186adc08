"""The index manifest: an SQLite database beside the feature files.

Tables (users may query them with any SQLite client):

- ``meta(key, value)``: JSON values: the source, the model's fingerprint and checkpoint, the feature
  dimension, whether the last build/update finished, timestamps.
- ``items``: one row per indexed image: ``id`` (stable while the file is unchanged), ``key``, ``path``,
  ``member``/``offset`` (shard samples), ``size``, ``mtime_ns``, ``sha256`` of the encoded bytes,
  ``caption``, ``width``/``height``, and where its feature is: ``chunk`` (a row of ``chunks``) and ``row``.
- ``chunks(id, file, rows)``: the float16 feature files under ``features/``.
- ``errors``: files that could not be indexed, with the reason; unchanged bad files are not retried.

Every batch of features is written to its own file first (atomically, by rename) and then registered
together with its items in one transaction, so an interrupted build leaves either a whole batch or
nothing; a feature file no transaction registered is an orphan and is deleted on the next open.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["MANIFEST_NAME", "Manifest", "StoredItem", "StoredError"]

MANIFEST_NAME = "manifest.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY AUTOINCREMENT, file TEXT UNIQUE NOT NULL,
                                   rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    path TEXT NOT NULL,
    member TEXT,
    offset INTEGER,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    caption TEXT,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    chunk INTEGER NOT NULL REFERENCES chunks(id),
    row INTEGER NOT NULL,
    indexed_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS items_chunk ON items(chunk, row);
CREATE TABLE IF NOT EXISTS errors (
    key TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    seen_at TEXT NOT NULL
);
"""

_ITEM_COLUMNS = ("id", "key", "path", "member", "offset", "size", "mtime_ns", "sha256", "caption", "width",
                 "height", "chunk", "row")


@dataclass(frozen=True)
class StoredItem:
    id: int
    key: str
    path: str
    member: str | None
    offset: int | None
    size: int
    mtime_ns: int
    sha256: str
    caption: str | None
    width: int
    height: int
    chunk: int
    row: int


@dataclass(frozen=True)
class StoredError:
    key: str
    path: str
    size: int
    mtime_ns: int
    kind: str
    reason: str


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class Manifest:
    """A connection to one index's manifest (one per process; SQLite serialises writers across processes)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # A long timeout: under torchrun every rank commits its own batches and may wait for another's.
        # check_same_thread=False: the search server reads the manifest from its worker threads (the
        # sqlite3 module serialises access to one connection).
        self.db = sqlite3.connect(self.path, timeout=120.0, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA foreign_keys = ON")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing: BEGIN IMMEDIATE takes the write lock up front, so two ranks never deadlock."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # ------------------------------------------------------------------------------------- meta
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, values: dict[str, Any], db: sqlite3.Connection | None = None) -> None:
        (db or self.db).executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                    [(k, json.dumps(v)) for k, v in values.items()])

    def all_meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta ORDER BY key")}

    # ------------------------------------------------------------------------------------- items
    def items(self) -> list[StoredItem]:
        """Every item, in id order."""
        cursor = self.db.execute(f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items ORDER BY id")
        return [StoredItem(*row) for row in cursor]

    def item(self, item_id: int) -> StoredItem:
        row = self.db.execute(f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items WHERE id = ?", (int(item_id),)).fetchone()
        if row is None:
            raise KeyError(f"no item with id {item_id} in {self.path}")
        return StoredItem(*row)

    def count_items(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def errors(self) -> list[StoredError]:
        cursor = self.db.execute("SELECT key, path, size, mtime_ns, kind, reason FROM errors ORDER BY key")
        return [StoredError(*row) for row in cursor]

    def count_errors(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM errors").fetchone()[0]

    def chunks(self) -> list[tuple[int, str, int]]:
        return list(self.db.execute("SELECT id, file, rows FROM chunks ORDER BY id"))

    def add_batch(self, chunk_file: str, rows: int, items: Sequence[dict[str, Any]],
                  errors: Sequence[dict[str, Any]]) -> None:
        """Register one feature file with its items (row i of the file is items[i]) and the batch's errors.

        An item whose key is already present (a changed file) keeps its id and moves to the new row.
        """
        now = _now()
        with self.transaction() as db:
            chunk = None
            if rows:
                chunk = db.execute("INSERT INTO chunks(file, rows) VALUES (?, ?)", (chunk_file, rows)).lastrowid
            for row, item in enumerate(items):
                values = (item["key"], item["path"], item.get("member"), item.get("offset"), item["size"],
                          item["mtime_ns"], item["sha256"], item.get("caption"), item["width"], item["height"],
                          chunk, row, now)
                db.execute(
                    "INSERT INTO items(key, path, member, offset, size, mtime_ns, sha256, caption, width, height,"
                    " chunk, row, indexed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT(key) DO UPDATE SET path=excluded.path, member=excluded.member,"
                    " offset=excluded.offset, size=excluded.size, mtime_ns=excluded.mtime_ns,"
                    " sha256=excluded.sha256, caption=excluded.caption, width=excluded.width,"
                    " height=excluded.height, chunk=excluded.chunk, row=excluded.row,"
                    " indexed_at=excluded.indexed_at", values)
                db.execute("DELETE FROM errors WHERE key = ?", (item["key"],))
            self._record_errors(db, errors, now)

    def touch(self, updates: Iterable[tuple[str, str, int, int, str | None, int | None]]) -> None:
        """New location and stat for items whose bytes did not change: (key, path, size, mtime, member, offset)."""
        with self.transaction() as db:
            db.executemany("UPDATE items SET path = ?, size = ?, mtime_ns = ?, member = ?, offset = ? WHERE key = ?",
                           [(path, size, mtime, member, offset, key)
                            for key, path, size, mtime, member, offset in updates])

    def record_errors(self, errors: Sequence[dict[str, Any]]) -> None:
        with self.transaction() as db:
            self._record_errors(db, errors, _now())

    @staticmethod
    def _record_errors(db: sqlite3.Connection, errors: Sequence[dict[str, Any]], now: str) -> None:
        for error in errors:
            # A file that broke since it was indexed leaves the index: its old feature no longer describes it.
            db.execute("DELETE FROM items WHERE key = ?", (error["key"],))
            db.execute("INSERT OR REPLACE INTO errors(key, path, size, mtime_ns, kind, reason, seen_at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (error["key"], error["path"], error.get("size", -1), error.get("mtime_ns", -1),
                        error.get("kind", "unreadable"), error["reason"], now))

    def remove(self, keys: Iterable[str]) -> int:
        """Drop items and errors whose files are gone from the source; their feature rows become garbage."""
        keys = list(keys)
        with self.transaction() as db:
            db.executemany("DELETE FROM items WHERE key = ?", [(k,) for k in keys])
            db.executemany("DELETE FROM errors WHERE key = ?", [(k,) for k in keys])
        return len(keys)

    def live_rows(self) -> dict[int, list[tuple[int, int]]]:
        """chunk id -> [(row, item id)] of the items still in the index, rows ascending."""
        out: dict[int, list[tuple[int, int]]] = {}
        for chunk, row, item_id in self.db.execute("SELECT chunk, row, id FROM items ORDER BY chunk, row"):
            out.setdefault(chunk, []).append((row, item_id))
        return out

    def replace_chunks(self, old: Sequence[int], new_file: str, moves: Sequence[tuple[int, int]]) -> None:
        """Point items at a merged feature file (``moves``: (item id, new row)) and forget the old chunks."""
        with self.transaction() as db:
            chunk = db.execute("INSERT INTO chunks(file, rows) VALUES (?, ?)", (new_file, len(moves))).lastrowid
            db.executemany("UPDATE items SET chunk = ?, row = ? WHERE id = ?",
                           [(chunk, row, item_id) for item_id, row in moves])
            db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in old])
