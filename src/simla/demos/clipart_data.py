"""The real pictures of `simla demo clipart`: Tux Paint's stamps and OpenClipart, as Debian installs them.

Nobody in this project made these pictures or wrote their text, which is the point of the demo:
- Tux Paint stamps (`tuxpaint-stamps-default`): about 950 drawings and cut-out photographs, each with a
  `.txt` whose first line is an English sentence written by a person ("A brown potato."). The demo uses
  the ~785 with a raster picture; the ~165 that exist only as SVG are left out, so that its figures never
  depend on whether the optional SVG renderer is installed.
- OpenClipart (`openclipart-png`): about 8,100 drawings whose only text is the folder and file name
  ("recreation/sports/table_tennis_omar_abo-na_01.png"), read with `caption_from_path="path"`.

The held-out split is fixed and made by image, as retrieval benchmarks split: stamps are taken in the
order of a hash of their path under the stamps folder until `MIN_TEST_STAMPS` are out. A held-out stamp
was never seen, but its folder-mates may have been (other fruit, other road signs, the other letters of
its alphabet), so the figures measure recognising the kinds of pictures and words met in pretraining,
not categories never met. The Tux Paint training split is listed `TUX_REPEATS` times in the pretraining
data: it is 7% of the pairs, and a demo run sees each pair less than once.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.folders import FolderCaptions, read_folder
from ..data.records import CaptionRecord
from ..errors import SimlaError

__all__ = ["CATEGORY_QUERIES", "TUX_REPEATS", "ClipartCollections", "MissingCollectionError", "find_collections", "split_stamps"]

#: Where Debian installs the two collections; SIMLA_TUXPAINT_STAMPS / SIMLA_OPENCLIPART point elsewhere.
TUXPAINT_STAMPS = "/usr/share/tuxpaint/stamps"
OPENCLIPART = "/usr/share/openclipart/png"
INSTALL_HINT = "sudo apt install tuxpaint-stamps-default openclipart-png"
MIN_TEST_STAMPS = 180
TUX_REPEATS = 3
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


def _order(record: CaptionRecord, root: Path) -> str:
    return hashlib.sha256(Path(os.path.relpath(record.image, root)).as_posix().encode()).hexdigest()


def split_stamps(stamps: list[CaptionRecord], root: Path,
                 min_test: int = MIN_TEST_STAMPS) -> tuple[list[CaptionRecord], list[CaptionRecord]]:
    """(train, test): the first `min_test` stamps in hash order of their paths are held out (see module doc)."""
    held_out = {r.image for r in sorted(stamps, key=lambda r: _order(r, root))[:min_test]}
    return [r for r in stamps if r.image not in held_out], [r for r in stamps if r.image in held_out]


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
