"""The grounding demo's dataset: canvases of easy-VQA tiles, expressions, true boxes and proposals.

The set is built once per module with small counts. The checks look at the written files and the
pixels, with IoU and background detection re-implemented here rather than imported, so that a bug
in the module cannot confirm itself.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

easy_vqa = pytest.importorskip("easy_vqa")

from simla.demos.easy_vqa import COLOURS, SHAPES
from simla.demos.grounding_data import (
    EXPRESSION_TEMPLATES,
    MANIFEST_NAME,
    TILE,
    GroundingDemoFiles,
    box_iou,
    build_grounding_set,
    shape_box,
)

TRAIN, TEST, GRID, DISTRACTORS = 6, 4, 2, 4


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> GroundingDemoFiles:
    root = tmp_path_factory.mktemp("grounding")
    return build_grounding_set(root, train_canvases=TRAIN, test_canvases=TEST, grid=GRID,
                               distractors=DISTRACTORS, seed=3)


def _load(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _manifest(files: GroundingDemoFiles) -> list[dict[str, Any]]:
    return _load(files.root / MANIFEST_NAME)


def _iou(a: list[int], b: list[int]) -> float:
    """The RefCOCO evaluation's IoU, written out independently of the module."""
    ax2, ay2, bx2, by2 = a[0] + a[2] - 1, a[1] + a[3] - 1, b[0] + b[2] - 1, b[1] + b[3] - 1
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(ax2, bx2), min(ay2, by2)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _tile_diff(crop: np.ndarray) -> np.ndarray:
    """Per pixel, the largest channel difference from the crop's most common colour."""
    background = Counter(map(tuple, crop.reshape(-1, 3).tolist())).most_common(1)[0][0]
    return np.abs(crop.astype(int) - np.array(background)).max(axis=-1)


def _parse(text: str) -> tuple[str, str] | None:
    """(colour, shape) named by ``text`` if it fills one of the templates with known words, else None."""
    for template in EXPRESSION_TEMPLATES:
        pattern = re.escape(template).replace(r"\{colour\}", "(?P<colour>[a-z]+)")
        match = re.fullmatch(pattern.replace(r"\{shape\}", "(?P<shape>[a-z]+)"), text)
        if match and match["colour"] in COLOURS and match["shape"] in SHAPES:
            return match["colour"], match["shape"]
    return None


def test_box_iou_and_shape_box_on_known_cases() -> None:
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    assert box_iou([0, 0, 10, 10], [5, 0, 10, 10]) == pytest.approx(50 / 150)
    pixels = np.full((TILE, TILE, 3), 240, dtype=np.uint8)
    assert shape_box(pixels) is None
    pixels[10:20, 30:35] = (0, 0, 255)
    pixels[9, 30:35] = (200, 200, 245)  # a faint antialiasing row: not part of the shape
    pixels[0:3, 0:2] = (255, 0, 0)  # a shape reaching the corner: the background is still found
    assert shape_box(pixels) == (0, 0, 35, 20)


def test_files_exist_and_parse(built: GroundingDemoFiles) -> None:
    pairs, refs, dets = _load(built.train_file), _load(built.refs_file), _load(built.dets_file)
    assert built.train_pairs == len(pairs) == TRAIN * GRID * GRID
    assert built.test_refs == len(refs) == TEST * GRID * GRID
    for split, records in (("train", pairs), ("test", refs)):
        for record in records:
            assert record["image"].startswith(f"images/{split}/")
    for record in pairs + refs:
        with Image.open(built.root / record["image"]) as image:
            assert image.size == (GRID * TILE, GRID * TILE) and image.mode == "RGB"
        assert _parse(record["text"]) is not None, record["text"]
    assert [r["ref_id"] for r in refs] == list(range(len(refs)))
    for ref in refs:
        assert ref["split"] == "test" and ref["height"] == ref["width"] == GRID * TILE
        assert ref["image"] == f"images/test/{ref['image_id']}.png"
    assert set(dets) == {r["image_id"] for r in refs}


def test_tiles_come_from_their_own_split(built: GroundingDemoFiles) -> None:
    """Each tile is pixel-identical to the easy-VQA image of its split it claims to come from."""
    by_split = {split: {Path(p).name: p for p in paths.values()}
                for split, paths in (("train", easy_vqa.get_train_image_paths()),
                                     ("test", easy_vqa.get_test_image_paths()))}
    canvases = _manifest(built)
    assert Counter(c["split"] for c in canvases) == {"train": TRAIN, "test": TEST}
    for canvas in canvases:
        assert canvas["image"].startswith(f"images/{canvas['split']}/")
        pixels = np.asarray(Image.open(built.root / canvas["image"]).convert("RGB"))
        for tile in canvas["tiles"]:
            split, name = tile["source"].split("/")
            assert split == canvas["split"]
            x, y, _, _ = tile["cell"]
            source = np.asarray(Image.open(by_split[split][name]).convert("RGB"))
            np.testing.assert_array_equal(pixels[y:y + TILE, x:x + TILE], source)


