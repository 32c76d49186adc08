"""`simla explain`: explain (image, text) pairs from a checkpoint into PNG sheets and one JSON of numbers."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.images import BadSampleError, load_image
from ..data.readers import DataFormatError
from .concepts import DEFAULT_MIN_MARGIN, DEFAULT_MIN_PROBABILITY, ConceptTags, concepts, has_concept_head
from .gradcam import Target, gradcam
from .render import render_sheet

logger = logging.getLogger(__name__)


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """A JSON list of {"image": path, "text": str} (relative images are relative to the file's folder)."""
    path = Path(path)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: invalid JSON ({err})", path=str(path)) from err
    if not isinstance(records, list) or not records:
        raise DataFormatError(f"{path}: expected a non-empty JSON list of {{image, text}} records", path=str(path))
    pairs = []
    for index, record in enumerate(records):
        for key in ("image", "text"):
            if not isinstance(record, dict) or not isinstance(record.get(key), str) or not record[key].strip():
                raise DataFormatError(f"{path}, record {index}, field {key!r}: expected a non-empty string",
                                      path=str(path), record=str(index), field=key)
        image = Path(record["image"])
        pairs.append((str(image if image.is_absolute() else path.parent / image), record["text"]))
    return pairs


def _sheet_name(index: int, image: str, text: str) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "text"
    return f"{index:03d}_{Path(image).stem}_{words}.png"


def explain_pairs(model: Any, pairs: Sequence[tuple[str, str]], output: str | Path, *, layer: int | None = None,
                  target: Target = "itm", top_concepts: int = 10, batch_size: int = 16,
                  min_concept_probability: float = DEFAULT_MIN_PROBABILITY,
                  min_concept_margin: float = DEFAULT_MIN_MARGIN) -> dict[str, Any]:
    """Explain every pair into OUT/<n>_<image>_<text>.png and OUT/explanations.json; return the JSON.

    Each image is read once. An unreadable image is reported (logged and listed under "failed") and its
    pairs are left out; the others are still explained. Concept tags are added when the model has a
    concept head and `top_concepts` > 0: at most `top_concepts` per image, only those with a probability of
    at least `min_concept_probability` and `min_concept_margin` above the image's background (see
    :func:`~simla.explain.concepts.concepts`), so possibly none.
    """
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, Image.Image] = {}
    failed = []
    for path in dict.fromkeys(image for image, _ in pairs):
        try:
            images[path] = load_image(path)
        except BadSampleError as err:
            logger.error("cannot explain %s: %s", path, err)
            failed.append({"image": path, "problem": str(err)})
    kept = [(image, text) for image, text in pairs if image in images]
    tags: dict[str, ConceptTags] = {}
    if top_concepts > 0 and has_concept_head(model) and images:
        names = list(images)
        tags = dict(zip(names, concepts(model, [images[n] for n in names], top=top_concepts, batch_size=batch_size,
                                        min_probability=min_concept_probability, min_margin=min_concept_margin)))
    elif top_concepts > 0:
        logger.info("%s has no concept head (a fine-tuned checkpoint): no concept tags", type(model).__name__)
    explanations = gradcam(model, [images[i] for i, _ in kept], [t for _, t in kept], layer=layer, target=target,
                           batch_size=batch_size) if kept else []
    records = []
    for index, ((image, text), explanation) in enumerate(zip(kept, explanations)):
        sheet = render_sheet(images[image], explanation, out / _sheet_name(index, image, text), tags.get(image))
        record = {"image": image, "sheet": sheet.name, **explanation.to_dict()}
        if image in tags:
            record["concepts"] = tags[image].to_dict()["tags"]
        records.append(record)
    summary = {"pairs": len(pairs), "explained": len(records), "failed": failed, "explanations": records}
    if tags:
        summary["concepts_min_probability"] = min_concept_probability
        summary["concepts_min_margin"] = min_concept_margin
    (out / "explanations.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
