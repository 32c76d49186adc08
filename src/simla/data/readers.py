"""Annotation readers for image–caption data: the reference JSON list, JSON Lines, CSV/TSV and image folders.

Every reader validates the whole file up front and raises :class:`DataFormatError` naming the file,
the record (list index or line number) and the field. A pretraining run reads its annotations once,
before any model is built, so a typo in line 3,000,000 stops the run in seconds instead of crashing
a worker hours later.

Only *format* errors are raised here. Content problems that can only be seen when a sample is loaded
(an unreadable image, a caption that is empty after cleaning) are the dataset's business: it logs,
counts and replaces such samples, so an empty caption is kept as ``""`` here.

The module also parses shard *specifications* (``is_shard_pattern``, ``split_shard_spec``,
``brace_expand``), which need no torch, so a CLI can tell the two kinds of data apart cheaply;
reading the shards themselves lives in :mod:`simla.data.shards`.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, Union

from ..unicode_text import describe_surrogate, lone_surrogate
from .folders import FolderCaptions, read_folder
from .records import CaptionRecord, DataFormatError
from .records import format_error as _error

__all__ = [
    "CaptionRecord",
    "brace_expand",
    "DataFormatError",
    "FolderCaptions",
    "is_shard_pattern",
    "read_csv_records",
    "read_json_records",
    "read_records",
    "split_shard_spec",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

_JSON_SUFFIXES = (".json", ".jsonl")
_CSV_SUFFIXES = (".csv", ".tsv", ".tab")
_TSV_SUFFIXES = (".tsv", ".tab")
# img2dataset writes plain .tar; compressed shards are read just as well by tarfile's "r|*" mode.
_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# WebDataset's convention for several shard patterns in one string.
SHARD_PATTERN_SEPARATOR = "::"
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def _describe(value: Any) -> str:
    """A short description of a bad value for error messages (type plus a truncated repr)."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _resolve_image(image: str, image_root: str | None) -> str:
    """Absolute paths are kept as given; relative ones are joined to ``image_root`` when given."""
    if image_root is None or os.path.isabs(image):
        return image
    return os.path.join(image_root, image)


def _record_from_object(obj: Any, path: str, record: str, origin: str,
                        image_root: str | None) -> CaptionRecord:
    """Validate one ``{"image": ..., "caption": ...}`` object; extra keys (e.g. image_id) are ignored."""
    if not isinstance(obj, dict):
        raise _error(path, record, None, f"expected an object with 'image' and 'caption', got "
                                         f"{_describe(obj)}")
    for key in ("image", "caption"):
        if key not in obj:
            raise _error(path, record, key, f"missing (keys found: {sorted(obj)})")
    image = obj["image"]
    if not isinstance(image, str) or not image:
        raise _error(path, record, "image", f"expected a non-empty string path, got {_describe(image)}")
    caption = obj["caption"]
    if isinstance(caption, str):
        captions: tuple[str, ...] = (caption,)
    elif isinstance(caption, list):
        if not caption:
            raise _error(path, record, "caption", "expected a string or a non-empty list of strings, "
                                                  "got an empty list")
        for i, item in enumerate(caption):
            if not isinstance(item, str):
                raise _error(path, record, f"caption[{i}]", f"expected a string, got {_describe(item)}")
        captions = tuple(caption)
    else:
        raise _error(path, record, "caption", f"expected a string or a non-empty list of strings, got "
                                              f"{_describe(caption)}")
    for i, text in enumerate(captions):
        spot = lone_surrogate(text)
        if spot is not None:
            field = "caption" if isinstance(caption, str) else f"caption[{i}]"
            raise _error(path, record, field, f"{text!r:.60} is {describe_surrogate(text, spot)}")
    return CaptionRecord(image=_resolve_image(image, image_root), captions=captions, origin=origin)


def _read_json_list(path: str, image_root: str | None) -> list[CaptionRecord]:
    """The reference format: one JSON document holding a list of records."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
                                  path=path, record=f"line {exc.lineno}") from exc
    if not isinstance(data, list):
        raise DataFormatError(f"{path}: expected a JSON list of {{'image', 'caption'}} records at the top "
                              f"level, got {type(data).__name__}", path=path)
    return [_record_from_object(obj, path, f"record {i}", f"{path}[{i}]", image_root)
            for i, obj in enumerate(data)]


def _read_json_lines(path: str, image_root: str | None) -> list[CaptionRecord]:
    """JSON Lines: one record object per line; blank lines are allowed (editors add them)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(f"{path}, line {line_no}: invalid JSON at column {exc.colno}: {exc.msg}",
                                      path=path, record=f"line {line_no}") from exc
            records.append(_record_from_object(obj, path, f"line {line_no}", f"{path}:{line_no}", image_root))
    return records


