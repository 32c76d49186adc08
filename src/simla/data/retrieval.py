"""Retrieval data: the reference's train/eval annotation formats and the fine-tuning image view.

Train JSON: a list of {"image": path, "caption": str, "image_id": any} (ids remapped to dense ints).
Eval JSON: a list of {"image": path, "caption": [str, ...]} (texts flattened with txt2img/img2txt maps).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .captions import pre_caption
from .pretrain_data import read_caption, read_image
from .readers import DataFormatError
from .transforms import CLIP_MEAN, CLIP_STD, RandAugment, _normalize, _resized_crop, sample_crop_box, to_tensor


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


def _load_list(path: str | os.PathLike) -> list[Any]:
    return load_json(path, list)


def load_json(path: str | os.PathLike, expected: type[list] | type[dict]) -> Any:
    """Read an annotation file that must hold a JSON list (of records) or object; errors name the file."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such annotation file: {path}")
    with open(path, encoding="utf-8") as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}",
                                  path=path) from err
    if not isinstance(data, expected):
        what = "a JSON list of records" if expected is list else "a JSON object"
        raise DataFormatError(f"{path}: expected {what}, got {type(data).__name__}", path=path)
    return data


def _field(path: str, index: int, obj: Any, key: str, kinds: tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{path}, record {index}, field {key!r}: missing", path=path, record=str(index), field=key)
    value = obj[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataFormatError(f"{path}, record {index}, field {key!r}: unexpected {type(value).__name__} {value!r:.60}",
                              path=path, record=str(index), field=key)
    return value


def _join(root: str | None, image: str) -> str:
    return image if root is None or os.path.isabs(image) else os.path.join(root, image)


def read_retrieval_train(path: str | os.PathLike, image_root: str | None = None) -> list[RetrievalRecord]:
    data, path = _load_list(path), str(path)
    dense: dict[Any, int] = {}
    records = []
    for i, obj in enumerate(data):
        image = _field(path, i, obj, "image", (str,))
        caption = _field(path, i, obj, "caption", (str, list))
        raw_id = _field(path, i, obj, "image_id", (str, int))
        captions = (caption,) if isinstance(caption, str) else tuple(caption)
        if not captions or not all(isinstance(c, str) for c in captions):
            raise DataFormatError(f"{path}, record {i}, field 'caption': expected a string or list of strings",
                                  path=path, record=str(i), field="caption")
        records.append(RetrievalRecord(_join(image_root, image), captions, f"{path}[{i}]",
                                       dense.setdefault(raw_id, len(dense))))
    return records


def read_retrieval_eval(path: str | os.PathLike, image_root: str | None = None, max_words: int = 30) -> RetrievalEvalSet:
    """Flatten an eval file. An image without captions is an error naming it (it could never be found)."""
    data, path = _load_list(path), str(path)
    result = RetrievalEvalSet([], [], [], [])
    for i, obj in enumerate(data):
        image = _field(path, i, obj, "image", (str,))
        captions = _field(path, i, obj, "caption", (list, str))
        captions = [captions] if isinstance(captions, str) else captions
        if not captions:
            raise DataFormatError(f"{path}, record {i} ({image}): the image has no captions; retrieval metrics need "
                                  "at least one per image", path=path, record=str(i), field="caption")
        result.images.append(_join(image_root, image))
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
class FinetuneView:
    """Fine-tuning train view: RandomResizedCrop(scale 0.5-1, bicubic), flip, RandAugment, normalise.

    crop=False resizes the whole image instead (the grounding view: a crop could cut the referred object
    out); hflip=False keeps left and right (a flip contradicts "the man on the left").
    """

    image_size: int = 384
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment: bool = True
    crop: bool = True
    hflip: bool = True

    def __post_init__(self) -> None:
        self._augment = RandAugment() if self.randaugment else None

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.crop:
            box = sample_crop_box(img.width, img.height, self.scale, self.ratio, rng)
            img = _resized_crop(img, box, self.image_size)
        else:
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self._augment is not None:
            img = self._augment(img, rng)
        return _normalize(to_tensor(img), CLIP_MEAN, CLIP_STD)


@dataclass
class RetrievalSampleBuilder:
    view: FinetuneView
    max_words: int = 30

    def build(self, record: RetrievalRecord, rng: random.Random) -> dict[str, Any]:
        caption = read_caption(record, rng, self.max_words)
        return {"image": self.view(read_image(record), rng), "caption": caption, "image_id": record.image_id}
