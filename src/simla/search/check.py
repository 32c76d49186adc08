"""`simla index check [--repair]`: find damage in an index folder and repair what can be repaired.

What counts as damage:

- the manifest: SQLite cannot read it, ``PRAGMA integrity_check`` reports a problem, a table is missing, or
  the ``meta`` table lacks what every index records (format version, source, fingerprint, dimension);
- a feature chunk: missing, unreadable, not float16, not (registered rows, dimension), holding NaN or
  infinite values, or registered under a path that is not ``features/<name>.npy`` inside the folder (such
  a path is reported and never opened or deleted);
- an item that points at no chunk or at a row its chunk lacks.

The repair runs under the index's write lock. Damaged chunks and their items are dropped from the manifest
(their files deleted when they lie inside the index), then an update re-embeds those images if the model
checkpoint is available. A manifest that cannot be read is set aside as ``manifest.sqlite.damaged`` and
the index is built again from the source and checkpoint it recorded, when those can still be read and
exist; otherwise the report says which command rebuilds it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .index import Index, IndexNotFoundError
from .lock import write_lock
from .manifest import MANIFEST_NAME, REQUIRED_TABLES, CorruptIndexError, Manifest
from .precision import INT8
from .sources import SourceSpec
from .store import CorruptChunkError, chunk_path, load_chunk

__all__ = ["CheckReport", "RepairReport", "check_index", "repair_index"]

REQUIRED_META = ("format_version", "source", "fingerprint", "dim")


@dataclass
class CheckReport:
    """What :func:`check_index` found: problems of the manifest, damaged chunks, items without features."""

    path: Path
    manifest_problems: list[str] = field(default_factory=list)
    damaged_chunks: dict[int, tuple[str, str]] = field(default_factory=dict)  # chunk id -> (file, reason)
    dangling_items: list[int] = field(default_factory=list)
    items: int = 0
    chunks: int = 0

    @property
    def healthy(self) -> bool:
        return not (self.manifest_problems or self.damaged_chunks or self.dangling_items)

    def describe(self) -> str:
        if self.manifest_problems:
            return "\n".join([f"{self.path}: DAMAGED manifest {self.path / MANIFEST_NAME}:"]
                             + [f"  {problem}" for problem in self.manifest_problems])
        head = f"{self.path}: {self.items:,} items in {self.chunks:,} feature chunks"
        if self.healthy:
            return f"{head}: healthy"
        lines = [f"{head}: DAMAGED"]
        lines += [f"  chunk {file}: {reason}" for file, reason in self.damaged_chunks.values()]
        if self.dangling_items:
            lines.append(f"  {len(self.dangling_items):,} items point at a missing chunk or row")
        lines.append(f"  run `simla index check {self.path} --repair` to drop and re-embed the affected images")
        return "\n".join(lines)


@dataclass
class RepairReport:
    """What :func:`repair_index` found, did, and found afterwards."""

    before: CheckReport
    actions: list[str] = field(default_factory=list)
    after: CheckReport | None = None

    @property
    def healthy(self) -> bool:
        return (self.after or self.before).healthy

    def describe(self) -> str:
        lines = [self.before.describe()] + [f"repair: {action}" for action in self.actions]
        if self.after is not None and self.after is not self.before:
            lines.append(f"after the repair: {self.after.describe()}")
        return "\n".join(lines)


def _manifest_problems(path: Path) -> list[str]:
    """Problems SQLite finds in the manifest file, or that its tables and meta reveal; [] when sound."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return [f"cannot be opened: {exc}"]
    try:
        rows = [row[0] for row in db.execute("PRAGMA integrity_check")]
        if rows != ["ok"]:
            return [f"integrity check: {row}" for row in rows[:10]]
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        missing = [t for t in REQUIRED_TABLES if t not in tables]
        if missing:
            return [f"missing table{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
                    + (" (the file is empty)" if path.stat().st_size == 0 else "")]
        keys = {row[0] for row in db.execute("SELECT key FROM meta")}
        absent = [k for k in REQUIRED_META if k not in keys]
        return [f"meta lacks {', '.join(absent)}"] if absent else []
    except sqlite3.Error as exc:
        return [f"unreadable: {exc}"]
    finally:
        db.close()


def _check_chunks(folder: Path, manifest: Manifest, report: CheckReport) -> None:
    """Fill in the chunk and item findings of ``report`` from a readable manifest."""
    dim = manifest.get_meta("dim")
    chunks = manifest.chunks()
    report.items, report.chunks = manifest.count_items(), len(chunks)
    for chunk, file, rows in chunks:
        try:
            load_chunk(folder, file, rows, dim, check_values=True)
        except CorruptChunkError as exc:
            report.damaged_chunks[chunk] = (file, exc.reason)
    report.dangling_items = manifest.dangling_items()


def check_index(path: str | os.PathLike) -> CheckReport:
    """Check an index's manifest and every feature chunk (see the module doc); changes nothing."""
    folder = Path(path)
    if not (folder / MANIFEST_NAME).is_file():
        raise IndexNotFoundError(f"{folder}: no simla index here (no {MANIFEST_NAME})")
    report = CheckReport(folder, _manifest_problems(folder / MANIFEST_NAME))
    if report.manifest_problems:
        return report
    try:
        manifest = Manifest(folder / MANIFEST_NAME)
    except CorruptIndexError as exc:
        report.manifest_problems.append(str(exc))
        return report
    try:
        _check_chunks(folder, manifest, report)
    except CorruptIndexError as exc:  # the manifest broke while being read
        report.manifest_problems.append(str(exc))
    finally:
        manifest.close()
    return report