def read_json_records(path: PathLike, image_root: PathLike | None = None) -> list[CaptionRecord]:
    """Read a reference-style JSON list ``[{"image": ..., "caption": str | [str, ...]}, ...]``.

    Files ending in ``.jsonl`` are read as JSON Lines (one object per line) instead.

    Args:
        path: the annotation file.
        image_root: directory that relative image paths are joined to; absolute paths are kept.

    Returns:
        The records, in file order.

    Raises:
        DataFormatError: invalid JSON (with line and column), a top level that is not a list, or a
            record that is not an object, lacks ``image``/``caption`` or has the wrong types.
    """
    path = os.fspath(path)
    root = None if image_root is None else os.fspath(image_root)
    if path.lower().endswith(".jsonl"):
        return _read_json_lines(path, root)
    return _read_json_list(path, root)


def _default_delimiter(path: str) -> str:
    """Tab for .tsv/.tab (open_clip's and CC3M's convention), comma otherwise."""
    return "\t" if path.lower().endswith(_TSV_SUFFIXES) else ","


def read_csv_records(path: PathLike, image_root: PathLike | None = None, image_key: str = "filepath",
                     caption_key: str = "title", delimiter: str | None = None) -> list[CaptionRecord]:
    """Read a CSV/TSV file with a header row (open_clip's convention: ``filepath`` and ``title``).

    Args:
        path: the annotation file.
        image_root: directory that relative image paths are joined to; absolute paths are kept.
        image_key: the column holding image paths.
        caption_key: the column holding captions.
        delimiter: field separator; None picks tab for ``.tsv``/``.tab`` and comma otherwise.

    Returns:
        The records, in file order; ``origin`` is ``"file:line"`` (physical line, header is line 1).
        An empty caption is kept as ``""``: the dataset treats it as a bad sample at load time.

    Raises:
        DataFormatError: an empty file, a missing column (the message lists the columns found), a row
            whose field count differs from the header, or a row with an empty image field.
    """
    path = os.fspath(path)
    root = None if image_root is None else os.fspath(image_root)
    sep = _default_delimiter(path) if delimiter is None else delimiter
    records = []
    # utf-8-sig: spreadsheet exports often start with a BOM, which would otherwise glue itself to the
    # first column name and make "filepath" look missing. newline="" lets csv handle quoted newlines.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=sep)
        try:
            header = next(reader)
        except StopIteration:
            raise DataFormatError(f"{path}: empty file, expected a header row with columns "
                                  f"{image_key!r} and {caption_key!r}", path=path) from None
        except csv.Error as exc:
            raise DataFormatError(f"{path}, line 1: unreadable header: {exc}", path=path, record="line 1") from exc
        columns = [name.strip() for name in header]
        for key in (image_key, caption_key):
            if key not in columns:
                raise DataFormatError(
                    f"{path}: column {key!r} not found; columns found: {columns} (delimiter {sep!r}; set "
                    f"image_key/caption_key/delimiter to match the file)", path=path, record="line 1", field=key)
        image_col, caption_col = columns.index(image_key), columns.index(caption_key)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise _error(path, f"line {reader.line_num}", None, f"unreadable row: {exc}") from exc
            line = reader.line_num  # physical line where the row ends (quoted fields may span lines)
            if not row:
                continue  # csv yields [] for a blank line
            if len(row) != len(columns):
                # Usually an unquoted delimiter inside a caption: reading on would shift the columns.
                raise _error(path, f"line {line}", None, f"expected {len(columns)} fields as in the header "
                                                         f"(delimiter {sep!r}), found {len(row)}")
            image = row[image_col].strip()
            if not image:
                raise _error(path, f"line {line}", image_key, "empty image path")
            records.append(CaptionRecord(image=_resolve_image(image, root), captions=(row[caption_col],),
                                         origin=f"{path}:{line}"))
    return records


def _as_list(files: PathLike | Sequence[PathLike]) -> list[str]:
    """Accept one path or a sequence of paths (a str is one path, not a sequence of characters)."""
    if isinstance(files, (str, os.PathLike)):
        return [os.fspath(files)]
    return [os.fspath(f) for f in files]


