"""The real pictures of `simla demo clipart`: Tux Paint's stamps and OpenClipart, as Debian installs them.

Nobody in this project made these pictures or wrote their text, which is the point of the demo:
- Tux Paint stamps (`tuxpaint-stamps-default`): about 950 drawings and cut-out photographs, each with a
  `.txt` whose first line is an English sentence written by a person ("A brown potato."). The demo uses
  the ~785 with a raster picture; the ~165 that exist only as SVG are left out, so that its figures never
  depend on whether the optional SVG renderer is installed.
- OpenClipart (`openclipart-png`): about 8,100 drawings whose only text is the folder and file name
  ("recreation/sports/table_tennis_omar_abo-na_01.png"), read with `caption_from_path="path"`.

The held-out split is fixed and made by *folder*: whole leaf folders of stamps (all fruit, all road signs
...) are held out, taken in the order of a hash of their names until at least `MIN_TEST_STAMPS` stamps are
out. Splitting single stamps instead would leave near-twins on both sides (the 10 and 20 cent euro coins,
the four dreidels), and retrieval would measure memory rather than generalisation.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..data.folders import FolderCaptions, read_folder
from ..data.records import CaptionRecord
from ..errors import SimlaError

__all__ = ["CATEGORY_QUERIES", "ClipartCollections", "MissingCollectionError", "find_collections", "split_stamps"]

#: Where Debian installs the two collections; SIMLA_TUXPAINT_STAMPS / SIMLA_OPENCLIPART point elsewhere.
TUXPAINT_STAMPS = "/usr/share/tuxpaint/stamps"
OPENCLIPART = "/usr/share/openclipart/png"
INSTALL_HINT = "sudo apt install tuxpaint-stamps-default openclipart-png"
MIN_TEST_STAMPS = 180
_RASTER = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp")

#: Search queries built from Tux Paint's category folders: a hit is relevant when its stamp lies under
#: one of the folders (relative to the stamps folder). Chosen from the folder names before any model was
#: trained, never changed after looking at results.
CATEGORY_QUERIES: dict[str, tuple[str, ...]] = {
    "a bird": ("animals/birds",),
    "a fish": ("animals/fish",),
    "an insect": ("animals/insects",),
    "a vehicle": ("vehicles",),
    "a fruit": ("food/fruit",),
    "a vegetable": ("food/vegetables",),
    "a flower": ("plants/flowers",),
    "a road sign": ("town/roadsigns",),
    "a coin": ("symbols/money",),
    "a letter of the alphabet": ("symbols/alphabets",),
    "a musical instrument": ("hobbies/music",),
    "a piece of clothing": ("clothes",),
}


class MissingCollectionError(SimlaError):
    """A collection the demo needs is not installed; the message says how to install it."""


@dataclass(frozen=True)
class ClipartCollections:
    stamps_root: Path
    stamps: list[CaptionRecord]  # raster stamps with their English caption
    openclipart: list[CaptionRecord]  # captions from folder and file names
    svg_only_stamps: int  # stamps left out because they exist only as SVG


def _folder(env: str, default: str, package: str) -> Path:
    path = Path(os.environ.get(env) or default)
    if not path.is_dir():
        raise MissingCollectionError(f"{path} not found: the clipart demo needs Debian's {package} "
                                     f"(install both with: {INSTALL_HINT}; or set {env})")
    return path


def find_collections() -> ClipartCollections:
    """Read both collections (checked before any work starts; a missing one is one line saying how to install)."""
    stamps_root = _folder("SIMLA_TUXPAINT_STAMPS", TUXPAINT_STAMPS, "tuxpaint-stamps-default")
    openclipart_root = _folder("SIMLA_OPENCLIPART", OPENCLIPART, "openclipart-png")
    stamps = read_folder(stamps_root, FolderCaptions(line=0))
    raster = [r for r in stamps if r.image.lower().endswith(_RASTER)]
    openclipart = read_folder(openclipart_root, FolderCaptions(from_path="path"))
    return ClipartCollections(stamps_root, raster, openclipart, len(stamps) - len(raster))


def stamp_folder(record: CaptionRecord, root: Path) -> str:
    """The stamp's folder relative to the stamps folder ("food/fruit")."""
    return Path(os.path.relpath(record.image, root)).parent.as_posix()


def split_stamps(stamps: list[CaptionRecord], root: Path,
                 min_test: int = MIN_TEST_STAMPS) -> tuple[list[CaptionRecord], list[CaptionRecord]]:
    """(train, test): whole folders held out in hash order until `min_test` stamps are out (see module doc)."""
    sizes = Counter(stamp_folder(r, root) for r in stamps)
    held_out, count = set(), 0
    for folder in sorted(sizes, key=lambda name: hashlib.sha256(name.encode()).hexdigest()):
        if count >= min_test:
            break
        held_out.add(folder)
        count += sizes[folder]
    train = [r for r in stamps if stamp_folder(r, root) not in held_out]
    test = [r for r in stamps if stamp_folder(r, root) in held_out]
    return train, test


def is_relevant(record_path: str, root: Path, folders: tuple[str, ...]) -> bool:
    rel = Path(os.path.relpath(record_path, root)).as_posix()
    return any(rel.startswith(folder + "/") for folder in folders)


def write_pretraining_json(records: list[CaptionRecord], path: Path) -> Path:
    path.write_text(json.dumps([{"image": r.image, "caption": list(r.captions)} for r in records]), encoding="utf-8")
    return path


def write_retrieval_train_json(records: list[CaptionRecord], path: Path) -> Path:
    rows = [{"image": r.image, "caption": r.captions[0], "image_id": i} for i, r in enumerate(records)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_retrieval_eval_json(records: list[CaptionRecord], path: Path) -> Path:
    path.write_text(json.dumps([{"image": r.image, "caption": [r.captions[0]]} for r in records]), encoding="utf-8")
    return path
