"""Captions made from file and folder names, for collections that have no caption files.

Clip-art and icon collections name their files after what they show (``table_tennis_01.png``,
``recreation/sports/...``); a caption read off the name is weak, but it is the only text such a
collection has, and it is far better than leaving every image out.
"""

from __future__ import annotations

import re

__all__ = ["PATH_CAPTION_MODES", "caption_from_path"]

#: ``"name"``: the file name only; ``"path"``: the folders under the root, then the file name.
PATH_CAPTION_MODES = ("name", "path")

_SEPARATORS = re.compile(r"[_\-./\s]+")
# A boundary inside camelCase ("tableTennis") and before the last capital of an acronym ("HTMLPage").
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def _words(part: str) -> list[str]:
    """Lower-cased words of one name part; tokens that are only digits (``_01`` counters) are dropped."""
    words = []
    for piece in _SEPARATORS.split(part):
        words.extend(token.lower() for token in _CAMEL.split(piece) if token and not token.isdigit())
    return words


def caption_from_path(relative_path: str, mode: str) -> str:
    """A caption from an image's path relative to the collection root.

    The extension is dropped; names are split on ``_``, ``-``, ``.``, ``/``, white space and camelCase
    boundaries; tokens made only of digits are dropped (openclipart names end in ``_01``, scanners
    count ``IMG_0042``); the words are lower-cased and joined with single spaces. ``mode="name"`` uses
    the file name only, ``mode="path"`` the folder names first and then the file name.

    What is *kept*, because nothing in a name tells it apart from a title word: author names
    (openclipart appends them: ``table_tennis_omar_abo-na_01.png`` gives ``"table tennis omar abo na"``),
    truncated words (openclipart cuts titles short: ``medicina_dottore_archite_01.png`` keeps
    ``"archite"``), words with digits in them (``v2``, ``3d``) and camera prefixes such as ``img`` or
    ``dsc``. A name made only of digits gives ``""``, which the folder reader treats as no caption.

    Args:
        relative_path: the path under the collection root, ``/``-separated (``\\`` is accepted too).
        mode: ``"name"`` or ``"path"``.

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in PATH_CAPTION_MODES:
        raise ValueError(f"caption_from_path: mode must be one of {PATH_CAPTION_MODES}, got {mode!r}")
    parts = [p for p in relative_path.replace("\\", "/").split("/") if p]
    if not parts:
        return ""
    name = parts[-1]
    stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
    folders = parts[:-1] if mode == "path" else []
    return " ".join(word for part in [*folders, stem] for word in _words(part))
