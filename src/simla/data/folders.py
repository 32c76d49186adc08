"""A directory of images as caption records: sidecar ``.txt`` files, imagefolder metadata, or file names.

Users keep image collections as folders, not as annotation files: a photo with ``photo.txt`` beside it,
Tux Paint's stamps with their multilingual descriptions, a Hugging Face ``imagefolder`` export with a
``metadata.jsonl``, or clip art whose only text is its file name. :func:`read_folder` reads all of
these, so ``train_file=photos/`` works without a conversion step.

The walk is recursive and sorted (the same folder always gives the same records in the same order);
hidden files and folders (``.name``) are skipped; symbolic links are followed, each real folder once.
"""

from __future__ import annotations

import logging
import os
import posixpath
from dataclasses import dataclass, field

from .image_metadata import METADATA_FILES, MetadataRow, read_metadata
from .path_captions import PATH_CAPTION_MODES, caption_from_path
from .records import CaptionRecord, DataFormatError
from .sidecars import read_sidecar

__all__ = ["FolderCaptions", "IMAGE_SUFFIXES", "caption_from_path", "read_folder"]

logger = logging.getLogger(__name__)

#: Recognised image file extensions (case-insensitive). When one name has several (``heart.png`` and
#: ``heart.svg``), the first in this order is used: rasters before SVG, because a raster is what the
#: author exported for display and needs no optional extra; the rest are counted as alternates.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".svg", ".svgz")
_PREFERENCE = {suffix: rank for rank, suffix in enumerate(IMAGE_SUFFIXES)}


@dataclass(frozen=True)
class FolderCaptions:
    """How captions are found for the images of a folder.

    Attributes:
        line: which non-empty line of a sidecar ``.txt`` is the caption (0 = the first); None takes
            every non-empty line as one caption of that image (several captions, like COCO's). Lines of
            the form ``xx.utf8=...`` (Tux Paint translations) are never counted.
        language: take the sidecar's ``<language>.utf8=`` line (Tux Paint convention, e.g. ``"fr"``);
            where an image's sidecar has none, ``line`` is used instead and the fallbacks are counted.
        from_path: images without a sidecar or metadata caption are left out when None; ``"name"``
            captions them from the file name, ``"path"`` from the folders and the file name (see
            :func:`caption_from_path`).
        metadata_column: the text column of ``metadata.jsonl``/``metadata.csv`` (imagefolder layout).
    """

    line: int | None = 0
    language: str | None = None
    from_path: str | None = None
    metadata_column: str = "text"

    def __post_init__(self) -> None:
        if self.line is not None and (isinstance(self.line, bool) or not isinstance(self.line, int) or self.line < 0):
            raise ValueError(f"caption line must be an int >= 0 or None, got {self.line!r}")
        if self.from_path is not None and self.from_path not in PATH_CAPTION_MODES:
            raise ValueError(f"caption_from_path must be None, 'name' or 'path', got {self.from_path!r}")
        if self.language is not None and (not isinstance(self.language, str) or not self.language.strip()):
            raise ValueError(f"caption language must be a language code such as 'fr', got {self.language!r}")
        if not isinstance(self.metadata_column, str) or not self.metadata_column:
            raise ValueError(f"metadata_column must be a non-empty column name, got {self.metadata_column!r}")


@dataclass
class _Listing:
    """What the walk found: images (relative path, sidecar path or None) and the metadata files."""

    images: list[tuple[str, str | None]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)  # relative folder ("" = root) -> metadata file
    alternates: int = 0
    orphan_texts: int = 0


@dataclass
class _Tally:
    """Counts for the one-line summary."""

    sidecar: int = 0
    metadata: int = 0
    from_path: int = 0
    fallbacks: int = 0
    left_out: list[str] = field(default_factory=list)


def _metadata_file(dirpath: str, names: set[str]) -> str | None:
    found = [name for name in METADATA_FILES if name in names]
    if len(found) > 1:
        raise DataFormatError(f"{dirpath}: both {' and '.join(found)}; keep one metadata file per folder",
                              path=dirpath)
    return os.path.join(dirpath, found[0]) if found else None


def _list_folder(listing: _Listing, root: str, dirpath: str, filenames: list[str]) -> None:
    """Add one folder's images (one per name, by preference), sidecars and metadata file to `listing`."""
    rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
    rel_dir = "" if rel_dir == "." else rel_dir
    names = {name for name in filenames if not name.startswith(".")}
    groups: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    for name in sorted(names):
        stem, suffix = os.path.splitext(name)
        if suffix.lower() in _PREFERENCE:
            groups.setdefault(stem, []).append(name)
        elif suffix.lower() == ".txt":
            texts.setdefault(stem, name)
    for stem, group in groups.items():
        chosen = min(group, key=lambda n: (_PREFERENCE[os.path.splitext(n)[1].lower()], n))
        listing.alternates += len(group) - 1
        sidecar = os.path.join(dirpath, texts[stem]) if stem in texts else None
        listing.images.append((posixpath.join(rel_dir, chosen), sidecar))
    listing.orphan_texts += sum(1 for stem in texts if stem not in groups)
    metadata = _metadata_file(dirpath, names)
    if metadata is not None:
        listing.metadata[rel_dir] = metadata


