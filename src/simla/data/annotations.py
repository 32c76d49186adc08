"""Reading annotation files: JSON lists of records, with errors that name the file, the record and the field.

Shared by every task's reader (retrieval, VQA, NLVR2, SNLI-VE, grounding).
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..unicode_text import describe_surrogate, lone_surrogate
from .readers import DataFormatError


def load_json_list(path: str | os.PathLike) -> list[Any]:
    """The records of an annotation file that must hold a JSON list."""
    return load_json(path, list)


def load_records(path: str | os.PathLike) -> list[Any]:
    """The records of a task's annotation file (training or evaluation): a JSON list that must hold at least one.

    An empty list is an error naming the file, raised while reading, before any model is loaded or run
    folder made: training on it would fail later, and evaluating it would report a meaningless 'accuracy
    None% on 0 examples'.
    """
    records = load_json_list(path)
    if not records:
        raise DataFormatError(f"{path} holds no records (an empty JSON list); expected at least one record",
                              path=str(path))
    return records


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
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start} is 0x{err.object[err.start]:02X}); "
                                  "annotation files must be UTF-8 JSON", path=path) from err
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
    check_text(path, index, key, value)
    return value


def check_text(path: str, index: int | str, key: str, value: Any) -> None:
    """Refuse a string (or a list's string) with a lone surrogate, which no tokenizer can encode."""
    items = value if isinstance(value, list) else [value]
    for position, item in enumerate(items):
        where = f"{key}[{position}]" if isinstance(value, list) else key
        spot = lone_surrogate(item) if isinstance(item, str) else None
        if spot is not None:
            raise DataFormatError(f"{path}, record {index}, field {where!r}: {item!r:.60} is "
                                  f"{describe_surrogate(item, spot)}", path=path, record=str(index), field=where)


def join_image_root(root: str | None, image: str) -> str:
    """A record's image path joined to the image root (absolute paths are kept)."""
    return image if root is None or os.path.isabs(image) else os.path.join(root, image)