def _drop_damaged(folder: Path, report: CheckReport, actions: list[str]) -> int:
    """Forget the damaged chunks and dangling items; delete the damaged chunk files inside the index."""
    manifest = Manifest(folder / MANIFEST_NAME)
    try:
        dropped = manifest.forget(list(report.damaged_chunks), report.dangling_items)
    finally:
        manifest.close()
    actions.append(f"dropped {len(report.damaged_chunks)} damaged chunk(s) and their {dropped} item(s) from "
                   f"the manifest")
    for file, _ in report.damaged_chunks.values():
        try:
            path = chunk_path(folder, file)
        except CorruptChunkError:
            actions.append(f"left {file!r} alone: it is not a chunk of this index")
            continue
        if path.exists():
            path.unlink()
            actions.append(f"deleted {file}")
    return dropped


def _usable_checkpoint(folder: Path, checkpoint: str | os.PathLike | None, recorded: str | None) -> str | None:
    """The checkpoint to re-embed with (given, else recorded), or None when there is none on disk."""
    chosen = os.fspath(checkpoint) if checkpoint is not None else recorded
    return chosen if chosen is not None and Path(chosen).exists() else None


def _reembed(folder: Path, checkpoint: str | None, dropped: int, options: dict[str, Any], actions: list[str]) -> None:
    """Run an update to embed the dropped images again, or say how to when no checkpoint is at hand."""
    if checkpoint is None:
        actions.append(f"the index's model checkpoint is not available: run `simla index update {folder} "
                       f"--checkpoint C` to embed the {dropped} dropped image(s) again")
        return
    index = Index.open(folder, checkpoint=checkpoint, device=options.pop("device", "cpu"))
    try:
        summary = index.update(**options)
    finally:
        index.close()
    actions.append(f"ran an update with {checkpoint}: embedded {summary.embedded} image(s); "
                   f"the index holds {summary.items} items")


def _read_meta(path: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}
    finally:
        db.close()


def _salvage_meta(path: Path) -> dict[str, Any]:
    """Whatever ``meta`` rows can still be read from a damaged manifest ({} when none).

    A manifest cut short (its header promises more pages than the file has) is read from a copy padded
    with empty pages to the promised size: the meta table lies in its first pages.
    """
    try:
        return _read_meta(path)
    except (sqlite3.Error, ValueError):
        pass
    data = path.read_bytes()
    if len(data) < 100 or not data.startswith(b"SQLite format 3\x00"):
        return {}
    page_size = int.from_bytes(data[16:18], "big")
    page_size = 65_536 if page_size == 1 else page_size
    promised = page_size * int.from_bytes(data[28:32], "big")
    if not len(data) < promised <= 64 * len(data) + (1 << 20):
        return {}
    with tempfile.TemporaryDirectory() as scratch:
        padded = Path(scratch) / MANIFEST_NAME
        padded.write_bytes(data + bytes(promised - len(data)))
        try:
            return _read_meta(padded)
        except (sqlite3.Error, ValueError):
            return {}


def _rebuild(folder: Path, checkpoint: str | os.PathLike | None, options: dict[str, Any],
             actions: list[str]) -> None:
    """Set an unreadable manifest aside and build the index again, if its source and checkpoint are known."""
    meta = _salvage_meta(folder / MANIFEST_NAME)
    usable = _usable_checkpoint(folder, checkpoint, meta.get("checkpoint"))
    source = meta.get("source")
    if not isinstance(source, dict) or usable is None:
        actions.append(f"the manifest cannot be repaired and its {'checkpoint' if source else 'source'} is not "
                       f"known or not on disk: move {folder} away and run `simla index build SOURCE --checkpoint C "
                       f"--output {folder}`")
        return
    spec = SourceSpec(**source)
    damaged = folder / f"{MANIFEST_NAME}.damaged"
    os.replace(folder / MANIFEST_NAME, damaged)
    for suffix in ("-journal", "-wal", "-shm"):
        (folder / f"{MANIFEST_NAME}{suffix}").unlink(missing_ok=True)
    actions.append(f"set the damaged manifest aside as {damaged.name}")
    if options.get("precision") == "auto" and meta.get("precision") == INT8:
        options = {**options, "precision": INT8}  # rebuilt in the precision it was built with
    index = Index.build(spec.location, folder, checkpoint=usable, image_root=spec.image_root, **options)
    actions.append(f"rebuilt the index from {spec.location} with {usable}: {len(index)} items")
    index.close()


def repair_index(path: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None, device: str = "cpu",
                 batch_size: int = 64, num_workers: int = 2, precision: str = "auto",
                 progress: bool = True) -> RepairReport:
    """Check the index and repair what the check found, under the write lock (see the module doc)."""
    folder = Path(path)
    options = {"batch_size": batch_size, "num_workers": num_workers, "precision": precision, "progress": progress}
    with write_lock(folder):
        result = RepairReport(check_index(folder))
        if result.before.healthy:
            result.actions.append("nothing to repair")
            return result
        if result.before.manifest_problems:
            _rebuild(folder, checkpoint, {**options, "device": device}, result.actions)
        else:
            dropped = _drop_damaged(folder, result.before, result.actions)
            recorded = Manifest(folder / MANIFEST_NAME)
            try:
                usable = _usable_checkpoint(folder, checkpoint, recorded.get_meta("checkpoint"))
            finally:
                recorded.close()
            _reembed(folder, usable, dropped, {**options, "device": device}, result.actions)
        result.after = check_index(folder)
    return result
