"""NLVR2 and SNLI-VE data in the reference JSON forms, checked record by record before any work starts.

NLVR2: a list of {"images": [left, right], "sentence": str, "label": "True" | "False"} (label 1 = True).
SNLI-VE: a list of {"image": str, "sentence": str, "label": "entailment" | "neutral" | "contradiction"}
(entailment 2, neutral 1, contradiction 0, as the reference). The reference names SNLI-VE images by their
Flickr30k id without an extension: a name without one gets ".jpg".
Sentences are cleaned as captions (`pre_caption`, 30 words); an empty one is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from ..tokenizers.captions import pre_caption
from .images import load_image
from .readers import DataFormatError
from .annotations import join_image_root, load_records, record_field
from .transforms import FinetuneView

NLVR_LABELS = {"False": 0, "True": 1}
VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}


@dataclass(frozen=True)
class PairRecord:
    """One example: its image(s), the cleaned sentence and the label id."""

    images: tuple[str, ...]
    sentence: str
    label: int
    origin: str

    @property
    def image(self) -> str:  # the first image, for messages and single-image tasks
        return self.images[0]


def _sentence(path: str, index: int, obj: Any, max_words: int) -> str:
    sentence = pre_caption(record_field(path, index, obj, "sentence", (str,)), max_words)
    if not sentence:
        raise DataFormatError(f"{path}, record {index}, field 'sentence': empty sentence", path=path,
                              record=str(index), field="sentence")
    return sentence


def _label(path: str, index: int, obj: Any, labels: dict[str, int]) -> int:
    raw = obj.get("label") if isinstance(obj, dict) else None
    key = str(raw) if isinstance(raw, bool) else raw  # JSON true/false read as the reference's strings
    if key not in labels:
        raise DataFormatError(f"{path}, record {index}, field 'label': {raw!r} is not one of {list(labels)}",
                              path=path, record=str(index), field="label")
    return labels[key]


def _image_path(path: str, index: int, value: Any, root: str | None, default_extension: str | None) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(f"{path}, record {index}, field 'image': expected an image path, got {value!r:.60}",
                              path=path, record=str(index), field="image")
    if default_extension and not os.path.splitext(value)[1]:
        value += default_extension
    return join_image_root(root, value)


def read_nlvr(path: str | os.PathLike, image_root: str | None = None, max_words: int = 30) -> list[PairRecord]:
    path = str(path)
    records = []
    for i, obj in enumerate(load_records(path)):
        images = record_field(path, i, obj, "images", (list,))
        if len(images) != 2:
            raise DataFormatError(f"{path}, record {i}, field 'images': NLVR2 needs exactly two images, got "
                                  f"{len(images)}", path=path, record=str(i), field="images")
        paths = tuple(_image_path(path, i, image, image_root, None) for image in images)
        records.append(PairRecord(paths, _sentence(path, i, obj, max_words), _label(path, i, obj, NLVR_LABELS),
                                  f"{path}[{i}]"))
    return records


def read_ve(path: str | os.PathLike, image_root: str | None = None, max_words: int = 30) -> list[PairRecord]:
    path = str(path)
    records = []
    for i, obj in enumerate(load_records(path)):
        image = _image_path(path, i, record_field(path, i, obj, "image", (str,)), image_root, ".jpg")
        records.append(PairRecord((image,), _sentence(path, i, obj, max_words), _label(path, i, obj, VE_LABELS),
                                  f"{path}[{i}]"))
    return records


@dataclass
class PairSampleBuilder:
    """Training sample: every image through the fine-tuning view, the sentence as the caption, the label.

    One image gives "image"; two give "image0" and "image1" (NLVR2).
    """

    view: FinetuneView

    def build(self, record: PairRecord, rng) -> dict[str, Any]:
        pixels = [self.view(partial(load_image, image), rng) for image in record.images]
        sample: dict[str, Any] = {"caption": record.sentence, "label": record.label}
        if len(pixels) == 1:
            sample["image"] = pixels[0]
        else:
            sample.update({f"image{i}": p for i, p in enumerate(pixels)})
        return sample


def image_keys(count: int) -> Sequence[str]:
    return ("image",) if count == 1 else tuple(f"image{i}" for i in range(count))


def blank(view) -> torch.Tensor:
    return torch.zeros(3, view.image_size, view.image_size)
