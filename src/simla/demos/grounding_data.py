"""The dataset of ``simla demo grounding``: canvases of easy-VQA tiles, referring expressions, boxes.

An easy-VQA image holds a single shape, so there is nothing to *ground* in it. A canvas of
``grid x grid`` images is a small scene with several objects whose exact boxes are known from the
pixels. The model is trained on (canvas, expression) pairs only -- it never sees a box, hence
*weakly* supervised -- and is evaluated the RefCOCO way: among detector-style proposals it picks one
per expression, a hit being IoU >= 0.5 with the true box.

* Train canvases are built from easy-VQA's train split only and test canvases from its test split
  only, so no test tile was seen in pretraining.
* The tiles of a canvas have distinct (colour, shape) classes, so "the blue triangle" names exactly
  one tile; and every canvas pairs a tile with another sharing its colour or its shape, so that
  neither word alone is enough to find it.
* Each canvas has its own generator, seeded from (seed, split, index): the same seed gives
  byte-identical files.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..eval.grounding_boxes import box_iou
from .easy_vqa import PathLike, ShapeImage, _write_json, label_easy_vqa

__all__ = ["EXPRESSION_TEMPLATES", "FOREGROUND_THRESHOLD", "MANIFEST_NAME", "TILE", "GroundingDemoFiles",
           "build_grounding_set", "shape_box"]

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # [x, y, w, h] in pixels, w and h counting inclusive pixels
_Class = tuple[str, str]  # (colour, shape)

TILE = 64  # easy-VQA images are 64x64
# Lower-case and free of punctuation, so that ``pre_caption`` leaves them unchanged.
EXPRESSION_TEMPLATES: tuple[str, ...] = (
    "the {colour} {shape}", "{colour} {shape}", "the {shape} that is {colour}", "a {colour} {shape}")
# A pixel is part of the shape when a channel differs from the background by more than this. Over
# all 5,000 images it drops only the faint one-pixel antialiasing fringe (> 0 grows boxes by <= 1 px).
FOREGROUND_THRESHOLD = 40
MANIFEST_NAME = "canvases.json"  # per canvas: its tiles' source images, classes, cells and boxes
_MIN_SIDE = 6  # background distractors thinner than this are not plausible detections
_RANDOM_TRIES = 1000


@dataclass(frozen=True)
class GroundingDemoFiles:
    """What :func:`build_grounding_set` wrote; ``chance`` is the accuracy of a random proposal."""

    root: Path
    train_file: Path
    refs_file: Path
    dets_file: Path
    train_pairs: int
    test_refs: int
    chance: float
    manifest_file: Path


@dataclass(frozen=True)
class _Tile:
    item: ShapeImage
    pixels: np.ndarray  # (TILE, TILE, 3) uint8
    box: Box  # the shape's box within the tile


@dataclass(frozen=True)
class _Placed:
    tile: _Tile
    cell: Box  # the tile's square in the canvas
    box: Box  # the shape's box in the canvas


def shape_box(pixels: np.ndarray, threshold: int = FOREGROUND_THRESHOLD) -> Box | None:
    """The tight box of the pixels that differ from the background, or None if there are none.

    The background is the tile's most frequent colour, not a corner pixel: in a few images the
    shape reaches a corner.
    """
    rgb = pixels.astype(np.int64)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    values, counts = np.unique(packed, return_counts=True)
    mode = int(values[counts.argmax()])
    background = np.array([(mode >> 16) & 255, (mode >> 8) & 255, mode & 255])
    ys, xs = np.nonzero(np.abs(rgb - background).max(axis=-1) > threshold)
    if xs.size == 0:
        return None
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1


class _TilePool:
    """One easy-VQA split's labelled images by class; pixels and boxes are read once, on first use."""

    def __init__(self, split: str) -> None:
        items, _ = label_easy_vqa(split)
        self.by_class: dict[_Class, list[ShapeImage]] = {}
        for item in items:  # sorted by image id, so the lists (and the draws) are deterministic
            self.by_class.setdefault((item.colour, item.shape), []).append(item)
        self.classes = sorted(self.by_class)
        self._cache: dict[str, _Tile | None] = {}

    def _load(self, item: ShapeImage) -> _Tile | None:
        if item.image not in self._cache:
            pixels = np.asarray(Image.open(item.image).convert("RGB"))
            if pixels.shape != (TILE, TILE, 3):
                raise ValueError(f"{item.image}: expected a {TILE}x{TILE} image, got {pixels.shape}")
            box = shape_box(pixels)
            if box is None:
                logger.warning("%s: no shape pixels; never used as a tile", item.image)
            self._cache[item.image] = None if box is None else _Tile(item, pixels, box)
        return self._cache[item.image]

    def draw(self, cls: _Class, rng: random.Random) -> _Tile:
        """A random image of ``cls``: scanning on from a random start skips any image without a shape."""
        candidates = self.by_class[cls]
        start = rng.randrange(len(candidates))
        for k in range(len(candidates)):
            tile = self._load(candidates[(start + k) % len(candidates)])
            if tile is not None:
                return tile
        raise ValueError(f"no easy-VQA image of class {cls} has a visible shape")


