"""What an index is built from: a folder of images, an annotation file, or WebDataset shards.

A scan lists every image of a source with what is needed to notice a change cheaply (size and
modification time) and to read it back later without re-scanning (the file, and for a shard sample its
member and byte offset). Nothing is decoded here: a file that is not an image is found when it is
embedded, and recorded in the index's error table then.

Scans are deterministic (sorted by key), so every process of a torchrun build sees the same list.

Reading is confined and bounded (see "What is read" in docs/search.md). Only regular files are read: a
FIFO, a device (``/dev/zero``), a socket or a directory named like an image is a scan problem, never
opened for reading, and a file swapped for one between the check and the open is caught by ``fstat`` on
the opened descriptor (opened with ``O_NONBLOCK``, so a FIFO cannot block the open). No item is read past
:func:`max_item_bytes` (``MAX_ITEM_BYTES``, 64 MiB, or ``$SIMLA_MAX_ITEM_BYTES``). A source confines its
items (:func:`source_confinement`): after following symlinks an item must lie inside the folder of a
folder source, inside the image root or the annotation file's folder of an annotation source, or be one
of the shard files of a shard source. When an index reads an item back it also checks the bytes against
the sha256 recorded at indexing time. Every refusal is an :class:`ItemUnavailableError` naming the item,
its path and the reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

from ..data.readers import SHARD_PATTERN_SEPARATOR, is_shard_pattern, read_records, split_shard_spec
from ..data.shards import IMAGE_EXTENSIONS as SHARD_IMAGE_EXTENSIONS
from ..data.shards import expand_shards
from ..errors import ConfigError, DataError, SimlaError

__all__ = ["IMAGE_SUFFIXES", "ITEM_PROBLEM_KINDS", "MAX_ITEM_BYTES", "MAX_ITEM_BYTES_ENV", "ItemUnavailableError",
           "SourceConfinement", "SourceItem", "SourceSpec", "ScanProblem", "image_mime_type", "max_item_bytes",
           "read_item_bytes", "resolve_source", "scan_source", "source_confinement"]

logger = logging.getLogger(__name__)

#: File types a folder scan picks up (case-insensitive).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

#: The most bytes one item (an image file, or a shard member) may have; larger ones are neither indexed
#: nor served. ``$SIMLA_MAX_ITEM_BYTES`` (a positive number of bytes) replaces it.
MAX_ITEM_BYTES = 64 * 1024 * 1024
MAX_ITEM_BYTES_ENV = "SIMLA_MAX_ITEM_BYTES"

#: The ``kind`` of an :class:`ItemUnavailableError` (and of the matching scan problems):
#: "missing" (cannot stat or open it, or the shard member is gone), "outside_source" (it resolves outside the
#: index's source), "not_regular" (a FIFO, device, socket or directory), "too_large" (over the size cap),
#: "changed" (its bytes differ from those indexed).
ITEM_PROBLEM_KINDS = ("missing", "outside_source", "not_regular", "too_large", "changed")

_MIB = 1024 * 1024


def max_item_bytes() -> int:
    """The size cap on one item: ``$SIMLA_MAX_ITEM_BYTES`` when set, else :data:`MAX_ITEM_BYTES`."""
    text = os.environ.get(MAX_ITEM_BYTES_ENV, "").strip()
    if not text:
        return MAX_ITEM_BYTES
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"${MAX_ITEM_BYTES_ENV}={text!r}: expected a positive number of bytes "
                          f"(the default is {MAX_ITEM_BYTES})")
    return value


def _size_text(n: int) -> str:
    return f"{n // _MIB} MiB" if n % _MIB == 0 else f"{n:,} bytes"


class ItemUnavailableError(SimlaError, OSError):
    """An item's bytes are not read: the path is outside the source, not a regular file, over the size cap,
    missing, or changed since it was indexed.

    Attributes:
        key: the item's key (or its path when no key was given).
        path: the path recorded for the item (the shard for a shard sample).
        kind: one of :data:`ITEM_PROBLEM_KINDS`.
        reason: the human-readable reason (the message is ``"{key} ({path}): {reason}"``).
    """

    def __init__(self, key: str, path: str, kind: str, reason: str) -> None:
        super().__init__(f"{key} ({path}): {reason}" if key != path else f"{path}: {reason}")
        self.key, self.path, self.kind, self.reason = key, path, kind, reason

    def __reduce__(self):  # picklable across DataLoader workers
        return type(self), (self.key, self.path, self.kind, self.reason)

    def __str__(self) -> str:
        return str(self.args[0])


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF87a", "image/gif"),
          (b"GIF89a", "image/gif"), (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff"))


def image_mime_type(data: bytes) -> str | None:
    """The MIME type of an encoded image from its first bytes (PNG, JPEG, GIF, WebP, BMP, TIFF), else None."""
    head = bytes(data[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((mime for magic, mime in _MAGIC if head.startswith(magic)), None)


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
    """Something the scan could not list (a missing annotated image, an unreadable shard, a FIFO, a file
    over the size cap); ``kind`` is the error-table kind it is recorded under."""

    key: str
    path: str
    reason: str
    size: int = -1
    mtime_ns: int = -1
    kind: str = "missing"


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


@dataclass(frozen=True)
class SourceConfinement:
    """Where a source's items may lie once symlinks are followed: inside one of ``folders``, or (shards)
    exactly one of ``files``. All paths are real (resolved) paths."""

    folders: tuple[str, ...] = ()
    files: frozenset[str] = frozenset()

    def allows(self, real: str) -> bool:
        return real in self.files or any(real == f or real.startswith(f.rstrip(os.sep) + os.sep) for f in self.folders)

    def describe(self) -> str:
        if self.folders:
            return " or ".join(self.folders)
        return f"its {len(self.files)} shard file(s)"


def _make_confinement(spec: SourceSpec) -> SourceConfinement:
    if spec.kind == "folder":
        return SourceConfinement(folders=(os.path.realpath(spec.location),))
    if spec.kind == "annotations":
        folders = [os.path.realpath(spec.image_root)] if spec.image_root else []
        folders.append(os.path.dirname(os.path.realpath(spec.location)))
        return SourceConfinement(folders=tuple(dict.fromkeys(folders)))
    try:
        shards = expand_shards(spec.location)
    except (OSError, ValueError):  # every shard is gone: nothing can be read
        shards = []
    return SourceConfinement(files=frozenset(os.path.realpath(p) for p in shards))


@lru_cache(maxsize=32)
def source_confinement(spec: SourceSpec) -> SourceConfinement:
    """The confinement of ``spec`` (cached; :func:`confine` refreshes a shard source's list on a miss)."""
    return _make_confinement(spec)


def confine(spec: SourceSpec, key: str, path: str) -> str:
    """The real path of ``path`` (symlinks followed), or :class:`ItemUnavailableError` when it is outside ``spec``."""
    real = os.path.realpath(path)
    confinement = source_confinement(spec)
    if not confinement.allows(real) and spec.kind == "shards":
        confinement = _make_confinement(spec)  # shards matched by the pattern since the list was cached
    if not confinement.allows(real):
        where = f"resolves to {real}, which is" if real != os.path.abspath(path) else "is"
        raise ItemUnavailableError(key, path, "outside_source",
                                   f"{where} outside the index's source ({confinement.describe()}); only files "
                                   f"inside the source are read")
    return real


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink")):
        if test(mode):
            return name
    return "unknown type"


def _check_stat(key: str, path: str, info: os.stat_result, limit: int | None) -> None:
    """Refuse anything but a regular file of at most ``limit`` bytes."""
    if not stat.S_ISREG(info.st_mode):
        raise ItemUnavailableError(key, path, "not_regular", f"not a regular file ({_file_type(info.st_mode)})")
    if limit is not None and info.st_size > limit:
        raise ItemUnavailableError(key, path, "too_large", f"larger than {_size_text(limit)} ({info.st_size:,} "
                                   f"bytes); set ${MAX_ITEM_BYTES_ENV} to a larger number of bytes to allow it")


def _missing(key: str, path: str, verb: str, exc: OSError) -> ItemUnavailableError:
    return ItemUnavailableError(key, path, "missing", f"cannot {verb} ({type(exc).__name__}: {exc.strerror or exc})")


def stat_regular(key: str, path: str, limit: int | None) -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), refused unless a regular file of at most ``limit`` bytes."""
    try:
        info = os.stat(path)
    except OSError as exc:  # a broken link, or a file removed during the scan
        raise _missing(key, path, "stat", exc) from exc
    _check_stat(key, path, info, limit)
    return info


def open_regular(key: str, path: str, limit: int | None, *, follow: bool = True) -> tuple[BinaryIO, os.stat_result]:
    """Open a regular file for reading without ever blocking or opening a device: checked by ``stat`` before
    the open (``O_NONBLOCK``, so a FIFO swapped in cannot block it) and by ``fstat`` after it."""
    stat_regular(key, path, limit)
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | nonblocking | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _missing(key, path, "open", exc) from exc
    try:
        info = os.fstat(fd)
        _check_stat(key, path, info, limit)  # swapped between the stat and the open
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), info
    except BaseException:
        os.close(fd)
        raise


def _candidate(key: str, path: str, confinement: SourceConfinement, limit: int, *,
               walked: bool = False) -> SourceItem | ScanProblem:
    """A scanned file as an item (a regular file inside the source, within the size cap), else a problem.

    ``walked``: the path was found by walking the (resolved) source folder, which never enters a linked
    folder, so only the file itself can be a link and a plain file needs no resolving."""
    try:
        info = stat_regular(key, path, limit)
        if (not walked or os.path.islink(path)) and not confinement.allows(os.path.realpath(path)):
            raise ItemUnavailableError(key, path, "outside_source",
                                       f"resolves to {os.path.realpath(path)}, outside the source "
                                       f"({confinement.describe()})")
    except ItemUnavailableError as exc:
        return ScanProblem(key, path, exc.reason, kind=exc.kind)
    return SourceItem(key, path, info.st_size, info.st_mtime_ns)


def scan_source(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    """Every image of the source (sorted by key) and the problems met while listing them."""
    scan = {"folder": _scan_folder, "annotations": _scan_annotations, "shards": _scan_shards}[spec.kind]
    items, problems = scan(spec)
    items.sort(key=lambda item: item.key)
    problems.sort(key=lambda problem: problem.key)
    return items, problems


def _split(found: list[SourceItem | ScanProblem]) -> tuple[list[SourceItem], list[ScanProblem]]:
    return [f for f in found if isinstance(f, SourceItem)], [f for f in found if isinstance(f, ScanProblem)]


#: Why a folder walk passes over a file by its name (None: an image candidate).
NAMED_OUT_HIDDEN = "hidden"
NAMED_OUT_SUFFIX = f"not named as images ({', '.join(IMAGE_SUFFIXES)})"


def walk_folder(root: str) -> Iterator[tuple[str, str, str | None]]:
    """Every file under `root` as (key, path, why it is passed over by name, or None), in sorted order;
    hidden folders are not entered."""
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # hidden folders are not photos
        for name in sorted(files):
            path = os.path.join(directory, name)
            key = os.path.relpath(path, root).replace(os.sep, "/")
            why = (NAMED_OUT_HIDDEN if name.startswith(".")
                   else NAMED_OUT_SUFFIX if not name.lower().endswith(IMAGE_SUFFIXES) else None)
            yield key, path, why


def _scan_folder(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    confinement, limit = source_confinement(spec), max_item_bytes()
    found: list[SourceItem | ScanProblem] = [_candidate(key, path, confinement, limit, walked=True)
                                             for key, path, why in walk_folder(spec.location) if why is None]
    return _split(found)


def _scan_annotations(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    records = read_records(spec.location, spec.image_root)
    captions: dict[str, list[str]] = {}
    for record in records:  # one item per distinct image; its captions in file order, without repeats
        image = os.path.abspath(record.image)
        seen = captions.setdefault(image, [])
        seen.extend(c for c in record.captions if c not in seen)
    confinement, limit = source_confinement(spec), max_item_bytes()
    found: list[SourceItem | ScanProblem] = []
    for image, texts in captions.items():
        entry = _candidate(image, image, confinement, limit)
        if isinstance(entry, SourceItem) and texts:
            entry = SourceItem(entry.key, entry.path, entry.size, entry.mtime_ns, "\n".join(texts))
        found.append(entry)
    return _split(found)


def _member_caption(tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo]) -> str | None:
    """The sample's caption: its .txt member, else the "caption"/"text" field of its .json member."""
    for ext in ("txt", "json"):
        member = members.get(ext)
        if member is None or member.size > max_item_bytes():
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


