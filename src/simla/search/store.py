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
import uuid
from pathlib import Path

import numpy as np

from .manifest import Manifest

__all__ = ["FEATURES_DIR", "compact", "load_live_features", "remove_orphans", "write_chunk"]

logger = logging.getLogger(__name__)

FEATURES_DIR = "features"
#: Chunks with at least this many rows and no garbage are left alone by :func:`compact`.
LARGE_CHUNK_ROWS = 65_536


def write_chunk(index_dir: Path, features: np.ndarray) -> str:
    """Write (N, D) features as float16 under a fresh unique name; returns the name relative to index_dir."""
    folder = index_dir / FEATURES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{FEATURES_DIR}/{uuid.uuid4().hex}.npy"
    tmp = index_dir / (name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(features, dtype=np.float16))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index_dir / name)
    return name


def remove_orphans(index_dir: Path, manifest: Manifest) -> int:
    """Delete feature files no chunk row names (left by an interrupted batch or merge); returns how many."""
    folder = index_dir / FEATURES_DIR
    if not folder.is_dir():
        return 0
    known = {file for _, file, _ in manifest.chunks()}
    removed = 0
    for path in folder.iterdir():
        if f"{FEATURES_DIR}/{path.name}" not in known:
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d unregistered feature files (an interrupted build)", removed)
    return removed


def load_live_features(index_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(item ids (N,) int64 ascending, features (N, D) float16) of every item in the index."""
    live = manifest.live_rows()
    ids, blocks = [], []
    for chunk, file, _ in manifest.chunks():
        rows = live.get(chunk)
        if not rows:
            continue
        data = np.load(index_dir / file, mmap_mode="r")
        blocks.append(np.asarray(data[[r for r, _ in rows]], dtype=np.float16))
        ids.extend(item_id for _, item_id in rows)
    if not blocks:
        dim = manifest.get_meta("dim", 0)
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
    dead = [(chunk, file) for chunk, file, _ in chunks if not live.get(chunk)]
    merge = [(chunk, file) for chunk, file, rows in chunks
             if live.get(chunk) and (rows < LARGE_CHUNK_ROWS or len(live[chunk]) < rows)]
    if len(merge) == 1 and len(live[merge[0][0]]) == next(r for c, _, r in chunks if c == merge[0][0]):
        merge = []  # a single small chunk with no garbage gains nothing from a rewrite
    if merge:
        parts, moves = [], []
        for chunk, file in merge:
            rows = live[chunk]
            data = np.load(index_dir / file, mmap_mode="r")
            parts.append(np.asarray(data[[r for r, _ in rows]]))
            moves.extend(item_id for _, item_id in rows)
        new_file = write_chunk(index_dir, np.concatenate(parts))
        manifest.replace_chunks([c for c, _ in merge], new_file, [(item_id, row) for row, item_id in enumerate(moves)])
    if dead:
        with manifest.transaction() as db:
            db.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c, _ in dead])
    for _, file in merge + dead:
        (index_dir / file).unlink(missing_ok=True)
    return len(merge) + len(dead)