def _choose_classes(classes: Sequence[_Class], count: int, rng: random.Random) -> list[_Class]:
    """``count`` distinct classes, two of which share a colour or a shape (a confuser pair)."""
    anchor = rng.choice(classes)
    chosen = [anchor]
    if count >= 2:
        shared = rng.randrange(2)  # 0: same colour, 1: same shape
        confusers = [c for c in classes if c != anchor and c[shared] == anchor[shared]]
        if confusers:
            chosen.append(rng.choice(confusers))
    chosen += rng.sample([c for c in classes if c not in chosen], count - len(chosen))
    rng.shuffle(chosen)  # the confuser pair lands anywhere on the grid
    return chosen


def _compose(tiles: Sequence[_Tile], grid: int) -> tuple[np.ndarray, list[_Placed]]:
    """Paste the tiles row by row; shape boxes move to canvas coordinates."""
    canvas = np.zeros((grid * TILE, grid * TILE, 3), dtype=np.uint8)
    placed = []
    for k, tile in enumerate(tiles):
        cx, cy = (k % grid) * TILE, (k // grid) * TILE
        canvas[cy:cy + TILE, cx:cx + TILE] = tile.pixels
        x, y, w, h = tile.box
        placed.append(_Placed(tile, (cx, cy, TILE, TILE), (cx + x, cy + y, w, h)))
    return canvas, placed


def _union(a: Box, b: Box) -> Box:
    x0, y0 = min(a[0], b[0]), min(a[1], b[1])
    return x0, y0, max(a[0] + a[2], b[0] + b[2]) - x0, max(a[1] + a[3], b[1] + b[3]) - y0


def _clip(box: Box, size: int) -> Box | None:
    x0, y0 = max(box[0], 0), max(box[1], 0)
    x1, y1 = min(box[0] + box[2], size), min(box[1] + box[3], size)
    return (x0, y0, x1 - x0, y1 - y0) if x1 - x0 >= 2 and y1 - y0 >= 2 else None


def _pair_boxes(placed: Sequence[_Placed]) -> list[Box]:
    """One box around the shapes of two side-by-side or stacked tiles: a merged detection."""
    return [_union(p.box, q.box) for i, p in enumerate(placed) for q in placed[i + 1:]
            if abs(p.cell[0] - q.cell[0]) + abs(p.cell[1] - q.cell[1]) == TILE]


def _background_boxes(placed: Sequence[_Placed]) -> list[Box]:
    """The empty parts of each tile beside and diagonal to its shape: detections on texture."""
    boxes = []
    for p in placed:
        (cx, cy, _, _), (x, y, w, h) = p.cell, p.box
        cols = [(cx, x - cx), (x, w), (x + w, cx + TILE - x - w)]
        rows = [(cy, y - cy), (y, h), (y + h, cy + TILE - y - h)]
        boxes += [(bx, by, bw, bh) for i, (bx, bw) in enumerate(cols) for j, (by, bh) in enumerate(rows)
                  if (i, j) != (1, 1) and min(bw, bh) >= _MIN_SIDE]
    return boxes


def _part_boxes(placed: Sequence[_Placed], size: int) -> list[Box]:
    """Shape boxes shifted by half their size, and their 40% slices: sloppy detections."""
    boxes = []
    for p in placed:
        x, y, w, h = p.box
        sw, sh = max(1, w * 2 // 5), max(1, h * 2 // 5)
        boxes += [(x + dx, y + dy, w, h) for dx, dy in ((-w // 2, 0), (w // 2, 0), (0, -h // 2), (0, h // 2))]
        boxes += [(x, y, sw, h), (x + w - sw, y, sw, h), (x, y, w, sh), (x, y + h - sh, w, sh)]
    return [c for b in boxes if (c := _clip(b, size)) is not None]


def _random_boxes(size: int, rng: random.Random) -> Iterator[Box]:
    """A last resort, drawn only when the other kinds run out (large ``distractors``)."""
    for _ in range(_RANDOM_TRIES):
        w, h = rng.randint(_MIN_SIDE, size // 2), rng.randint(_MIN_SIDE, size // 2)
        yield rng.randint(0, size - w), rng.randint(0, size - h), w, h


def _distractors(placed: Sequence[_Placed], count: int, size: int, rng: random.Random) -> list[Box]:
    """``count`` plausible wrong proposals with IoU < 0.5 against every shape box; the kinds take turns."""
    truths = [p.box for p in placed]
    kinds = [_pair_boxes(placed), _background_boxes(placed), _part_boxes(placed, size)]
    for kind in kinds:
        rng.shuffle(kind)
    rng.shuffle(kinds)
    turns = [box for turn in zip_longest(*kinds) for box in turn if box is not None]
    chosen: list[Box] = []
    for box in chain(turns, _random_boxes(size, rng)):
        if len(chosen) == count:
            break
        if box not in chosen and all(box_iou(box, t) < 0.5 for t in truths):
            chosen.append(box)
    if len(chosen) < count:
        logger.warning("only %d of %d distractors found for a canvas", len(chosen), count)
    return chosen


def _build_split(root: Path, split: str, count: int, grid: int, seed: int,
                 distractors: int) -> tuple[list[dict[str, Any]], dict[str, list[list[int]]]]:
    """Write one split's canvases; return their manifest entries (with expressions) and proposals."""
    pool = _TilePool(split)
    if grid * grid > len(pool.classes):
        raise ValueError(f"grid {grid} needs {grid * grid} distinct classes; easy-VQA {split} has "
                         f"{len(pool.classes)}")
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    canvases, dets = [], {}
    for index in range(count):
        rng = random.Random(f"{seed}:{split}:{index}")
        classes = _choose_classes(pool.classes, grid * grid, rng)
        canvas, placed = _compose([pool.draw(c, rng) for c in classes], grid)
        image_id = f"c{index:06d}"
        rel = f"images/{split}/{image_id}.png"
        Image.fromarray(canvas).save(root / rel)
        canvases.append({"image": rel, "image_id": image_id, "split": split, "size": canvas.shape[0],
                         "tiles": [{"source": f"{split}/{Path(p.tile.item.image).name}",
                                    "colour": p.tile.item.colour, "shape": p.tile.item.shape,
                                    "cell": list(p.cell), "bbox": list(p.box),
                                    "text": rng.choice(EXPRESSION_TEMPLATES).format(
                                        colour=p.tile.item.colour, shape=p.tile.item.shape)}
                                   for p in placed]})
        if split == "test":
            proposals = [p.box for p in placed] + _distractors(placed, distractors, canvas.shape[0], rng)
            rng.shuffle(proposals)
            dets[image_id] = [list(b) for b in proposals]
    logger.info("wrote %d %s canvases (%dx%d tiles) under %s", count, split, grid, grid, root)
    return canvases, dets


def _refs(canvases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """RefCOCO-style records, one per (test canvas, tile)."""
    tiles = [(c, t) for c in canvases for t in c["tiles"]]
    return [{"image": c["image"], "text": t["text"], "ref_id": ref_id, "image_id": c["image_id"],
             "bbox": t["bbox"], "split": "test", "height": c["size"], "width": c["size"]}
            for ref_id, (c, t) in enumerate(tiles)]


def _chance(refs: Sequence[dict[str, Any]], dets: dict[str, list[list[int]]]) -> float:
    """Expected accuracy of a uniformly random proposal: the mean share of proposals that are hits."""
    shares = [sum(box_iou(p, r["bbox"]) >= 0.5 for p in dets[r["image_id"]]) / len(dets[r["image_id"]])
              for r in refs]
    return sum(shares) / len(shares)


def build_grounding_set(output_dir: PathLike, *, train_canvases: int, test_canvases: int, grid: int = 2,
                        seed: int = 0, distractors: int = 4) -> GroundingDemoFiles:
    """Write the grounding demo's canvases, ``train.json``, ``test_refs.json`` and ``test_dets.json``.

    Raises:
        ValueError: a count out of range, or a grid needing more classes than easy-VQA has (24).
        ImportError: easy-vqa is not installed.
    """
    if train_canvases < 1 or test_canvases < 1 or grid < 1 or distractors < 0:
        raise ValueError("need train_canvases >= 1, test_canvases >= 1, grid >= 1 and distractors >= 0")
    root = Path(output_dir)
    train, _ = _build_split(root, "train", train_canvases, grid, seed, distractors)
    test, dets = _build_split(root, "test", test_canvases, grid, seed, distractors)
    pairs = [{"image": c["image"], "text": t["text"]} for c in train for t in c["tiles"]]
    refs = _refs(test)
    files = GroundingDemoFiles(
        root=root, train_file=_write_json(pairs, root / "train.json"),
        refs_file=_write_json(refs, root / "test_refs.json"),
        dets_file=_write_json(dets, root / "test_dets.json"), train_pairs=len(pairs),
        test_refs=len(refs), chance=_chance(refs, dets),
        manifest_file=_write_json(train + test, root / MANIFEST_NAME))
    logger.info("grounding set: %d train pairs, %d test refs, chance %.3f", files.train_pairs, files.test_refs,
                files.chance)
    return files
