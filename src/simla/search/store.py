"""Feature files of an index: float16 ``.npy`` chunks under ``features/``, written atomically.

A chunk is written to a temporary name and renamed into place, so a reader never sees half a file; the
manifest registers it afterwards (see :mod:`simla.search.manifest`). Builds write one chunk per batch,
which makes an interrupted build lose at most one batch; :func:`compact` then merges the small chunks
(and drops the rows of deleted or re-embedded items) so an index of a million images does not stay a
million/64 files.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from pathlib import Path

import numpy as np

from .manifest import MANIFEST_NAME, CorruptIndexError, Manifest

__all__ = ["FEATURES_DIR", "CorruptChunkError", "chunk_path", "compact", "load_chunk", "load_live_features", "remove_orphans",
           "verify_chunks", "write_chunk"]

logger = logging.getLogger(__name__)

FEATURES_DIR = "features"
#: Chunks with at least this many rows and no garbage are left alone by :func:`compact`.
LARGE_CHUNK_ROWS = 65_536
#: The names this module gives chunks (``features/<32 hex>.npy``) and their temporary files
#: (``<32 hex>.npy.<pid>.tmp``): orphan cleanup deletes nothing else.
CHUNK_NAME = re.compile(r"[0-9a-f]{32}\.npy")
TEMP_NAME = re.compile(r"[0-9a-f]{32}\.npy\.(\d+)\.tmp")
#: Rows checked for finiteness at a time (bounds the memory of a check of a large chunk).
_CHECK_ROWS = 65_536


class CorruptChunkError(CorruptIndexError):
    """A registered feature chunk is missing, unreadable, misplaced or not what the manifest says."""

    def __init__(self, index_dir: Path, file: str, reason: str) -> None:
        super().__init__(f"{index_dir}: feature chunk {file!r} registered in {MANIFEST_NAME} {reason}; run "
                         f"`simla index check {index_dir} --repair` to drop and re-embed its images")
        self.file, self.reason = file, reason


_damaged = CorruptChunkError


def chunk_path(index_dir: Path, file: str) -> Path:
    """The path of a registered chunk, which must be ``features/<name>.npy`` inside the index folder.

    Anything else (an absolute path, ``..``, a symlink leading out of the folder) is corruption: it is
    reported and never opened or deleted.
    """
    parts = file.split("/")
    if len(parts) != 2 or parts[0] != FEATURES_DIR or not CHUNK_NAME.fullmatch(parts[1]):
        raise _damaged(index_dir, file, f"is not a file name of the form {FEATURES_DIR}/<32 hex digits>.npy")
    path = index_dir / FEATURES_DIR / parts[1]
    features = (index_dir / FEATURES_DIR).resolve()
    if path.is_symlink() or path.resolve().parent != features or features.parent != index_dir.resolve():
        raise _damaged(index_dir, file, "leads outside the index folder (a symbolic link)")
    return path


def write_chunk(index_dir: Path, features: np.ndarray) -> str:
    """Write (N, D) features as float16 under a fresh unique name; returns the name relative to index_dir.

    The temporary file's name carries this process's id, so orphan cleanup can tell a live writer's file.
    """
    folder = index_dir / FEATURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{FEATURES_DIR}/{uuid.uuid4().hex}.npy"
    tmp = index_dir / f"{name}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(features, dtype=np.float16))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index_dir / name)
    return name


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _is_orphan(name: str, known: set[str]) -> bool:
    """Whether ``features/name`` is ours to delete: an unregistered chunk, or a dead writer's temporary file."""
    if CHUNK_NAME.fullmatch(name):
        return f"{FEATURES_DIR}/{name}" not in known
    temp = TEMP_NAME.fullmatch(name)
    return temp is not None and int(temp.group(1)) != os.getpid() and not _process_alive(int(temp.group(1)))


def remove_orphans(index_dir: Path, manifest: Manifest) -> int:
    """Delete chunk files no chunk row names and dead writers' temporary files; returns how many.

    Call it only under the index's write lock: an unregistered chunk of a live writer is about to be
    registered. Files of any other name, and a live process's temporary files, are never touched.
    """
    folder = index_dir / FEATURES_DIR
    if not folder.is_dir():
        return 0
    known = {file for _, file, _ in manifest.chunks()}
    removed = 0
    for path in folder.iterdir():
        if not path.is_symlink() and path.is_file() and _is_orphan(path.name, known):
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d unregistered feature files (an interrupted build)", removed)
    return removed


