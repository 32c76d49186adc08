"""`simla finetune grounding`: the retrieval fine-tuning (ITC + ITM) on (image, referring expression) pairs.

Grounding is weakly supervised: no box is ever trained on. The model learns which expressions match
which image (expressions of one image, identified by its file name, are positives of each other), and
at evaluation the ITM Grad-CAM map of an expression picks a detector proposal (`simla.eval.grounding`).
The training view resizes the whole image (no crop, which could cut the referred object out) and, unlike
the reference, does not flip it unless asked: a flip contradicts "the man on the left".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from ..data.grounding import read_detections, read_grounding_refs, read_grounding_train
from ..data.transforms import FinetuneView
from ..distributed import finish
from ..eval.grounding import describe, evaluate_grounding
from .finetune_retrieval import RetrievalRecipe, train_image_text
from .recipe import field_

logger = logging.getLogger(__name__)


@dataclass
class GroundingRecipe(RetrievalRecipe):
    train_file: str = field_("", "train JSON: [{image, text}] (the image file name identifies the image)")
    test_file: str | None = field_(None, "refs JSON [{image, text, ref_id[, bbox, split, image_id]}] grounded at "
                                         "the end (needs dets_file)")
    dets_file: str | None = field_(None, "detections JSON {image_id: [[x, y, w, h], ...]}")
    refer_dir: str | None = field_(None, "folder with the REFER toolkit's refs(unc).p and instances.json, for refs "
                                         "records without bbox/split/image_id")
    hflip: bool = field_(False, "random horizontal flips (the reference flips, contradicting left/right words)")
    lr: float = field_(1e-5, "peak learning rate")
    output_dir: str = field_("runs/grounding", "run folder")

    TASK: ClassVar[str] = "grounding"  # the model is a retrieval model

    def train_view(self) -> FinetuneView:
        """The whole image (a crop could cut the referred object out), flipped only when asked."""
        return FinetuneView(self.image_size, randaugment=self.randaugment, crop=False, hflip=self.hflip)

    def validate(self) -> None:
        super().validate()
        if bool(self.test_file) != bool(self.dets_file):
            raise ValueError("test_file and dets_file: give both (the expressions and their images' proposals) or "
                             "neither")


def run_grounding_finetune(recipe: GroundingRecipe) -> dict[str, Any]:
    recipe.validate()
    records = read_grounding_train(recipe.train_file, recipe.image_root)
    refs = read_grounding_refs(recipe.test_file, recipe.image_root, recipe.refer_dir) if recipe.test_file else None
    dets = read_detections(recipe.dets_file) if recipe.dets_file else None
    run, model, engine = train_image_text(recipe, records)
    results: dict[str, Any] = {"step": engine.state.step}
    if refs is not None and dets is not None:
        metrics = evaluate_grounding(model, refs, dets, run.output_dir / "grounding", batch_size=recipe.eval_batch_size,
                                     num_workers=recipe.num_workers, progress=recipe.progress and run.rank0)
        results["grounding"] = metrics
        if run.rank0:
            (run.output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
            logger.info("grounding after fine-tuning:\n%s", describe(metrics))
    finish()
    return results
