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
nothing; a feature file no transaction registered is an orphan and is deleted by the next writer (under
the index's write lock, see :mod:`simla.search.lock`).

A manifest that SQLite cannot read (truncated, overwritten, a damaged header) or that lacks the tables
raises :class:`CorruptIndexError`, a one-line user error that names the file and the way out
(``simla index check --repair`` or a rebuild), never a bare ``sqlite3.DatabaseError``.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import SimlaError

__all__ = ["MANIFEST_NAME", "REQUIRED_TABLES", "CorruptIndexError", "ItemNotFoundError", "Manifest", "StoredError",
           "StoredItem", "is_corruption"]

MANIFEST_NAME = "manifest.sqlite"
REQUIRED_TABLES = ("meta", "chunks", "items", "errors")
_F = TypeVar("_F", bound=Callable[..., Any])


class CorruptIndexError(SimlaError, RuntimeError):
    """An index's manifest or feature files are damaged; the message names the file and the way out."""


class ItemNotFoundError(SimlaError, LookupError):
    """No item with that id: it was never indexed, or an update removed it (its file was deleted or broke).

    Not a KeyError (whose message Python quotes); re-exported by :mod:`simla.search.index`.
    """


def is_corruption(exc: sqlite3.Error) -> bool:
    """Whether an SQLite error means a damaged database (not a busy one, nor a missing permission)."""
    if isinstance(exc, sqlite3.OperationalError):
        return any(s in str(exc) for s in ("no such table", "no such column", "malformed", "not a database"))
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError)


def corrupt_manifest(path: Path, reason: str) -> CorruptIndexError:
    """The error for a damaged manifest at ``path``, with the commands that repair it."""
    folder = path.parent
    return CorruptIndexError(f"{path}: the index manifest is damaged ({reason}); run `simla index check {folder} "
                             f"--repair`, or move {folder} away and build the index again with `simla index build "
                             f"SOURCE --checkpoint C --output {folder}`")


