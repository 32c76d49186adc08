"""Reading annotation files: JSON lists of records, with errors that name the file, the record and the field.

Shared by every task's reader (retrieval, VQA, NLVR2, SNLI-VE, grounding).
"""

from __future__ import annotations

import json
import os
from typing import Any

from .readers import DataFormatError


def load_json_list(path: str | os.PathLike) -> list[Any]:
    """The records of an annotation file that must hold a JSON list."""
    return load_json(path, list)


def load_json(path: str | os.PathLike, expected: type[list] | type[dict]) -> Any:
    """Read an annotation file that must hold a JSON list (of records) or object; errors name the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such annotation file: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                                  path=path) from err
    if not isinstance(data, expected):
        what = "a JSON list of records" if expected is list else "a JSON object"
        raise DataFormatError(f"{path}: expected {what}, got {type(data).__name__}", path=path)
    return data


def record_field(path: str, index: int, obj: Any, key: str, kinds: tuple[type, ...]) -> Any:
    """`obj[key]` of record `index` of `path`, which must be one of `kinds`; errors name file, record and field."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{path}, record {index}, field {key!r}: missing", path=path, record=str(index), field=key)
    value = obj[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataFormatError(f"{path}, record {index}, field {key!r}: unexpected {type(value).__name__} {value!r:.60}",
                              path=path, record=str(index), field=key)
    return value


def join_image_root(root: str | None, image: str) -> str:
    """A record's image path joined to the image root (absolute paths are kept)."""
    return image if root is None or os.path.isabs(image) else os.path.join(root, image)
