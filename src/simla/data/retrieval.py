"""Retrieval data: the reference's train/eval annotation formats.

Train JSON: a list of {"image": path, "caption": str, "image_id": any} (ids remapped to dense ints).
Eval JSON: a list of {"image": path, "caption": [str, ...]} (texts flattened with txt2img/img2txt maps).
Either may instead be an image folder (see :mod:`simla.data.folders`): each image is its own image_id and
every non-empty line of its sidecar ``.txt`` is one of its captions, as COCO gives five per image.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from typing import Any

from ..tokenizers.captions import pre_caption
from .annotations import join_image_root, load_records, record_field
from .folders import FolderCaptions, read_folder
from .pretrain_data import image_reader, read_caption
from .readers import DataFormatError
from .transforms import FinetuneView


@dataclass(frozen=True)
class RetrievalRecord:
    image: str
    captions: tuple[str, ...]
    origin: str
    image_id: int  # dense id: captions of one image share it


@dataclass
class RetrievalEvalSet:
    images: list[str]
    texts: list[str]
    txt2img: list[int]
    img2txt: list[list[int]]
    extras: list[dict[str, Any]] = field(default_factory=list)  # other keys of each image record


# Folders for retrieval: every sidecar line is a caption of its image (retrieval scores all of them).
_FOLDER_CAPTIONS = FolderCaptions(line=None)


def read_retrieval_train(path: str | os.PathLike, image_root: str | None = None) -> list[RetrievalRecord]:
    if os.path.isdir(path):  # an image folder: image_root does not apply, the images lie under it
        return [RetrievalRecord(r.image, r.captions, r.origin, i)
                for i, r in enumerate(read_folder(path, _FOLDER_CAPTIONS))]
    data, path = load_records(path), str(path)
    dense: dict[Any, int] = {}
    records = []
    for i, obj in enumerate(data):
        image = record_field(path, i, obj, "image", (str,))
        caption = record_field(path, i, obj, "caption", (str, list))
        raw_id = record_field(path, i, obj, "image_id", (str, int))
        captions = (caption,) if isinstance(caption, str) else tuple(caption)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise DataFormatError(f"{path}, record {i}, field 'caption': expected a string or list of strings",
                                  path=path, record=str(i), field="caption")
        records.append(RetrievalRecord(join_image_root(image_root, image), captions, f"{path}[{i}]",
                                       dense.setdefault(raw_id, len(dense))))
    return records


def read_retrieval_eval(path: str | os.PathLike, image_root: str | None = None, max_words: int = 30) -> RetrievalEvalSet:
    """Flatten an eval file (or image folder). An image without captions is an error naming it (it could
    never be found); a folder leaves such images out, as it does for training."""
    if os.path.isdir(path):
        data = [{"image": r.image, "caption": list(r.captions)} for r in read_folder(path, _FOLDER_CAPTIONS)]
        image_root = None
    else:
        data = load_records(path)
    path = str(path)
    result = RetrievalEvalSet([], [], [], [])
    for i, obj in enumerate(data):
        image = record_field(path, i, obj, "image", (str,))
        captions = record_field(path, i, obj, "caption", (list, str))
        captions = [captions] if isinstance(captions, str) else captions
        if not captions:
            raise DataFormatError(f"{path}, record {i} ({image}): the image has no captions; retrieval metrics need "
                                  "at least one per image", path=path, record=str(i), field="caption")
        result.images.append(join_image_root(image_root, image))
        result.img2txt.append([])
        for caption in captions:
            if not isinstance(caption, str):
                raise DataFormatError(f"{path}, record {i}, field 'caption': expected strings", path=path,
                                      record=str(i), field="caption")
            result.img2txt[-1].append(len(result.texts))
            result.txt2img.append(i)
            result.texts.append(pre_caption(caption, max_words))
        result.extras.append({k: v for k, v in obj.items() if k not in ("image", "caption")})
    return result


@dataclass
class RetrievalSampleBuilder:
    view: FinetuneView
    max_words: int = 30

    def build(self, record: RetrievalRecord, rng: random.Random) -> dict[str, Any]:
        caption = read_caption(record, rng, self.max_words)
        return {"image": self.view(image_reader(record), rng), "caption": caption, "image_id": record.image_id}