def _shard_samples(tar: tarfile.TarFile) -> dict[str, dict[str, tarfile.TarInfo]]:
    """The shard's file members grouped by sample key, then by (lower-case) extension."""
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    for member in tar:
        if not member.isfile():
            continue
        directory, base = os.path.split(member.name)
        if not base or base.startswith("."):
            continue
        stem, _, ext = base.partition(".")
        samples.setdefault(f"{directory}/{stem}" if directory else stem, {})[ext.lower()] = member
    return samples


def _scan_shard(shard: str, tar: tarfile.TarFile, limit: int) -> list[SourceItem | ScanProblem]:
    compressed = not shard.lower().endswith(".tar")
    found: list[SourceItem | ScanProblem] = []
    for key, members in _shard_samples(tar).items():
        image = next((members[e] for e in SHARD_IMAGE_EXTENSIONS if e in members), None)
        name = f"{os.path.basename(shard)}:{key}"
        if image is None:
            found.append(ScanProblem(name, shard, f"no image member (found: {sorted(members)})"))
        elif image.size > limit:
            found.append(ScanProblem(name, shard, f"member {image.name} is larger than {_size_text(limit)} "
                                     f"({image.size:,} bytes)", kind="too_large"))
        else:
            found.append(SourceItem(name, shard, image.size, int(image.mtime * 1e9), _member_caption(tar, members),
                                    member=image.name, offset=None if compressed else image.offset_data))
    return found


