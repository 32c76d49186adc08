"""Bring an index in line with its source: embed new and changed images, drop deleted ones.

A build and an update are the same operation (an update of an empty index is a build), and both resume
an interrupted run: what a finished batch committed is in the manifest and is not embedded again.

Change detection is cheap first and exact second: a file whose size and modification time match the
manifest is taken as unchanged without being read (as make and rsync do); any other known file is read
and hashed, and only re-embedded when its bytes differ. Files that failed before are retried only when
their size or time changed.

Under torchrun, every rank scans the source and computes the same work list, embeds every world-th
image and commits its own batches (SQLite serialises the commits); rank 0 removes deleted items before
and merges the feature files after.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..data.images import BadSampleError, load_image
from ..data.transforms import EvalView
from ..distributed import get_rank, get_world_size, is_distributed
from ..errors import ConfigError, SimlaError
from ..models.quantize import INT8, is_int8
from .manifest import Manifest, StoredError
from .sources import ItemUnavailableError, ScanProblem, SourceItem, SourceSpec, read_item_bytes, scan_source, walk_folder
from .store import compact, remove_orphans, write_chunk


__all__ = ["NoImagesError", "SyncSummary", "describe_no_images", "sync_index"]

logger = logging.getLogger(__name__)

#: "int8": the model must be an int8 copy (`simla.models.quantize.quantize_int8`), run as it is (CPU only).
PRECISIONS = ("auto", "fp32", "bf16", INT8)


class NoImagesError(SimlaError, ValueError):
    """A build found no image it could index in its source; the message says what was skipped and why."""


#: How the "no images" message names each error-table kind.
_KIND_TEXT = {"missing": "missing", "unreadable": "unreadable", "corrupt": "corrupt or not an image",
              "truncated": "empty or truncated", "too_large": "too large", "unsupported": "unsupported format",
              "outside_source": "links outside the source"}


def _named_out(spec: SourceSpec) -> dict[str, list[str]]:
    """Files of a folder source that the scan passes over by their name, grouped by why."""
    skipped: dict[str, list[str]] = {}
    if spec.kind == "folder":
        for key, _, why in walk_folder(spec.location):
            if why is not None:
                skipped.setdefault(why, []).append(key)
    return skipped


def describe_no_images(spec: SourceSpec, errors: list[StoredError], shown: int = 3) -> str:
    """Why a source gave no usable image: the files skipped, counted by reason, with the first few names."""
    groups = _named_out(spec)
    for error in errors:
        groups.setdefault(_KIND_TEXT.get(error.kind, error.kind.replace("_", " ")), []).append(error.key)
    if not groups:
        return {"folder": "the folder holds no files", "annotations": "the annotation file lists no images",
                "shards": "the shards hold no image members"}.get(spec.kind, "nothing found")
    total = sum(len(keys) for keys in groups.values())
    parts = []
    for reason, keys in sorted(groups.items(), key=lambda group: -len(group[1])):
        more = f", +{len(keys) - shown} more" if len(keys) > shown else ""
        parts.append(f"{len(keys)} {reason}: {', '.join(keys[:shown])}{more}")
    return f"{total} file{'s' if total != 1 else ''} skipped: " + "; ".join(parts)


@dataclass
class SyncSummary:
    """What one build/update did (on this process; under torchrun the totals are rank 0's view)."""

    scanned: int = 0
    added: int = 0
    changed: int = 0
    unchanged: int = 0
    touched: int = 0  # size/time changed but the bytes did not: kept without embedding
    deleted: int = 0
    failed: int = 0  # new errors recorded by this run
    skipped_errors: int = 0  # known bad files, unchanged, not retried
    items: int = 0  # items in the index afterwards
    errors: int = 0  # rows of the error table afterwards
    embedded: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, reason) of this run's new errors

    @property
    def images_per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        lines = [f"scanned {self.scanned:,} images: {self.added:,} new, {self.changed:,} changed, "
                 f"{self.unchanged + self.touched:,} unchanged, {self.deleted:,} deleted",
                 f"embedded {self.embedded:,} in {self.seconds:.1f} s ({self.images_per_second:.1f} images/s)",
                 f"index: {self.items:,} items, {self.errors:,} files in the error table"
                 + (f" ({self.failed:,} new this run)" if self.failed else "")]
        lines += [f"  skipped {key}: {reason}" for key, reason in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more (simla index info --errors)")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Work:
    item: SourceItem
    known_sha: str | None  # the stored hash when the item is in the index already


class _WorkImages(Dataset):
    """Reads, hashes and decodes one work item; failures come back as values, never as exceptions, so
    one bad file costs one error row, not a batch."""

    def __init__(self, work: list[_Work], view: EvalView) -> None:
        self.work, self.view = work, view

    def __len__(self) -> int:
        return len(self.work)

    def __getitem__(self, index: int) -> dict:
        item = self.work[index].item
        try:
            data = read_item_bytes(item.path, item.member, item.offset, item.size)
        except ItemUnavailableError as exc:  # not a regular file, over the size cap, gone
            return {"index": index, "error": (exc.kind, exc.reason)}
        except OSError as exc:
            return {"index": index, "error": ("unreadable", f"cannot read ({type(exc).__name__}: {exc})")}
        sha = hashlib.sha256(data).hexdigest()
        if sha == self.work[index].known_sha:
            return {"index": index, "sha": sha, "same_bytes": True}
        try:
            image = load_image(data, name=item.key)
        except BadSampleError as exc:
            return {"index": index, "error": (exc.kind, exc.reason)}
        return {"index": index, "sha": sha, "pixels": self.view(image), "size": image.size}


def _as_list(batch: list[dict]) -> list[dict]:
    return batch


def _plan(manifest: Manifest, items: list[SourceItem],
          problems: list[ScanProblem]) -> tuple[list[_Work], list[str], dict[str, int]]:
    """(work to embed or check, keys to delete, counts) from the scan and the manifest."""
    stored = {item.key: item for item in manifest.items()}
    errors = {error.key: error for error in manifest.errors()}
    work, counts = [], {"added": 0, "changed": 0, "unchanged": 0, "skipped_errors": 0}
    for item in items:
        known = stored.get(item.key)
        if known is not None and (known.size, known.mtime_ns, known.path) == (item.size, item.mtime_ns, item.path):
            counts["unchanged"] += 1
            continue
        bad = errors.get(item.key)
        if known is None and bad is not None and (bad.size, bad.mtime_ns) == (item.size, item.mtime_ns):
            counts["skipped_errors"] += 1
            continue
        counts["changed" if known is not None else "added"] += 1
        work.append(_Work(item, known.sha256 if known is not None else None))
    present = {item.key for item in items} | {problem.key for problem in problems}
    deleted = [key for key in stored if key not in present] + [key for key in errors if key not in present]
    return work, deleted, counts


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def _drop_deleted(index_dir: Path, manifest: Manifest, deleted: list[str], problems: list[ScanProblem],
                  summary: SyncSummary) -> None:
    """Rank 0, before embedding: forget deleted items, mark the index incomplete, record missing files."""
    remove_orphans(index_dir, manifest)
    summary.deleted = manifest.remove(deleted)
    manifest.set_meta({"complete": False})
    known_errors = {e.key for e in manifest.errors()}
    new_problems = [p for p in problems if p.key not in known_errors]
    manifest.record_errors([{"key": p.key, "path": p.path, "reason": p.reason, "kind": p.kind,
                             "size": p.size, "mtime_ns": p.mtime_ns} for p in problems])
    summary.failed += len(new_problems)
    summary.failures += [(p.key, p.reason) for p in new_problems]


def _autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context the embedding runs under for ``precision`` on ``device``."""
    # "auto": bf16 on a GPU; fp32 on a CPU, where bf16 is slower unless the CPU has bf16 instructions
    # (the paper model embeds at 0.56x the fp32 rate on this project's test machine).
    # "int8": the quantized copy runs its own kernels, without autocast.
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)


def _embed(model, good: list[dict], autocast: torch.autocast) -> np.ndarray:
    """(len(good), D) float32 features of the decoded images in ``good`` (a (0, 0) array for none)."""
    if not good:
        return np.zeros((0, 0), dtype=np.float16)
    pixels = torch.stack([b["pixels"] for b in good]).to(model.device)
    with autocast:
        return model.encode_image(pixels).float().cpu().numpy()


def _item_row(item: SourceItem, result: dict) -> dict:
    """The manifest row of an embedded item."""
    return {"key": item.key, "path": item.path, "member": item.member, "offset": item.offset,
            "size": item.size, "mtime_ns": item.mtime_ns, "sha256": result["sha"],
            "caption": item.caption, "width": result["size"][0], "height": result["size"][1]}


def _error_row(item: SourceItem, result: dict) -> dict:
    """The error-table row of an item that could not be read or decoded."""
    kind, reason = result["error"]
    return {"key": item.key, "path": item.path, "size": item.size, "mtime_ns": item.mtime_ns,
            "kind": kind, "reason": reason}


def _commit_batch(index_dir: Path, manifest: Manifest, model, autocast: torch.autocast, mine: list[_Work],
                  batch: list[dict], summary: SyncSummary) -> None:
    """Embed one loaded batch and commit it: features chunk, item rows, error rows, touched items."""
    good = [b for b in batch if "pixels" in b]
    features = _embed(model, good, autocast)
    summary.embedded += len(good)
    rows = [_item_row(mine[b["index"]].item, b) for b in good]
    errors = []
    for b in batch:
        if "error" in b:
            errors.append(_error_row(mine[b["index"]].item, b))
            summary.failures.append((errors[-1]["key"], errors[-1]["reason"]))
    summary.failed += len(errors)
    same = [mine[b["index"]].item for b in batch if b.get("same_bytes")]
    if same:
        manifest.touch([(i.key, i.path, i.size, i.mtime_ns, i.member, i.offset) for i in same])
        summary.touched += len(same)
    chunk = write_chunk(index_dir, features) if rows else ""
    manifest.add_batch(chunk, len(rows), rows, errors)


def _embed_work(index_dir: Path, manifest: Manifest, model, mine: list[_Work], summary: SyncSummary, *,
                batch_size: int, num_workers: int, precision: str, progress: bool) -> None:
    """Read, embed and commit this rank's share of the work, batch by batch."""
    model.eval()
    view = EvalView(model.config.vision.image_size)
    loader = DataLoader(_WorkImages(mine, view), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_as_list)
    autocast = _autocast(model.device, precision)
    quiet = not progress or get_rank() != 0 or not mine  # no bar for no work
    with tqdm(total=len(mine), desc="indexing", unit="img", disable=quiet) as bar:
        for batch in loader:
            _commit_batch(index_dir, manifest, model, autocast, mine, batch, summary)
            bar.update(len(batch))


@torch.no_grad()
def sync_index(index_dir: Path, manifest: Manifest, spec: SourceSpec, model, *, batch_size: int = 64,
               num_workers: int = 2, precision: str = "auto", progress: bool = True) -> SyncSummary:
    """Embed what the manifest lacks, drop what the source lost, merge feature files; see the module doc."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if (precision == INT8) != is_int8(model):
        raise ConfigError("precision int8 embeds with an int8 copy of the model (quantize_int8) and only with one; "
                          f"got precision {precision!r} and a {'int8' if is_int8(model) else 'float'} model")
    if spec.kind == "folder" and not os.path.isdir(spec.location):
        # os.walk would list nothing, and the update would drop every item of an unmounted or moved folder.
        raise FileNotFoundError(f"the index's source folder {spec.location} is gone (moved, deleted or not "
                                f"mounted); the index {index_dir} is left as it was")
    start = time.perf_counter()
    rank, world = get_rank(), get_world_size()
    items, problems = scan_source(spec)
    work, deleted, counts = _plan(manifest, items, problems)
    summary = SyncSummary(scanned=len(items), **counts)
    _barrier()  # every rank has planned from the same manifest before rank 0 changes it
    if rank == 0:
        _drop_deleted(index_dir, manifest, deleted, problems, summary)
    _barrier()
    _embed_work(index_dir, manifest, model, work[rank::world], summary, batch_size=batch_size,
                num_workers=num_workers, precision=precision, progress=progress)
    # The changed-but-same-bytes items were counted as changed in the plan; they are unchanged in fact.
    summary.changed -= summary.touched
    _barrier()
    if rank == 0:
        compact(index_dir, manifest)
        manifest.set_meta({"complete": True, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    _barrier()
    summary.items, summary.errors = manifest.count_items(), manifest.count_errors()
    summary.seconds = time.perf_counter() - start
    if summary.failures:
        for key, reason in summary.failures[:50]:
            logger.info("not indexed: %s: %s", key, reason)
    return summary