def load_chunk(index_dir: Path, file: str, rows: int, dim: int, *, check_values: bool = False) -> np.ndarray:
    """A registered chunk, memory-mapped, checked against the manifest: (rows, dim) float16 (and finite).

    Raises CorruptIndexError naming the chunk when it is missing, unreadable or not what was registered.
    """
    path = chunk_path(index_dir, file)
    try:
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise _damaged(index_dir, file, "is missing") from None
    except (OSError, ValueError, EOFError) as exc:
        raise _damaged(index_dir, file, f"is unreadable ({exc})") from None
    if data.dtype != np.float16 or data.shape != (rows, dim):
        raise _damaged(index_dir, file, f"holds {data.dtype} {tuple(data.shape)}, expected float16 ({rows}, {dim})")
    if check_values:
        for start in range(0, rows, _CHECK_ROWS):
            if not np.isfinite(data[start:start + _CHECK_ROWS]).all():
                raise _damaged(index_dir, file, "holds NaN or infinite values")
    return data


def verify_chunks(index_dir: Path, manifest: Manifest) -> int:
    """Check every registered chunk (place, shape, dtype, values) and the items' rows; returns the count."""
    dim = manifest.get_meta("dim")
    chunks = manifest.chunks()
    sizes = {chunk: rows for chunk, _, rows in chunks}
    for chunk, file, rows in chunks:
        load_chunk(index_dir, file, rows, dim, check_values=True)
    for chunk, entries in manifest.live_rows().items():
        if chunk not in sizes or entries[-1][0] >= sizes[chunk]:
            raise CorruptIndexError(f"{index_dir / MANIFEST_NAME}: items point at rows that chunk {chunk} lacks; run "
                                    f"`simla index check {index_dir} --repair`")
    return len(chunks)


def load_live_features(index_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(item ids (N,) int64 ascending, features (N, D) float16) of every item in the index."""
    live = manifest.live_rows()
    dim = manifest.get_meta("dim", 0)
    ids, blocks = [], []
    for chunk, file, size in manifest.chunks():
        rows = live.get(chunk)
        if not rows:
            continue
        data = load_chunk(index_dir, file, size, dim)
        block = np.asarray(data[[r for r, _ in rows]], dtype=np.float16)
        if not np.isfinite(block).all():
            raise _damaged(index_dir, file, "holds NaN or infinite values")
        blocks.append(block)
        ids.extend(item_id for _, item_id in rows)
    if not blocks:
        return np.zeros(0, dtype=np.int64), np.zeros((0, dim), dtype=np.float16)
    ids_array = np.asarray(ids, dtype=np.int64)
    order = np.argsort(ids_array, kind="stable")
    return ids_array[order], np.concatenate(blocks)[order]


def compact(index_dir: Path, manifest: Manifest) -> int:
    """Merge small or partly dead chunks into one and delete the chunks with no live rows.

    Returns the number of chunk files removed. The merged file is written and registered before the old
    files are deleted, so an interruption leaves either the old chunks or the new one in use, never none.
    """
    live = manifest.live_rows()
    chunks = manifest.chunks()
    dim = manifest.get_meta("dim", 0)
    # Every file this may read or delete is checked first: a row naming a file outside the index is never touched.
    paths = {chunk: chunk_path(index_dir, file) for chunk, file, _ in chunks}
    dead = [(chunk, file) for chunk, file, _ in chunks if not live.get(chunk)]
    merge = [(chunk, file, rows) for chunk, file, rows in chunks
             if live.get(chunk) and (rows < LARGE_CHUNK_ROWS or len(live[chunk]) < rows)]
    if len(merge) == 1 and len(live[merge[0][0]]) == merge[0][2]:
        merge = []  # a single small chunk with no garbage gains nothing from a rewrite
    if merge:
        parts, moves = [], []
        for chunk, file, size in merge:
            rows = live[chunk]
            data = load_chunk(index_dir, file, size, dim)
            parts.append(np.asarray(data[[r for r, _ in rows]]))
            moves.extend(item_id for _, item_id in rows)
        new_file = write_chunk(index_dir, np.concatenate(parts))
        manifest.replace_chunks([c for c, _, _ in merge], new_file,
                                [(item_id, row) for row, item_id in enumerate(moves)])
    if dead:
        with manifest.transaction() as db:
            db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c, _ in dead])
    for chunk in [c for c, _, _ in merge] + [c for c, _ in dead]:
        paths[chunk].unlink(missing_ok=True)
    return len(merge) + len(dead)