def _walk(root: str) -> _Listing:
    """Walk `root` recursively in sorted order, skipping hidden entries and visiting each real folder once."""
    listing, visited = _Listing(), set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symbolic link loop, or two links to one folder
            dirnames[:] = []
            continue
        visited.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        _list_folder(listing, root, dirpath, filenames)
    listing.images.sort()
    return listing


def _owner(rel_path: str, metadata: dict[str, str]) -> str | None:
    """The nearest folder above `rel_path` that holds a metadata file (its captions cover the subtree)."""
    folder = posixpath.dirname(rel_path)
    while True:
        if folder in metadata:
            return folder
        if not folder:
            return None
        folder = posixpath.dirname(folder)


def _metadata_records(root: str, listing: _Listing, column: str, tally: _Tally) -> list[CaptionRecord]:
    records = []
    for folder, path in sorted(listing.metadata.items()):
        rows: list[MetadataRow] = read_metadata(path, column)
        for row in rows:
            rel = posixpath.normpath(posixpath.join(folder, row.file_name.replace("\\", "/")))
            if not row.captions:
                tally.left_out.append(rel)
                continue
            records.append(CaptionRecord(os.path.join(root, *rel.split("/")), row.captions, rel))
            tally.metadata += 1
    return records


def _sidecar_record(root: str, rel: str, sidecar: str | None, options: FolderCaptions,
                    tally: _Tally) -> CaptionRecord | None:
    """The record of one image outside any metadata folder, or None when it has no caption."""
    captions: tuple[str, ...] = ()
    if sidecar is not None:
        found = read_sidecar(sidecar, options.line, options.language)
        captions = found.captions
        if captions:
            tally.sidecar += 1
            tally.fallbacks += int(found.fell_back)
    if not captions and options.from_path is not None:
        caption = caption_from_path(rel, options.from_path)
        captions = (caption,) if caption else ()
        tally.from_path += bool(captions)
    if not captions:
        tally.left_out.append(rel)
        return None
    return CaptionRecord(os.path.join(root, *rel.split("/")), captions, rel)


def _summary(root: str, listing: _Listing, tally: _Tally, records: list[CaptionRecord],
             options: FolderCaptions) -> None:
    examples = ", ".join(tally.left_out[:3]) + (", ..." if len(tally.left_out) > 3 else "")
    logger.info("%s: %d images, %d with captions (%d from sidecar .txt, %d from metadata, %d from the path), "
                "%d left out without a caption%s, %d alternate formats of the same name skipped, "
                "%d .txt files without an image", root, len(listing.images), len(records), tally.sidecar,
                tally.metadata, tally.from_path, len(tally.left_out), f" (e.g. {examples})" if examples else "",
                listing.alternates, listing.orphan_texts)
    if tally.fallbacks:
        line = "every line" if options.line is None else f"line {options.line}"
        logger.info("%s: %d captions fell back to %s (no %r line)", root, tally.fallbacks, line,
                    f"{options.language}.utf8=")


def read_folder(root: str | os.PathLike[str], options: FolderCaptions | None = None) -> list[CaptionRecord]:
    """Read a directory of images as caption records, sorted by path.

    Captions come, for each image, from the first of: the ``metadata.jsonl``/``metadata.csv`` of the
    nearest folder above it that has one (imagefolder layout; images such a file does not name are
    left out), its sidecar ``.txt`` (see :class:`FolderCaptions`), its path (``from_path``). Images with
    no caption are left out and counted in the one-line summary that is logged.

    Returns:
        Records whose ``origin`` is the image's path relative to `root` (``stamps/animals/badger.png``).

    Raises:
        FileNotFoundError: `root` is not a directory.
        DataFormatError: no image at all, no image with a caption, or a malformed sidecar/metadata file.
    """
    options = options if options is not None else FolderCaptions()
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    listing, tally = _walk(root), _Tally()
    if not listing.images and not listing.metadata:
        raise DataFormatError(f"{root}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} in every "
                              "non-hidden subfolder)", path=root)
    records = _metadata_records(root, listing, options.metadata_column, tally)
    named = {record.origin for record in records}
    for rel, sidecar in listing.images:
        if _owner(rel, listing.metadata) is None:
            record = _sidecar_record(root, rel, sidecar, options, tally)
            records += [record] if record is not None else []
        elif rel not in named:
            tally.left_out.append(rel)
    records.sort(key=lambda r: r.origin)
    _summary(root, listing, tally, records, options)
    if not records:
        raise DataFormatError(
            f"{root}: none of the {len(listing.images)} images has a caption (no sidecar .txt beside it, no "
            "metadata.jsonl/metadata.csv naming it); add caption files, or caption images from their names "
            "with caption_from_path=name (or =path; see simla.data.folders.caption_from_path)", path=root)
    return records