def read_records(files: PathLike | Sequence[PathLike], image_root: PathLike | None = None, *,
                 image_key: str = "filepath", caption_key: str = "title",
                 folder: FolderCaptions | None = None) -> list[CaptionRecord]:
    """Read and concatenate annotation files and image folders, dispatching on what each path is.

    A directory goes to :func:`~simla.data.folders.read_folder` (sidecar ``.txt`` captions, Tux Paint
    languages, imagefolder ``metadata.jsonl``/``.csv``, or captions from file names, as ``folder``
    says); its images are found under it, so ``image_root`` does not apply to it. Files go by extension:
    ``.json``/``.jsonl`` to :func:`read_json_records`, ``.csv``/``.tsv``/``.tab`` to
    :func:`read_csv_records`. Every path is checked for existence and a known kind before any is read,
    so a typo in the last path of a list fails immediately.

    Args:
        files: one path or a sequence of paths, concatenated in order.
        image_root: directory that relative image paths of annotation files are joined to.
        image_key: CSV/TSV column with image paths.
        caption_key: CSV/TSV column with captions.
        folder: how captions are found in image folders (default: :class:`FolderCaptions` defaults).

    Returns:
        All records, path after path.

    Raises:
        FileNotFoundError: a path does not exist (named in the message).
        DataFormatError: an unknown extension, no paths at all, or any format error of a reader.
    """
    paths = _as_list(files)
    if not paths:
        raise DataFormatError("no annotation files given")
    for path in paths:
        _check_path(path)
    records: list[CaptionRecord] = []
    for path in paths:
        if os.path.isdir(path):
            part = read_folder(path, folder)
        elif path.lower().endswith(_JSON_SUFFIXES):
            part = read_json_records(path, image_root)
        else:
            part = read_csv_records(path, image_root, image_key=image_key, caption_key=caption_key)
        logger.info("read %d records from %s", len(part), path)
        records.extend(part)
    return records


def _check_path(path: str) -> None:
    """Fail early on a path that is neither an image folder nor an existing file of a known kind."""
    if os.path.isdir(path):
        return
    lower = path.lower()
    if lower.endswith(_SHARD_SUFFIXES):
        raise DataFormatError(f"{path}: WebDataset tar shards cannot be read as annotation files (or "
                              f"mixed with them); give the shards on their own", path=path)
    if not lower.endswith(_JSON_SUFFIXES + _CSV_SUFFIXES):
        raise DataFormatError(f"{path}: unknown annotation file extension; expected an image folder or a file "
                              f"ending in one of {', '.join(_JSON_SUFFIXES + _CSV_SUFFIXES)}", path=path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file not found: {path}")


def split_shard_spec(spec: str | Iterable[str]) -> list[str]:
    """Split a shard specification into its patterns: ``"a.tar::b.tar"``, a list, or a list of such."""
    items = [spec] if isinstance(spec, str) else list(spec)
    patterns: list[str] = []
    for item in items:
        patterns.extend(p.strip() for p in os.fspath(item).split(SHARD_PATTERN_SEPARATOR) if p.strip())
    return patterns


def is_shard_pattern(spec: str | Sequence[str]) -> bool:
    """True when ``spec`` names WebDataset tar shards rather than annotation files.

    Every pattern (separated by ``::`` or given as a list) must end in ``.tar`` (or ``.tar.gz``/
    ``.tgz``); brace ranges before the suffix are fine, e.g. ``"data/{00000..00009}.tar"``. A mix of
    shards and annotation files gives False, and :func:`read_records` then rejects the shards with a
    clear message.
    """
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if not isinstance(spec, (str, Sequence)):
        return False
    patterns = split_shard_spec(spec)
    return bool(patterns) and all(p.lower().endswith(_SHARD_SUFFIXES) for p in patterns)


def _scan_group(text: str, start: int) -> tuple[int, list[str]]:
    """For the ``{`` at ``start``: the index of its closing ``}`` (-1 if none) and its top-level parts."""
    depth, last, parts = 0, start + 1, list[str]()
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i, parts + [text[last:i]]
        elif text[i] == "," and depth == 1:
            parts.append(text[last:i])
            last = i + 1
    return -1, []


def _numeric_range(first: str, last: str) -> list[str]:
    """``00000..00009`` -> zero-padded numbers; padding applies when an endpoint has a leading zero."""
    lo, hi = int(first), int(last)
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (first, last))
    width = max(len(first), len(last)) if padded else 0
    step = 1 if hi >= lo else -1
    return [str(n).zfill(width) for n in range(lo, hi + step, step)]


def brace_expand(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{a,b}`` lists and ``{00000..00009}`` numeric ranges, nestable.

    A brace group that is neither a list nor a range is kept literally, as bash does.

    Raises:
        ValueError: an unbalanced ``{``.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end, alternatives = _scan_group(pattern, start)
    if end < 0:
        raise ValueError(f"unbalanced '{{' in shard pattern {pattern!r}")
    prefix, inner, suffix = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    match = _RANGE.match(inner)
    if len(alternatives) > 1:
        options = [expanded for alt in alternatives for expanded in brace_expand(alt)]
    elif match:
        options = _numeric_range(match.group(1), match.group(2))
    else:
        options = ["{" + expanded + "}" for expanded in brace_expand(inner)]
    tails = brace_expand(suffix)
    return [prefix + option + tail for option in options for tail in tails]
