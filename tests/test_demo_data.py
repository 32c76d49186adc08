"""The easy-VQA demo dataset: labels recovered from questions and answers, captions, JSON writers.

Only the test split (1,000 images, ~10k questions) is labelled here, once per module, to keep the
file at a few seconds. The label checks are deliberately independent of the module's parser: they
re-read the raw questions with the templates written out by hand, and look at the pixels.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

easy_vqa = pytest.importorskip("easy_vqa")

from simla.tokenizers.captions import pre_caption  # noqa: E402
from simla.data.readers import read_json_records  # noqa: E402
from simla.demos.easy_vqa import (  # noqa: E402
    CAPTION_TEMPLATES,
    COLOURS,
    SHAPES,
    ShapeImage,
    _parse_qa,
    caption_for,
    class_of,
    label_easy_vqa,
    write_pretraining_json,
    write_retrieval_json,
)

logger = logging.getLogger(__name__)

# The shape colours as drawn by easy-VQA (read off the images: pure RGB primaries plus the CSS
# "teal", "gray" and "brown"; note that its "green" is (0, 255, 0), not CSS green).
RGB = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "black": (0, 0, 0),
    "gray": (128, 128, 128), "teal": (0, 128, 128), "brown": (165, 42, 42), "yellow": (255, 255, 0),
}


@pytest.fixture(scope="module")
def labelled() -> tuple[list[ShapeImage], dict[str, int]]:
    return label_easy_vqa("test")


@pytest.fixture(scope="module")
def qas_by_image() -> dict[str, list[tuple[str, str]]]:
    """The raw test-split QAs keyed by absolute image path (the key the labelled items carry)."""
    questions, answers, ids = easy_vqa.get_test_questions()
    paths = {i: os.path.abspath(p) for i, p in easy_vqa.get_test_image_paths().items()}
    by_image: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for q, a, i in zip(questions, answers, ids):
        by_image[paths[i]].append((q, a))
    return by_image


def _by_id(items: list[ShapeImage]) -> dict[int, ShapeImage]:
    return {int(Path(i.image).stem): i for i in items}


# ---------------------------------------------------------------------------------------------
# Labelling
# ---------------------------------------------------------------------------------------------

def test_test_split_counts(labelled):
    items, counts = labelled
    logger.info("test split counts: %s", counts)
    assert set(counts) == {"images", "labelled", "unresolved", "conflicting"}
    assert counts["images"] == 1000
    assert counts["labelled"] == len(items)
    assert counts["labelled"] + counts["unresolved"] + counts["conflicting"] == counts["images"]
    # About 11% of the images have too few questions to pin down both attributes (e.g. only
    # "is there a green shape? no" about the colour); no image's answers contradict each other.
    assert counts["labelled"] / counts["images"] > 0.85
    assert counts["conflicting"] == 0
    assert {class_of(i) for i in items} == {f"{c} {s}" for c in COLOURS for s in SHAPES}


def test_items_are_well_formed(labelled):
    items, _ = labelled
    ids = [int(Path(i.image).stem) for i in items]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for item in items:
        assert Path(item.image).is_absolute() and Path(item.image).is_file()
        assert item.split == "test" and item.shape in SHAPES and item.colour in COLOURS


def test_spot_checks(labelled):
    by_id = _by_id(labelled[0])
    # Told directly: "what is the red shape? triangle".
    assert (by_id[0].colour, by_id[0].shape) == ("red", "triangle")
    # Only "what is the color of the rectangle? yellow": the shape comes from the question itself.
    assert (by_id[1].colour, by_id[1].shape) == ("yellow", "rectangle")
    # Shape only ever named inside colour questions ("what color is the circle?").
    assert (by_id[3].colour, by_id[3].shape) == ("yellow", "circle")
    assert (by_id[5].colour, by_id[5].shape) == ("brown", "circle")
    # Image 10 is "a circle", and neither yellow nor teal: its colour is unknown, so it is left out.
    assert 10 not in by_id


_WHAT_SHAPE = re.compile(r"^what (shape (is in the image|is present|does the image contain)"
                         r"|is the (?P<colour>\w+) shape)\?$")
_WHAT_COLOUR = re.compile(r"^(what color is the|what is the color of the) (?P<shape>\w+)\?$")
_ASKS_COLOUR = re.compile(r"^(is there|is there not|is no|is a|does the image contain|does the image not contain)"
                          r" a? ?(?P<colour>\w+) shape( in the image| present)?\?$")


def test_labels_agree_with_every_answer(labelled, qas_by_image):
    """Re-read each labelled image's QAs with hand-written templates; every answer must fit the label."""
    checked = Counter()
    for item in labelled[0]:
        for question, answer in qas_by_image[item.image]:
            if m := _WHAT_SHAPE.match(question):
                assert answer == item.shape, (item, question, answer)
                assert m["colour"] in (None, item.colour), (item, question)
                checked["what shape"] += 1
            elif m := _WHAT_COLOUR.match(question):
                assert answer == item.colour, (item, question, answer)
                assert m["shape"] in ("shape", item.shape), (item, question)
                checked["what colour"] += 1
            elif m := _ASKS_COLOUR.match(question):
                negated = " not " in question or question.startswith("is no ")
                expected = (m["colour"] == item.colour) != negated
                assert answer == ("yes" if expected else "no"), (item, question, answer)
                checked["yes/no colour"] += 1
    # Each kind of question was actually exercised (not silently unmatched by the regexes).
    assert min(checked.values()) > 1000 and len(checked) == 3, checked


