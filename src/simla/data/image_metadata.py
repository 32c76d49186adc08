"""Hugging Face ``imagefolder`` metadata: ``metadata.jsonl`` / ``metadata.csv`` beside the images.

Each row names an image by ``file_name`` (a path relative to the folder holding the metadata file) and
carries its caption in a text column (``text`` by default). Folders exported for ``datasets`` keep their
captions this way, so reading them directly spares users a conversion to JSON.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass

from .records import DataFormatError, format_error

__all__ = ["METADATA_FILES", "MetadataRow", "read_metadata"]

#: The metadata file names, in the order they are looked for.
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_FILE_NAME = "file_name"


@dataclass(frozen=True)
class MetadataRow:
    """One metadata row: the image path relative to the metadata's folder, its captions, its line."""

    file_name: str
    captions: tuple[str, ...]
    line: int


def _row(path: str, line: int, obj: object, column: str) -> MetadataRow:
    """Validate one row (a JSON object or a CSV row as a dict)."""
    record = f"line {line}"
    if not isinstance(obj, dict):
        raise format_error(path, record, None, f"expected an object with {_FILE_NAME!r} and {column!r}, "
                                               f"got {type(obj).__name__}")
    for key in (_FILE_NAME, column):
        if key not in obj:
            raise format_error(path, record, key, f"missing (fields found: {sorted(obj)})")
    name = obj[_FILE_NAME]
    if not isinstance(name, str) or not name.strip():
        raise format_error(path, record, _FILE_NAME, f"expected a non-empty relative path, got {name!r:.60}")
    if name.startswith("/"):
        raise format_error(path, record, _FILE_NAME, f"{name!r:.60} is absolute; paths are relative to the "
                                                     "metadata file's folder")
    text = obj[column]
    captions = (text,) if isinstance(text, str) else text
    if not isinstance(captions, list | tuple) or not all(isinstance(c, str) for c in captions):
        raise format_error(path, record, column, f"expected a string or a list of strings, got {text!r:.60}")
    return MetadataRow(name.strip(), tuple(c for c in captions if c.strip()), line)


def _read_jsonl(path: str, column: str) -> list[MetadataRow]:
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise format_error(path, f"line {line_no}", None, f"invalid JSON at column {exc.colno}: "
                                                                  f"{exc.msg}") from exc
            rows.append(_row(path, line_no, obj, column))
    return rows


def _read_csv(path: str, column: str) -> list[MetadataRow]:
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [name.strip() for name in next(reader, [])]
        if not header:
            raise DataFormatError(f"{path}: empty file, expected a header with {_FILE_NAME!r} and {column!r}",
                                  path=path)
        for key in (_FILE_NAME, column):
            if key not in header:
                raise format_error(path, "line 1", key, f"column not found; columns found: {header} (set "
                                                        "metadata_column to the caption column)")
        try:
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise format_error(path, f"line {reader.line_num}", None,
                                       f"expected {len(header)} fields as in the header, found {len(row)}")
                rows.append(_row(path, reader.line_num, dict(zip(header, row)), column))
        except csv.Error as exc:
            raise format_error(path, f"line {reader.line_num}", None, f"unreadable row: {exc}") from exc
    return rows


def read_metadata(path: str, column: str = "text") -> list[MetadataRow]:
    """Read ``metadata.jsonl`` or ``metadata.csv``; any malformed row names the file, line and field.

    Rows whose captions are all empty are kept with no captions: the folder reader leaves their
    images out and counts them, as it does for images without a sidecar.
    """
    if path.endswith(".jsonl"):
        return _read_jsonl(path, column)
    return _read_csv(path, column)
