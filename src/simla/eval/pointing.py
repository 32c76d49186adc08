"""The pointing game: does the hottest pixel of a Grad-CAM map fall inside the box of the thing named?

Grounding accuracy (`eval.grounding`) asks which of a few proposals holds the most heat; the pointing game
asks something a reader of an explain sheet checks by eye: is the map's PEAK on the object? It needs no
proposals, so it also works per word ("blue", "triangle") and not only for the whole expression.

Conventions (pure functions over (H, W) maps already upsampled to the image, and boxes [x, y, w, h] in
pixels, w and h counting whole pixels as the grounding data does):

- the peak is the first maximal pixel in row-major order (top-most, then left-most), so ties are decided
  the same way every run; pixel (row, col) stands for its centre point (col + 0.5, row + 0.5);
- a box covers the half-open region [x, x + w) x [y, y + h), so a point on a shared edge belongs to exactly
  one of two touching boxes: the one to its right (or below);
- a flat map (every pixel equal, e.g. all zero: a word the model ignores) has no peak and counts as a miss,
  and is counted separately as "flat";
- baselines: the image centre (W / 2, H / 2) as the pointed-at point, with the edge rule above (on a 2x2
  canvas it is the corner where the four tiles meet, a hit only for a shape whose box reaches that corner),
  and a uniformly random point, whose expected hit rate is the box's area (clipped to the image) over the
  image's area;
- when the other objects of the image are given (e.g. the other shapes of a canvas), a miss whose peak is
  on one of them is counted as "on another object": the map found an object, but the wrong one. A map that
  only finds objects, any of them, would hit about one time in the number of objects: the "random object"
  baseline, 1 / (1 + others) averaged over the expressions.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from ..explain.gradcam import peak_point

__all__ = [
    "FUNCTION_WORDS",
    "PointingTally",
    "centre_hits",
    "contains",
    "content_words",
    "map_hits",
    "peak_point",
    "random_point_rate",
]

BoxLike = Sequence[float]

# Words that name nothing in the image: their maps are not expected to sit on the object.
FUNCTION_WORDS = frozenset({"a", "an", "the", "that", "this", "is", "are", "which", "of", "on", "in", "at", "to",
                            "and", "with", "it", "its", "one"})


def normal_word(word: str) -> str:
    """Lower case without surrounding punctuation: "Triangle," and "triangle" are one word."""
    return re.sub(r"^\W+|\W+$", "", word.lower())


def content_words(words: Iterable[str]) -> list[int]:
    """Indices of the words that may name something in the image (not in FUNCTION_WORDS, not empty)."""
    return [i for i, word in enumerate(words) if normal_word(word) and normal_word(word) not in FUNCTION_WORDS]


def contains(box: BoxLike, point: tuple[float, float]) -> bool:
    x, y, w, h = (float(v) for v in box[:4])
    return x <= point[0] < x + w and y <= point[1] < y + h


def map_hits(heat: Tensor, box: BoxLike) -> bool:
    """Is the map's peak inside the box (False for a flat map)?"""
    point = peak_point(heat)
    return point is not None and contains(box, point)


def centre_hits(size: tuple[int, int], box: BoxLike) -> bool:
    """The centre baseline: is the image's centre point inside the box? `size` is (height, width)."""
    height, width = size
    return contains(box, (width / 2, height / 2))


def random_point_rate(size: tuple[int, int], box: BoxLike) -> float:
    """The chance that a uniformly random point of the image falls in the box: clipped area / image area."""
    height, width = size
    x, y, w, h = (float(v) for v in box[:4])
    inside_w = max(0.0, min(x + w, width) - max(x, 0.0))
    inside_h = max(0.0, min(y + h, height) - max(y, 0.0))
    return inside_w * inside_h / (height * width)


@dataclass
class _Count:
    hits: int = 0
    total: int = 0
    flat: int = 0
    other: int = 0  # misses whose peak is on another object

    def add(self, heat: Tensor, box: BoxLike, others: Sequence[BoxLike] = ()) -> bool:
        point = peak_point(heat)
        hit = point is not None and contains(box, point)
        self.hits += hit
        self.total += 1
        self.flat += point is None
        self.other += not hit and point is not None and any(contains(b, point) for b in others)
        return hit

    def figures(self) -> dict[str, Any]:
        rate = round(100 * self.hits / self.total, 2) if self.total else None
        return {"hits": self.hits, "total": self.total, "rate": rate, "flat": self.flat,
                "on_another_object": self.other}


def _summed(counts: Iterable[_Count]) -> _Count:
    counts = list(counts)
    return _Count(*(sum(getattr(c, name) for c in counts) for name in ("hits", "total", "flat", "other")))


@dataclass
class PointingTally:
    """Pointing-game counts over expressions: the whole text's map, each content word's map, the baselines."""

    text: _Count = field(default_factory=_Count)
    words: dict[str, _Count] = field(default_factory=dict)
    centre_hits: int = 0
    random_sum: float = 0.0
    random_object_sum: float = 0.0

    def add(self, box: BoxLike, text_heat: Tensor, words: Sequence[str] = (),
            word_heats: Sequence[Tensor] | Tensor | None = None, others: Sequence[BoxLike] = ()) -> bool:
        """Count one expression: its (H, W) whole-text map and, if given, its words' maps (only content words
        are counted); `others` are the boxes of the image's other objects. Returns whether the whole-text
        map's peak is inside the box."""
        size = tuple(text_heat.shape)
        hit = self.text.add(text_heat, box, others)
        self.centre_hits += centre_hits(size, box)
        self.random_sum += random_point_rate(size, box)
        self.random_object_sum += 1 / (1 + len(others))
        if word_heats is not None:
            for index in content_words(words):
                self.words.setdefault(normal_word(words[index]), _Count()).add(word_heats[index], box, others)
        return hit

    def figures(self, groups: Mapping[str, Collection[str]] | None = None) -> dict[str, Any]:
        """Hit rates in percent (with counts): the whole text, all content words, each word, each named group
        of words (e.g. {"colour words": COLOURS}), and the two baselines."""
        def share(amount: float) -> float | None:
            return round(100 * amount / self.text.total, 2) if self.text.total else None

        every = _summed(self.words.values())
        out: dict[str, Any] = {
            "expressions": self.text.total,
            "whole_text": self.text.figures(),
            "content_words": every.figures(),
            "centre": {"hits": self.centre_hits, "total": self.text.total, "rate": share(self.centre_hits)},
            "random_point": share(self.random_sum),
            "random_object": share(self.random_object_sum),
        }
        if groups:
            out["groups"] = {}
            for name, members in groups.items():
                counts = [self.words[w] for w in {normal_word(m) for m in members} if w in self.words]
                out["groups"][name] = _summed(counts).figures()
        out["by_word"] = {word: self.words[word].figures() for word in sorted(self.words)}
        return out