def _scan_shards(spec: SourceSpec) -> tuple[list[SourceItem], list[ScanProblem]]:
    found: list[SourceItem | ScanProblem] = []
    limit = max_item_bytes()
    for shard in expand_shards(spec.location):
        name = f"{os.path.basename(shard)}:"
        try:
            handle, _ = open_regular(name, shard, None)  # a FIFO matched by a glob must not block the scan
            # Random access ("r:*") so captions can be read and image offsets recorded in one pass.
            with handle, tarfile.open(fileobj=handle, mode="r:*") as tar:
                found.extend(_scan_shard(shard, tar, limit))
        except ItemUnavailableError as exc:
            found.append(ScanProblem(name, shard, f"unreadable shard: {exc.reason}", kind=exc.kind))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            found.append(ScanProblem(name, shard, f"unreadable shard ({type(exc).__name__}: {exc})"))
    return _split(found)


def _read_file(key: str, path: str, limit: int, expected_size: int | None, follow: bool) -> bytes:
    handle, info = open_regular(key, path, limit, follow=follow)
    with handle:
        if expected_size is not None and info.st_size != expected_size:
            raise _changed(key, path, f"{info.st_size:,} bytes now, {expected_size:,} when indexed")
        data = handle.read(limit + 1)  # never more than the cap, even if the file grew since the fstat
    if len(data) > limit:
        raise ItemUnavailableError(key, path, "too_large", f"larger than {_size_text(limit)} (it grew while read)")
    return data