def test_parse_qa_negation_and_strictness():
    yes_red = _parse_qa("is there a red shape?", "yes")
    assert [(e.attribute, e.value, e.present) for e in yes_red] == [("colour", "red", True)]
    assert _parse_qa("is there not a circle?", "no")[0].present is True
    assert _parse_qa("is no blue shape present?", "yes")[0].present is False
    assert _parse_qa("does the image not contain a triangle?", "yes")[0].present is False
    evidence = _parse_qa("what color is the circle?", "teal")
    assert {(e.attribute, e.value, e.present) for e in evidence} == {("colour", "teal", True),
                                                                     ("shape", "circle", True)}
    assert _parse_qa("is there a red circle?", "yes") is None  # two values: ambiguous
    assert _parse_qa("how many shapes are there?", "yes") is None
    assert _parse_qa("what shape is present?", "red") is None  # answer of the wrong attribute
    assert _parse_qa("what color is the shape?", "maybe") is None


def test_bad_split_and_unexpected_vocabulary(monkeypatch):
    with pytest.raises(ValueError, match="split"):
        label_easy_vqa("val")
    monkeypatch.setattr(easy_vqa, "get_answers", lambda: list(SHAPES + COLOURS) + ["yes", "no", "purple"])
    with pytest.raises(ValueError, match="purple"):
        label_easy_vqa("test")


# ---------------------------------------------------------------------------------------------
# Pixels: the labels must describe what is drawn
# ---------------------------------------------------------------------------------------------