def test_classes_are_distinct_and_expressions_name_one_tile(built: GroundingDemoFiles) -> None:
    for canvas in _manifest(built):
        classes = [(t["colour"], t["shape"]) for t in canvas["tiles"]]
        assert len(set(classes)) == len(classes) == GRID * GRID
        # A confuser pair: two tiles sharing a colour or a shape.
        assert any(a != b and (a[0] == b[0] or a[1] == b[1]) for a in classes for b in classes)
        for tile in canvas["tiles"]:
            assert [c for c in classes if c == _parse(tile["text"])] == [(tile["colour"], tile["shape"])]


def test_boxes_are_tight_and_inside_their_tile(built: GroundingDemoFiles) -> None:
    for canvas in _manifest(built):
        pixels = np.asarray(Image.open(built.root / canvas["image"]).convert("RGB"))
        for tile in canvas["tiles"]:
            cx, cy, _, _ = tile["cell"]
            x, y, w, h = tile["bbox"]
            assert cx <= x and cy <= y and x + w <= cx + TILE and y + h <= cy + TILE and w > 0 and h > 0
            diff = _tile_diff(pixels[cy:cy + TILE, cx:cx + TILE])
            ys, xs = np.nonzero(diff > 40)
            # Every clear shape pixel is inside, and the box touches such a pixel on every side.
            assert (xs.min() + cx, ys.min() + cy, xs.max() + cx, ys.max() + cy) == (x, y, x + w - 1, y + h - 1)
            # Nothing but the faint antialiasing fringe lies outside it.
            ys, xs = np.nonzero(diff > 0)
            assert xs.min() + cx >= x - 1 and xs.max() + cx <= x + w and ys.min() + cy >= y - 1
            assert ys.max() + cy <= y + h


def test_proposals_hold_the_true_boxes_and_distinct_distractors(built: GroundingDemoFiles) -> None:
    dets = _load(built.dets_file)
    truths: dict[str, list[list[int]]] = {}
    for ref in _load(built.refs_file):
        truths.setdefault(ref["image_id"], []).append(ref["bbox"])
    positions = []
    for image_id, boxes in truths.items():
        proposals = dets[image_id]
        assert len(proposals) == GRID * GRID + DISTRACTORS
        assert all(p[0] >= 0 and p[1] >= 0 and p[2] > 0 and p[3] > 0 and p[0] + p[2] <= GRID * TILE
                   and p[1] + p[3] <= GRID * TILE for p in proposals)
        positions += [proposals.index(b) for b in boxes]
        distractors = [p for p in proposals if p not in boxes]
        assert len(distractors) == DISTRACTORS and len({tuple(d) for d in distractors}) == DISTRACTORS
        assert all(_iou(d, b) < 0.5 for d in distractors for b in boxes)
    assert max(positions) >= GRID * GRID  # shuffled: the true boxes are not simply listed first


def test_chance_is_the_mean_share_of_hits(built: GroundingDemoFiles) -> None:
    dets = _load(built.dets_file)
    shares = [sum(_iou(p, r["bbox"]) >= 0.5 for p in dets[r["image_id"]]) / len(dets[r["image_id"]])
              for r in _load(built.refs_file)]
    assert 0 < built.chance < 1
    assert built.chance == pytest.approx(sum(shares) / len(shares))


def test_same_seed_gives_identical_files(built: GroundingDemoFiles, tmp_path: Path) -> None:
    again = build_grounding_set(tmp_path, train_canvases=TRAIN, test_canvases=TEST, grid=GRID,
                                distractors=DISTRACTORS, seed=3)
    files = sorted(p.relative_to(built.root) for p in built.root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again.root) for p in again.root.rglob("*") if p.is_file())
    for rel in files:
        assert (built.root / rel).read_bytes() == (again.root / rel).read_bytes(), rel
    assert again.chance == built.chance


def test_bad_counts_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_grounding_set(tmp_path, train_canvases=0, test_canvases=1)
    with pytest.raises(ValueError):
        build_grounding_set(tmp_path, train_canvases=1, test_canvases=1, distractors=-1)