def _guarded(method: _F) -> _F:
    """Turn SQLite's corruption errors raised by a Manifest method into CorruptIndexError."""
    @functools.wraps(method)
    def wrapper(self: "Manifest", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as exc:
            if is_corruption(exc):
                raise corrupt_manifest(self.path, str(exc)) from exc
            raise
    return wrapper  # type: ignore[return-value]

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
    """A connection to one index's manifest (one per process; SQLite serialises writers across processes).

    ``create=True`` (a new build) creates the tables; otherwise the manifest must already hold them, and
    one that SQLite cannot read or that lacks them raises :class:`CorruptIndexError`.
    """

    @_guarded
    def __init__(self, path: str | Path, *, create: bool = False) -> None:
        self.path = Path(path)
        # A long timeout: under torchrun every rank commits its own batches and may wait for another's.
        # check_same_thread=False: the search server reads the manifest from its worker threads (the
        # sqlite3 module serialises access to one connection).
        self.db = sqlite3.connect(self.path, timeout=120.0, isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA foreign_keys = ON")
            if create:
                self.db.executescript(_SCHEMA)
            missing = [t for t in REQUIRED_TABLES if t not in self.tables()]
            if missing:
                raise corrupt_manifest(self.path, f"no {', '.join(missing)} table{'s' if len(missing) > 1 else ''}"
                                       f"{'; the file is empty' if self.path.stat().st_size == 0 else ''}")
        except BaseException:
            self.db.close()
            raise

    def tables(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    @_guarded
    def data_version(self) -> int:
        """A number that changes when another connection commits to the manifest (SQLite's data_version)."""
        return self.db.execute("PRAGMA data_version").fetchone()[0]

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
    @_guarded
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    @_guarded
    def set_meta(self, values: dict[str, Any], db: sqlite3.Connection | None = None) -> None:
        (db or self.db).executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                                    [(k, json.dumps(v)) for k, v in values.items()])

    @_guarded
    def all_meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta ORDER BY key")}

    # ------------------------------------------------------------------------------------- items
    @_guarded
    def items(self) -> list[StoredItem]:
        """Every item, in id order."""
        cursor = self.db.execute(f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items ORDER BY id")
        return [StoredItem(*row) for row in cursor]

    @_guarded
    def item(self, item_id: int) -> StoredItem:
        row = self.db.execute(f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items WHERE id = ?", (int(item_id),)).fetchone()
        if row is None:
            raise ItemNotFoundError(f"no item with id {item_id} in the index {self.path.parent} (never indexed, "
                                    f"or removed by an update)")
        return StoredItem(*row)

    @_guarded
    def count_items(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    @_guarded
    def errors(self) -> list[StoredError]:
        cursor = self.db.execute("SELECT key, path, size, mtime_ns, kind, reason FROM errors ORDER BY key")
        return [StoredError(*row) for row in cursor]

    @_guarded
    def count_errors(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM errors").fetchone()[0]

    @_guarded
    def chunks(self) -> list[tuple[int, str, int]]:
        return list(self.db.execute("SELECT id, file, rows FROM chunks ORDER BY id"))

    @_guarded
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

    @_guarded
    def touch(self, updates: Iterable[tuple[str, str, int, int, str | None, int | None]]) -> None:
        """New location and stat for items whose bytes did not change: (key, path, size, mtime, member, offset)."""
        with self.transaction() as db:
            db.executemany("UPDATE items SET path = ?, size = ?, mtime_ns = ?, member = ?, offset = ? WHERE key = ?",
                           [(path, size, mtime, member, offset, key)
                            for key, path, size, mtime, member, offset in updates])

    @_guarded
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

    @_guarded
    def remove(self, keys: Iterable[str]) -> int:
        """Drop items and errors whose files are gone from the source; their feature rows become garbage."""
        keys = list(keys)
        with self.transaction() as db:
            db.executemany("DELETE FROM items WHERE key = ?", [(k,) for k in keys])
            db.executemany("DELETE FROM errors WHERE key = ?", [(k,) for k in keys])
        return len(keys)

    @_guarded
    def live_rows(self) -> dict[int, list[tuple[int, int]]]:
        """chunk id -> [(row, item id)] of the items still in the index, rows ascending."""
        out: dict[int, list[tuple[int, int]]] = {}
        for chunk, row, item_id in self.db.execute("SELECT chunk, row, id FROM items ORDER BY chunk, row"):
            out.setdefault(chunk, []).append((row, item_id))
        return out

    @_guarded
    def replace_chunks(self, old: Sequence[int], new_file: str, moves: Sequence[tuple[int, int]]) -> None:
        """Point items at a merged feature file (``moves``: (item id, new row)) and forget the old chunks."""
        with self.transaction() as db:
            chunk = db.execute("INSERT INTO chunks(file, rows) VALUES (?, ?)", (new_file, len(moves))).lastrowid
            db.executemany("UPDATE items SET chunk = ?, row = ? WHERE id = ?",
                           [(chunk, row, item_id) for item_id, row in moves])
            db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in old])

    @_guarded
    def dangling_items(self) -> list[int]:
        """Ids of items that point at no chunk, or at a row their chunk does not have."""
        return [row[0] for row in self.db.execute(
            "SELECT items.id FROM items LEFT JOIN chunks ON items.chunk = chunks.id"
            " WHERE chunks.id IS NULL OR items.row < 0 OR items.row >= chunks.rows ORDER BY items.id")]

    @_guarded
    def forget(self, chunk_ids: Sequence[int], item_ids: Sequence[int]) -> int:
        """Drop chunks with their items, and the given items, so the next update embeds them again.

        Returns the number of items dropped; the index is marked incomplete.
        """
        with self.transaction() as db:
            before = db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            db.executemany("DELETE FROM items WHERE chunk = ?", [(c,) for c in chunk_ids])
            db.executemany("DELETE FROM items WHERE id = ?", [(i,) for i in item_ids])
            db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in chunk_ids])
            self.set_meta({"complete": False}, db)
            return before - db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