def _shape_pixels(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(64, 64, 3) int image and the mask of pixels clearly unlike the (corner) background."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return pixels, np.abs(pixels - pixels[0, 0]).sum(-1) > 60


def test_pixels_match_labels(labelled):
    """Three images of each colour: the dominant drawn colour and the fill of the bounding box fit the label."""
    per_colour: dict[str, list[ShapeImage]] = defaultdict(list)
    for item in labelled[0]:
        if len(per_colour[item.colour]) < 3:
            per_colour[item.colour].append(item)
    assert set(per_colour) == set(COLOURS)
    # The fraction of its bounding box a shape fills: ~0.5 for a triangle, pi/4 for a circle, 1 for a rectangle.
    fill_range = {"triangle": (0.4, 0.72), "circle": (0.7, 0.92), "rectangle": (0.92, 1.0)}
    names = list(RGB)
    table = np.array([RGB[n] for n in names])
    for item in (i for items in per_colour.values() for i in items):
        pixels, mask = _shape_pixels(item.image)
        colours, counts = np.unique(pixels[mask], axis=0, return_counts=True)
        dominant = colours[counts.argmax()]
        distances = np.abs(table - dominant).max(-1)
        assert names[distances.argmin()] == item.colour, (item, dominant)
        assert distances.min() <= 40, (item, dominant)  # anti-aliased edges aside, colours are exact
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        low, high = fill_range[item.shape]
        assert low <= fill <= high, (item, fill)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

ITEM = ShapeImage("/data/7.png", "circle", "red", "train")


def test_caption_for_is_deterministic_and_clean():
    first = [caption_for(ITEM, random.Random(3)) for _ in range(5)]
    assert len(set(first)) == 1
    rng_a, rng_b = random.Random(11), random.Random(11)
    assert [caption_for(ITEM, rng_a) for _ in range(20)] == [caption_for(ITEM, rng_b) for _ in range(20)]
    seen = {caption_for(ITEM, random.Random(s)) for s in range(200)}
    assert len(seen) == len(CAPTION_TEMPLATES)  # every template gets used
    for caption in seen:
        assert "red" in caption and "circle" in caption
        assert caption == pre_caption(caption)  # lower-case, no punctuation: cleaning is a no-op
        assert len(caption.split()) <= 8


def test_class_of():
    assert class_of(ITEM) == "red circle"


# ---------------------------------------------------------------------------------------------
# JSON writers
# ---------------------------------------------------------------------------------------------

def test_pretraining_json(labelled, tmp_path):
    items = labelled[0][:50]
    path = write_pretraining_json(items, tmp_path / "sub" / "pretrain.json", captions_per_image=3, seed=0)
    assert path == tmp_path / "sub" / "pretrain.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    assert [r["image"] for r in data] == [i.image for i in items]
    for record, item in zip(data, items):
        assert set(record) == {"image", "caption"}
        assert len(record["caption"]) == 3 and len(set(record["caption"])) == 3
        assert all(item.colour in c and item.shape in c for c in record["caption"])
    # The repo's own reader accepts the file.
    records = read_json_records(path)
    assert len(records) == 50 and Path(records[0].image).is_file() and len(records[0].captions) == 3

    # Same seed: same captions per image, whatever the order of the items; another seed differs.
    again = json.loads(write_pretraining_json(items[::-1], tmp_path / "b.json", seed=0).read_text())
    assert {r["image"]: r["caption"] for r in again} == {r["image"]: r["caption"] for r in data}
    other = json.loads(write_pretraining_json(items, tmp_path / "c.json", seed=1).read_text())
    assert [r["caption"] for r in other] != [r["caption"] for r in data]


def test_pretraining_json_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="captions_per_image"):
        write_pretraining_json([ITEM], tmp_path / "x.json", captions_per_image=0)
    with pytest.raises(ValueError, match="captions_per_image"):
        write_pretraining_json([ITEM], tmp_path / "x.json", captions_per_image=len(CAPTION_TEMPLATES) + 1)
    with pytest.raises(ValueError, match="no items"):
        write_pretraining_json([], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_retrieval_json(labelled, tmp_path):
    items = labelled[0]
    path = write_retrieval_json(items, tmp_path / "retrieval.json", seed=0)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert len(data) == len(items)
    by_image = {i.image: i for i in items}
    assert set(by_image) == {r["image"] for r in data}
    for record in data:
        item = by_image[record["image"]]
        assert set(record) == {"image", "caption", "shape", "colour"}
        assert record["caption"] == [f"a {item.colour} {item.shape}"]
        assert (record["shape"], record["colour"]) == (item.shape, item.colour)
    # Seeded shuffle: reproducible, and not simply the input order.
    again = json.loads(write_retrieval_json(items, tmp_path / "again.json", seed=0).read_text())
    assert again == data
    assert [r["image"] for r in data] != [i.image for i in items]
    assert len(read_json_records(path)) == len(items)  # extra keys are ignored by the reader
