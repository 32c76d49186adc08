"""An offline image–caption dataset for ``simla demo``, built from the ``easy-vqa`` package.

easy-VQA ships small (64x64) PNG images, each showing a single shape (circle, rectangle or
triangle) in one of eight colours on a light background, together with generated questions and
answers about them. It has no captions and no label file, so this module recovers every image's
shape and colour *from its own question–answer pairs* and writes captions from a handful of
templates. The result is a tiny, real, fully offline dataset on which a small SIMLA can be
pretrained and evaluated for zero-shot retrieval (image ↔ "a red circle") in minutes.

How the labels are derived. The dataset's questions come from a few dozen templates
(``what color is the circle?``, ``is there not a red shape?``, ``does the image contain a
triangle?`` ...). Every pair is turned into *evidence*: an attribute (shape or colour), a value and
whether the value is present or absent.

* Open questions (``what shape ...``, ``what color ...``) name the value in the answer. The
  generator only asks about things that are in the image, so a value named in the question itself
  (``what is the color of the *circle*?``) is evidence too; several images are only labelled
  through this.
* Yes/no questions mention exactly one value; ``yes`` confirms it, ``no`` excludes it, and a
  negation in the question (``is there *not* a ...``, ``is *no* ... present``) flips that.

An attribute is resolved when the evidence leaves exactly one candidate: the single confirmed
value, or, with nothing confirmed, the single value of the vocabulary that was not excluded. An
image whose evidence contradicts itself is counted as *conflicting*; one whose evidence leaves
several candidates is *unresolved*; both are left out.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..atomic_write import write_atomically

__all__ = [
    "CAPTION_TEMPLATES",
    "COLOURS",
    "SHAPES",
    "ShapeImage",
    "caption_for",
    "canonical_caption",
    "class_of",
    "label_easy_vqa",
    "write_pretraining_json",
    "write_retrieval_json",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

# The closed vocabularies of easy-VQA (checked against the package's answer list when labelling:
# resolving a value by exclusion is only sound when the vocabulary is complete). The dataset spells
# "gray" the American way; the labels keep the dataset's spelling so captions match its questions.
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
_YES_NO = ("yes", "no")
_SPLITS = ("train", "test")

# Caption templates. Short, lower-case and free of punctuation, so that ``pre_caption`` leaves them
# unchanged. The backgrounds are near-white pastel tints, hence "light" rather than "white".
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape}",
    "a {colour} {shape} on a light background",
    "a {shape} that is {colour}",
    "the shape is a {colour} {shape}",
    "a picture of a {colour} {shape}",
    "a single {colour} {shape}",
    "an image with a {colour} {shape}",
    "a {colour} {shape} on a plain background",
)

_WORD = re.compile(r"[a-z]+")
# Words that flip the meaning of a yes/no question ("is there NOT a ...", "is NO ... present").
_NEGATIONS = frozenset({"not", "no"})
# Words that mark an open question as asking for the colour rather than the shape.
_COLOUR_WORDS = frozenset({"color", "colour"})

_SHAPE = "shape"
_COLOUR = "colour"


@dataclass(frozen=True)
class ShapeImage:
    """One easy-VQA image with the shape and colour recovered from its questions and answers.

    Attributes:
        image: absolute path of the PNG.
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.
        split: ``"train"`` or ``"test"`` (easy-VQA's own split).
    """

    image: str
    shape: str
    colour: str
    split: str


@dataclass(frozen=True)
class _Evidence:
    """What one question–answer pair says: ``value`` of ``attribute`` is present (or absent)."""

    attribute: str
    value: str
    present: bool


@dataclass
class _Tally:
    """All evidence gathered for one attribute of one image."""

    confirmed: set[str] = field(default_factory=set)
    excluded: set[str] = field(default_factory=set)

    def add(self, value: str, present: bool) -> None:
        (self.confirmed if present else self.excluded).add(value)


def _attribute_of(word: str) -> str | None:
    """``"shape"`` or ``"colour"`` for a vocabulary word, None for any other word."""
    if word in SHAPES:
        return _SHAPE
    if word in COLOURS:
        return _COLOUR
    return None


def _parse_qa(question: str, answer: str) -> list[_Evidence] | None:
    """Turn one question–answer pair into evidence about the image, or None if it is not understood.

    Parsing is by vocabulary words and negations rather than by exact template, but strict: a
    yes/no question must mention exactly one value, and an open question's answer must belong to
    the attribute it asks for. Anything else is reported as not understood instead of guessed at.
    """
    words = _WORD.findall(question.lower())
    answer = answer.strip().lower()
    mentions = [(attr, w) for w in words if (attr := _attribute_of(w)) is not None]
    negated = any(w in _NEGATIONS for w in words)
    if answer in _YES_NO:
        if len(mentions) != 1:
            return None
        attr, value = mentions[0]
        # "no" to "is there NOT a red shape?" means a red shape is there.
        return [_Evidence(attr, value, (answer == "yes") != negated)]
    answer_attr = _attribute_of(answer)
    asked = _COLOUR if any(w in _COLOUR_WORDS for w in words) else _SHAPE
    if answer_attr is None or answer_attr != asked or negated:
        return None
    evidence = [_Evidence(answer_attr, answer, True)]
    # The generator only asks "what color is the circle?" about an image with a circle in it, so
    # the value named in the question is evidence as well (checked by the conflict count).
    evidence.extend(_Evidence(attr, value, True) for attr, value in mentions)
    return evidence


def _resolve(vocabulary: Sequence[str], tally: _Tally) -> tuple[str | None, bool]:
    """Resolve one attribute: (value or None, whether the evidence is contradictory)."""
    confirmed, excluded = tally.confirmed, tally.excluded
    if len(confirmed) > 1 or confirmed & excluded:
        return None, True
    if confirmed:
        return next(iter(confirmed)), False
    remaining = [v for v in vocabulary if v not in excluded]
    if not remaining:
        return None, True  # every value was excluded: the image cannot exist as described
    return (remaining[0], False) if len(remaining) == 1 else (None, False)


def _check_vocabulary(answers: Iterable[str]) -> None:
    """Fail loudly if the installed easy-VQA's answers are not exactly the vocabulary assumed here.

    Resolving by exclusion ("not a circle, not a triangle, so a rectangle") is only correct when
    the vocabulary is complete, so a different dataset version must not be labelled silently.
    """
    found = {a.strip().lower() for a in answers}
    expected = set(SHAPES) | set(COLOURS) | set(_YES_NO)
    if found != expected:
        raise ValueError(
            f"easy-vqa's answer list differs from the vocabulary simla.demo_data assumes: "
            f"unexpected {sorted(found - expected)}, missing {sorted(expected - found)}")


def _load_split(split: str) -> tuple[tuple[list[str], list[str], list[int]], dict[int, str], list[str]]:
    """The split's (questions, answers, image ids), its {image id: path} and the answer list."""
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    try:
        import easy_vqa  # type: ignore[import-untyped]
    except ImportError as exc:  # an optional dev dependency: say how to get it
        raise ImportError("the demo dataset needs the 'easy-vqa' package (pip install easy-vqa)") from exc
    if split == "train":
        qa, paths = easy_vqa.get_train_questions(), easy_vqa.get_train_image_paths()
    else:
        qa, paths = easy_vqa.get_test_questions(), easy_vqa.get_test_image_paths()
    return qa, paths, list(easy_vqa.get_answers())


def label_easy_vqa(split: str) -> tuple[list[ShapeImage], dict[str, int]]:
    """Label every image of an easy-VQA split with the shape and colour its questions imply.

    Args:
        split: ``"train"`` (4,000 images) or ``"test"`` (1,000 images).

    Returns:
        The labelled images, sorted by easy-VQA image id, and the counts ``{"images": n,
        "labelled": m, "unresolved": u, "conflicting": c}`` with ``n == m + u + c``.

    Raises:
        ValueError: an unknown split, or an easy-VQA whose answer vocabulary is not the expected one.
        ImportError: easy-vqa is not installed.
    """
    (questions, answers, image_ids), paths, vocabulary = _load_split(split)
    _check_vocabulary(vocabulary)
    tallies: dict[int, dict[str, _Tally]] = {i: {_SHAPE: _Tally(), _COLOUR: _Tally()} for i in paths}
    not_understood = orphans = 0
    for question, answer, image_id in zip(questions, answers, image_ids):
        if image_id not in tallies:
            orphans += 1  # a question about an image file that is not there: nothing to label
            continue
        evidence = _parse_qa(question, answer)
        if evidence is None:
            not_understood += 1
            logger.debug("easy-vqa %s image %d: ignoring %r -> %r", split, image_id, question, answer)
            continue
        for e in evidence:
            tallies[image_id][e.attribute].add(e.value, e.present)
    if not_understood or orphans:
        logger.warning("easy-vqa %s: ignored %d question(s) not understood and %d about missing images",
                       split, not_understood, orphans)

    items: list[ShapeImage] = []
    unresolved = conflicting = 0
    for image_id in sorted(tallies):
        shape, shape_conflict = _resolve(SHAPES, tallies[image_id][_SHAPE])
        colour, colour_conflict = _resolve(COLOURS, tallies[image_id][_COLOUR])
        if shape_conflict or colour_conflict:
            conflicting += 1
            logger.debug("easy-vqa %s image %d: contradictory answers %s", split, image_id, tallies[image_id])
        elif shape is None or colour is None:
            unresolved += 1
            logger.debug("easy-vqa %s image %d: not enough answers %s", split, image_id, tallies[image_id])
        else:
            items.append(ShapeImage(os.path.abspath(paths[image_id]), shape, colour, split))
    counts = {"images": len(tallies), "labelled": len(items), "unresolved": unresolved,
              "conflicting": conflicting}
    logger.info("easy-vqa %s: %s", split, counts)
    return items, counts


def class_of(item: ShapeImage) -> str:
    """The item's class name, ``"<colour> <shape>"`` (24 classes in all)."""
    return f"{item.colour} {item.shape}"


def canonical_caption(item: ShapeImage) -> str:
    """The one caption used for retrieval evaluation: ``"a <colour> <shape>"``."""
    return CAPTION_TEMPLATES[0].format(colour=item.colour, shape=item.shape)


def caption_for(item: ShapeImage, rng: random.Random) -> str:
    """One caption for ``item`` from a template drawn with ``rng`` (same rng state, same caption)."""
    return rng.choice(CAPTION_TEMPLATES).format(colour=item.colour, shape=item.shape)


def _image_rng(item: ShapeImage, seed: int) -> random.Random:
    """A generator private to one image, so its captions do not depend on the other items or their order.

    Keyed on the file name rather than the absolute path, so the captions do not change when the
    package is installed somewhere else. String seeds are hashed with SHA-512 by ``random``, which
    (unlike ``hash()``) is the same in every process.
    """
    return random.Random(f"{seed}:{item.split}:{Path(item.image).name}")


def _write_json(records: list[dict[str, Any]] | dict[str, Any], path: PathLike) -> Path:
    """Write ``records`` (a JSON list or object) atomically, so a crash never leaves a half-written file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(records, f, indent=1)
            f.write("\n")

    return write_atomically(out, write)


def _as_list(items: Iterable[ShapeImage]) -> list[ShapeImage]:
    """Materialise ``items``; an empty dataset is an upstream bug, so it is refused here."""
    items = list(items)
    if not items:
        raise ValueError("no items to write")
    return items


def write_pretraining_json(items: Iterable[ShapeImage], path: PathLike, captions_per_image: int = 3,
                           seed: int = 0, templates: Sequence[str] = CAPTION_TEMPLATES) -> Path:
    """Write the reference pretraining JSON, ``[{"image": abs_path, "caption": [captions...]}]``.

    Each image gets ``captions_per_image`` *different* captions (the dataset samples one per
    step), chosen by a generator seeded from ``seed`` and the image's file name: the same seed gives
    the same file, whatever the order or subset of items.

    Args:
        items: labelled images, e.g. from :func:`label_easy_vqa`.
        path: the JSON file to write (parent directories are created).
        captions_per_image: 1 to ``len(templates)``.
        seed: the caption seed.
        templates: the caption templates to draw from (``{colour}`` and ``{shape}`` fields).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: ``captions_per_image`` out of range, or no items.
    """
    if not 1 <= captions_per_image <= len(templates):
        raise ValueError(f"captions_per_image must be between 1 and {len(templates)}, "
                         f"got {captions_per_image}")
    records = []
    for item in _as_list(items):
        # Sampling templates without replacement keeps an image's captions distinct.
        chosen = _image_rng(item, seed).sample(list(templates), captions_per_image)
        records.append({"image": item.image,
                        "caption": [t.format(colour=item.colour, shape=item.shape) for t in chosen]})
    out = _write_json(records, path)
    logger.info("wrote %d pretraining records (%d captions each) to %s", len(records), captions_per_image, out)
    return out


def write_retrieval_json(items: Iterable[ShapeImage], path: PathLike, seed: int = 0) -> Path:
    """Write the retrieval evaluation JSON.

    Records are ``{"image": abs_path, "caption": ["a <colour> <shape>"], "shape": ..., "colour":
    ...}``: one canonical caption per image (the reference retrieval format, with a caption list),
    plus the labels so that class-level metrics can count any image of the right class as a hit.
    Several images share a caption, which is exactly what class-level metrics are for.

    The record order is a shuffle seeded by ``seed``, so that a prefix of the file (a quick
    evaluation on the first N images) is a random sample of the classes even when ``items`` come
    sorted by class.

    Args:
        items: labelled images, e.g. from :func:`label_easy_vqa`.
        path: the JSON file to write (parent directories are created).
        seed: the shuffle seed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: no items.
    """
    items = _as_list(items)
    random.Random(seed).shuffle(items)
    records = [{"image": item.image, "caption": [canonical_caption(item)], "shape": item.shape,
                "colour": item.colour} for item in items]
    out = _write_json(records, path)
    logger.info("wrote %d retrieval records (%d classes) to %s", len(records),
                len({class_of(i) for i in items}), out)
    return out
