"""Telling valid Unicode text from a str that holds lone surrogates.

Python lets a str carry lone surrogates (U+D800..U+DFFF): a JSON file with an escape such as "\\udcff", or
bytes that are not UTF-8 decoded with errors="surrogateescape" (which is how Python turns a non-UTF-8
command-line argument into a str). No encoder accepts them: the fast tokenizer fails with a TypeError that
names neither the text nor where it came from. Readers and the tokenizer check text with
:func:`lone_surrogate` first and report the file, record and field, or the text, instead.
"""

from __future__ import annotations

import re

__all__ = ["describe_surrogate", "lone_surrogate"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in `text`, or None when it is valid Unicode."""
    match = _SURROGATE.search(text)
    return None if match is None else match.start()


def describe_surrogate(text: str, index: int) -> str:
    """Why a text with a lone surrogate at `index` is refused, for an error message."""
    code = ord(text[index])
    origin = (f", most likely the undecodable byte 0x{code - 0xDC00:02X} of text that is not UTF-8"
              if 0xDC80 <= code <= 0xDCFF else "")
    return (f"not valid Unicode: character {index} is a lone surrogate U+{code:04X}{origin}; "
            "give the text as UTF-8")
