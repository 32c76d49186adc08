"""The caption record and the format error that every caption reader shares.

They live apart from :mod:`simla.data.readers` so that the folder reader (:mod:`simla.data.folders`),
which :func:`~simla.data.readers.read_records` dispatches to, can build records without importing the
module that imports it. :mod:`simla.data.readers` re-exports both names, where users know them from.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError

__all__ = ["CaptionRecord", "DataFormatError", "format_error"]


class DataFormatError(DataError):
    """An annotation file (or shard specification, or image folder) is malformed.

    The message always names the file and, where there is one, the record and the field. The same
    facts are kept as attributes so that callers (a CLI, a test) need not parse the message.
    """

    def __init__(self, message: str, *, path: str | None = None, record: str | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.record = record
        self.field = field


@dataclass(frozen=True, slots=True)
class CaptionRecord:
    """One image with its caption(s), as read from an annotation file or an image folder.

    Attributes:
        image: the image path, absolute as given or joined to ``image_root`` when relative.
        captions: one or more captions; when there are several, the dataset samples one each time.
        origin: where the record came from, for error messages (``"train.json[17]"``,
            ``"pairs.csv:42"``, ``"cc3m.jsonl:9"``, or for a folder the image's path under it).
    """

    image: str
    captions: tuple[str, ...]
    origin: str


def format_error(path: str, record: str, field: str | None, problem: str) -> DataFormatError:
    """Build the uniform ``file, record, field: problem`` message."""
    where = f"{path}, {record}" + (f", field {field!r}" if field is not None else "")
    return DataFormatError(f"{where}: {problem}", path=path, record=record, field=field)