def _changed(key: str, path: str, detail: str) -> ItemUnavailableError:
    return ItemUnavailableError(key, path, "changed",
                                f"changed since it was indexed ({detail}); run `simla index update`")


def _read_member(key: str, path: str, member: str, offset: int | None, size: int | None, limit: int,
                 follow: bool) -> bytes:
    if size is not None and size > limit:
        raise ItemUnavailableError(key, path, "too_large", f"member {member} is larger than {_size_text(limit)} "
                                   f"({size:,} bytes)")
    handle, info = open_regular(key, path, None, follow=follow)
    with handle:
        if offset is not None and size is not None:
            if offset + size > info.st_size:
                raise _changed(key, path, f"member {member} ends past the end of the shard")
            handle.seek(offset)
            data = handle.read(size)
            if len(data) != size:
                raise _changed(key, path, f"member {member} ends early")
            return data
        try:
            with tarfile.open(fileobj=handle, mode="r:*") as tar:
                info_member = tar.getmember(member)
                if info_member.size > limit:
                    raise ItemUnavailableError(key, path, "too_large", f"member {member} is larger than "
                                               f"{_size_text(limit)} ({info_member.size:,} bytes)")
                extracted = tar.extractfile(info_member) if info_member.isfile() else None
                if extracted is None:
                    raise ItemUnavailableError(key, path, "missing", f"member {member} is not a file")
                return extracted.read(limit + 1)
        except KeyError as exc:
            raise ItemUnavailableError(key, path, "missing", f"member {member} is not in the shard") from exc
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise _changed(key, path, f"unreadable shard: {type(exc).__name__}: {exc}") from exc


def read_item_bytes(path: str, member: str | None = None, offset: int | None = None, size: int | None = None, *,
                    key: str | None = None, source: SourceSpec | None = None, sha256: str | None = None) -> bytes:
    """The encoded image of an item: a whole file, or one member of a shard (read directly at its offset
    when the shard is uncompressed, else extracted).

    Only a regular file is opened, and no more than :func:`max_item_bytes` bytes are read. With ``source``
    the path must lie inside it once symlinks are followed (:func:`confine`); with ``sha256`` (the hash
    recorded at indexing) the bytes, and for a whole file ``size`` too, must be those indexed.

    Raises:
        ItemUnavailableError: (an ``OSError``) naming ``key`` (default ``path``) and the reason.
    """
    name = key if key is not None else path
    limit = max_item_bytes()
    real = confine(source, name, path) if source is not None else path
    follow = source is None  # a confined path is real: a symlink swapped in after confine() is refused
    try:
        if member is None:
            data = _read_file(name, real, limit, size if sha256 is not None else None, follow)
        else:
            data = _read_member(name, real, member, offset, size, limit, follow)
    except ItemUnavailableError as exc:
        if exc.path == path:
            raise
        raise ItemUnavailableError(name, path, exc.kind, exc.reason) from None  # name the recorded path
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise _changed(name, path, "its bytes differ from those indexed")
    return data
