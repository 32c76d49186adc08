"""What a search returns: ranked hits with every score that decided their place."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Hit:
    """One search result.

    Attributes:
        rank: 1-based position in the full result list (after re-ranking and duplicate collapsing).
        item_id: the item's id in the index manifest (stable across updates while the file is unchanged).
        key: the item's stable name: its path relative to a folder source, the image path of an
            annotation record, or ``"shard.tar:key"`` for a WebDataset sample.
        path: where the image lives: the image file, or the shard file for a WebDataset sample.
        caption: the caption from the source, when it has one.
        score: the final ranking score (see :class:`simla.search.Index` for the fusion rule).
        itc: cosine similarity of the ITC features of query and item.
        itm: ITM match probability when the hit was re-ranked, else ``None``.
        duplicates: keys of near-duplicate items collapsed into this hit, best first.
    """

    rank: int
    item_id: int
    key: str
    path: str
    caption: str | None
    score: float
    itc: float
    itm: float | None = None
    duplicates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
