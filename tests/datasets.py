"""Small image-caption datasets made on the fly for pipeline tests, optionally salted with bad input."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "stripe", "dot")


def draw(colour: str, shape: str, size: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), 245, np.uint8) + rng.integers(0, 10, (size, size, 3), dtype=np.uint8)
    c = COLOURS[colour]
    if shape == "square":
        pixels[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = c
    elif shape == "stripe":
        pixels[:, size // 3: 2 * size // 3] = c
    else:
        yy, xx = np.mgrid[:size, :size]
        pixels[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = c
    return Image.fromarray(pixels)


def make_pairs(root: Path, count: int = 24) -> list[dict]:
    """`count` good images with captions under root/images; returns the reference JSON records."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(count):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        name = f"img{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        draw(colour, shape, seed=i).save(root / "images" / name)
        caption = f"a {colour} {shape} on a white background"
        records.append({"image": f"images/{name}", "caption": [caption, f"the {shape} is {colour}"] if i % 2 else caption})
    return records


def salt_with_bad_input(root: Path, records: list[dict]) -> list[dict]:
    """Append one record of each kind of bad input (and some unusual-but-valid images)."""
    images = root / "images"
    (images / "corrupt.jpg").write_bytes(b"this is not an image at all")
    good = io.BytesIO()
    draw("red", "dot").save(good, format="JPEG")
    (images / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (images / "empty.png").write_bytes(b"")
    Image.new("L", (40, 40), 128).save(images / "gray.png")
    Image.new("CMYK", (40, 40), (0, 200, 200, 0)).save(images / "cmyk.jpg")
    Image.new("RGBA", (40, 40), (0, 0, 255, 128)).save(images / "rgba.png")
    Image.fromarray(np.full((40, 40), 40000, np.uint16)).save(images / "deep.png")
    bad = [
        {"image": "images/corrupt.jpg", "caption": "a corrupt file"},
        {"image": "images/truncated.jpg", "caption": "a truncated file"},
        {"image": "images/empty.png", "caption": "an empty file"},
        {"image": "images/missing.jpg", "caption": "a missing file"},
        {"image": "images/img000.png", "caption": "   ?!  "},  # empty after cleaning
        {"image": "images/gray.png", "caption": "a gray square"},
        {"image": "images/cmyk.jpg", "caption": "a cmyk image"},
        {"image": "images/rgba.png", "caption": "a transparent blue image"},
        {"image": "images/deep.png", "caption": "a sixteen bit image"},
    ]
    return records + bad


def write_json(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_shards(root: Path, count: int = 24, per_shard: int = 6) -> str:
    """WebDataset shards as img2dataset writes them; returns the brace pattern."""
    root.mkdir(parents=True, exist_ok=True)
    n_shards = (count + per_shard - 1) // per_shard
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(count, (s + 1) * per_shard)):
                colour = list(COLOURS)[i % len(COLOURS)]
                shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
                buf = io.BytesIO()
                draw(colour, shape, seed=i).save(buf, format="JPEG")
                members = {f"{i:06d}.jpg": buf.getvalue()}
                if i % 2:
                    members[f"{i:06d}.json"] = json.dumps({"caption": f"a {colour} {shape}"}).encode()
                else:
                    members[f"{i:06d}.txt"] = f"a {colour} {shape}".encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"{{00000..{n_shards - 1:05d}}}.tar")
