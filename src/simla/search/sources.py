"""What an index is built from: a folder of images, an annotation file, or WebDataset shards.

A scan lists every image of a source with what is needed to notice a change cheaply (size and
modification time) and to read it back later without re-scanning (the file, and for a shard sample its
member and byte offset). Nothing is decoded here: a file that is not an image is found when it is
embedded, and recorded in the index's error table then.

Scans are deterministic (sorted by key), so every process of a torchrun build sees the same list.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..data.readers import SHARD_PATTERN_SEPARATOR, is_shard_pattern, read_records, split_shard_spec
from ..data.shards import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS
from ..data.shards import expand_shards
from ..errors import DataError

__all__ = ["IMAGE_SUFFIXES", "SourceItem", "SourceSpec", "ScanProblem", "read_item_bytes", "resolve_source",
           "scan_source"]

logger = logging.getLogger(__name__)

#: File types a folder scan picks up (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class SourceSpec:
    """A resolved source: ``kind`` is "folder", "annotations" or "shards"; paths are absolute."""

    kind: str
    location: str
    image_root: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"kind": self.kind, "location": self.location, "image_root": self.image_root}


@dataclass(frozen=True)
class SourceItem:
    """One image of a source.

    Attributes:
        key: the stable name: the path relative to a folder, the (absolute) image path of an annotation
            record, or ``"shard.tar:key"`` for a WebDataset sample.
        path: the file holding the image (the shard for a WebDataset sample).
        size: bytes of the image.
        mtime_ns: modification time of the image file (of the tar member for a shard sample).
        caption: the source's caption(s), newline-separated, or None.
        member: the tar member of a shard sample's image, else None.
        offset: the byte offset of that member's data in an uncompressed shard, for direct reads.
    """

    key: str
    path: str
    size: int
    mtime_ns: int
    caption: str | None = None
    member: str | None = None
    offset: int | None = None


@dataclass(frozen=True)
class ScanProblem:
    """Something the scan could not list (a missing annotated image, an unreadable shard)."""

    key: str
    path: str
    reason: str
    size: int = -1
    mtime_ns: int = -1


def resolve_source(source: str | os.PathLike, image_root: str | os.PathLike | None = None) -> SourceSpec:
    """Classify ``source`` and make its paths absolute, or raise a clear error before any work.

    Raises:
        FileNotFoundError: the folder or annotation file does not exist, or a shard pattern matches nothing.
        DataError: a file that is neither an annotation file nor a shard.
    """
    text = os.fspath(source)
    if is_shard_pattern(text):
        shards = expand_shards(text)  # raises when nothing matches
        logger.info("source: %d WebDataset shards", len(shards))
        # Keep relative shard patterns usable from any working directory.
        location = SHARD_PATTERN_SEPARATOR.join(os.path.abspath(p) for p in split_shard_spec(text))
        return SourceSpec("shards", location)
    path = Path(text)
    if path.is_dir():
        return SourceSpec("folder", str(path.resolve()))
    if not path.exists():
        raise FileNotFoundError(f"source not found: {text} (expected a folder of images, a .json/.jsonl/.csv/.tsv "
                                f"annotation file or a .tar shard pattern)")
    if path.suffix.lower() in (".json", ".jsonl", ".csv", ".tsv", ".tab"):
        root = Path(image_root).resolve() if image_root is not None else path.resolve().parent
        return SourceSpec("annotations", str(path.resolve()), str(root))
    raise DataError(f"{text}: not a folder, an annotation file (.json, .jsonl, .csv, .tsv) or a .tar shard")


def scan_source(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    """Every image of the source (sorted by key) and the problems met while listing them."""
    scan = {"folder": _scan_folder, "annotations": _scan_annotations, "shards": _scan_shards}[spec.kind]
    items, problems = scan(spec)
    items.sort(key=lambda item: item.key)
    problems.sort(key=lambda problem: problem.key)
    return items, problems


def _scan_folder(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    items, problems = [], []
    root = spec.location
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # hidden folders are not photos
        for name in sorted(files):
            if name.startswith(".") or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            path = os.path.join(directory, name)
            key = os.path.relpath(path, root).replace(os.sep, "/")
            try:
                stat = os.stat(path)
            except OSError as exc:  # a broken link, or a file removed during the scan
                problems.append(ScanProblem(key, path, f"cannot stat ({type(exc).__name__}: {exc.strerror or exc})"))
                continue
            items.append(SourceItem(key, path, stat.st_size, stat.st_mtime_ns))
    return items, problems


def _scan_annotations(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    records = read_records(spec.location, spec.image_root)
    captions: dict[str, list[str]] = {}
    for record in records:  # one item per distinct image; its captions in file order, without repeats
        image = os.path.abspath(record.image)
        seen = captions.setdefault(image, [])
        seen.extend(c for c in record.captions if c not in seen)
    items, problems = [], []
    for image, texts in captions.items():
        caption = "\n".join(texts) if texts else None
        try:
            stat = os.stat(image)
        except OSError as exc:
            problems.append(ScanProblem(image, image, f"cannot stat ({type(exc).__name__}: {exc.strerror or exc})"))
            continue
        items.append(SourceItem(image, image, stat.st_size, stat.st_mtime_ns, caption))
    return items, problems


def _member_caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> str | None:
    """The sample's caption: its .txt member, else the "caption"/"text" field of its .json member."""
    for ext in ("txt", "json"):
        member = members.get(ext)
        if member is None:
            continue
        handle = tar.extractfile(member)
        data = handle.read() if handle is not None else b""
        try:
            if ext == "txt":
                return data.decode("utf-8")
            meta = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if isinstance(meta, dict):
            text = meta.get("caption") if meta.get("caption") is not None else meta.get("text")
            return text if isinstance(text, str) else None
    return None


def _scan_shards(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    items, problems = [], []
    for shard in expand_shards(spec.location):
        compressed = not shard.lower().endswith(".tar")
        samples: dict[str, dict[str, tarfile.TarInfo]] = {}
        try:
            # Random access ("r:*") so captions can be read and image offsets recorded in one pass.
            with tarfile.open(shard, mode="r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    directory, base = os.path.split(member.name)
                    if not base or base.startswith("."):
                        continue
                    stem, _, ext = base.partition(".")
                    samples.setdefault(f"{directory}/{stem}" if directory else stem, {})[ext.lower()] = member
                for key, members in samples.items():
                    image = next((members[e] for e in SHARD_IMAGE_EXTENSIONS if e in members), None)
                    name = f"{os.path.basename(shard)}:{key}"
                    if image is None:
                        problems.append(ScanProblem(name, shard, f"no image member (found: {sorted(members)})"))
                        continue
                    items.append(SourceItem(name, shard, image.size, int(image.mtime * 1e9),
                                            _member_caption(tar, members), member=image.name,
                                            offset=None if compressed else image.offset_data))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            problems.append(ScanProblem(f"{os.path.basename(shard)}:", shard,
                                        f"unreadable shard ({type(exc).__name__}: {exc})"))
    return items, problems


def read_item_bytes(path: str, member: str | None = None, offset: int | None = None, size: int | None = None) -> bytes:
    """The encoded image of an item: a whole file, or one member of a shard (read directly at its offset
    when the shard is uncompressed, else extracted)."""
    if member is None:
        with open(path, "rb") as f:
            return f.read()
    if offset is not None and size is not None:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: member {member} ends early (shard changed since it was indexed?)")
        return data
    with tarfile.open(path, mode="r:*") as tar:
        handle = tar.extractfile(member)
        if handle is None:
            raise OSError(f"{path}: member {member} is not a file")
        return handle.read()
