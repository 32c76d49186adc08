"""Caption files beside images (``photo.jpg`` + ``photo.txt``), including Tux Paint's language lines.

A sidecar holds one caption per non-empty line. Tux Paint's stamp descriptions add translations as
``xx.utf8=...`` lines (``fr.utf8=``, ``pt_BR.utf8=``, ``ca@valencia.utf8=``) after an English first
line; such lines are never counted as plain lines, so line 0 of a Tux Paint file is its English
description and a language is chosen explicitly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .records import format_error

__all__ = ["SidecarCaptions", "parse_sidecar", "read_sidecar"]

_LANGUAGE_LINE = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Za-z0-9]+)?(?:@[A-Za-z0-9]+)?)\.utf-?8=(.*)$", re.IGNORECASE)


@dataclass(frozen=True)
class SidecarCaptions:
    """What one sidecar gave: its captions (possibly none) and whether the language had to fall back."""

    captions: tuple[str, ...]
    fell_back: bool = False


def _split(text: str) -> tuple[list[str], dict[str, str]]:
    """Plain non-empty lines, and the language lines as ``{code: caption}`` (the first of each code)."""
    plain, languages = [], {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        match = _LANGUAGE_LINE.match(line)
        if match:
            languages.setdefault(match.group(1), match.group(2).strip())
        else:
            plain.append(line)
    return plain, languages


def _language_caption(languages: dict[str, str], language: str) -> str:
    """The caption for ``language``: its exact code first, else a regional one (``pt`` finds ``pt_BR``)."""
    if languages.get(language):
        return languages[language]
    for code, caption in languages.items():
        if caption and code.split("_")[0].split("@")[0].lower() == language.lower():
            return caption
    return ""


def parse_sidecar(text: str, line: int | None = 0, language: str | None = None) -> SidecarCaptions:
    """Captions of a sidecar's text.

    Args:
        text: the file's text.
        line: which plain (non-language) non-empty line is the caption, counted from 0; None takes
            every plain line as one caption of the image (several captions, like COCO's).
        language: take the ``<language>.utf8=`` line instead; when there is none, fall back to ``line``
            (reported as ``fell_back`` so that the folder reader can count it).
    """
    plain, languages = _split(text)
    if language is not None:
        chosen = _language_caption(languages, language)
        if chosen:
            return SidecarCaptions((chosen,))
    fell_back = language is not None
    if line is None:
        return SidecarCaptions(tuple(plain), fell_back)
    return SidecarCaptions((plain[line],) if line < len(plain) else (), fell_back)


def read_sidecar(path: str, line: int | None = 0, language: str | None = None) -> SidecarCaptions:
    """Read and parse one sidecar file; text that is not UTF-8 is a format error naming file and line."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        raise format_error(path, f"line {line_no}", None, f"not UTF-8 text (byte {exc.start}: {exc.reason}); "
                                                          "save the caption file as UTF-8") from exc
    return parse_sidecar(text, line, language)
