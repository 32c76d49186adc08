"""Weakly supervised visual grounding (RefCOCO+), evaluated as the paper does, without the reference's bugs.

For every referring expression: the ITM Grad-CAM map of the expression (one cross-attention layer,
averaged over heads and over the expression's real tokens) is upsampled to the image, each detector
proposal is scored by the map's mass inside it divided by sqrt(area), the best proposal is kept, and it
is a hit when its IoU with the ground-truth box is at least 0.5. Accuracy is reported per split.

An expression whose image cannot be read, whose text is empty, or whose image has no proposals is a
counted, reported MISS: never skipped, and never given another expression's box (the reference reuses
the previous expression's box when no proposal scores above zero). Expressions are split across ranks
without padding and gathered, so each is counted once under torchrun.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..checkpoint import load_checkpoint
from ..data.grounding import GroundingRef, read_detections, read_grounding_refs
from ..data.images import BadSampleError, load_image
from ..data.transforms import EvalView
from ..distributed import all_gather_objects, evaluation_group, get_rank
from ..explain.gradcam import gradcam, upsample_map
from ..models.simla import SimlaModel
from .command import Evaluation, Option, checkpoint_options, size_override
from .grounding_boxes import GroundingTally, box_iou, choose_box, random_pick_hit_rate
from .sharding import eval_loader, gather_in_order, this_rank_share

logger = logging.getLogger(__name__)

Detections = dict[str, list[tuple[float, float, float, float]]]


class _Expressions(Dataset):
    """(index, pixels, original height, width, problem) per expression of this rank's share."""

    def __init__(self, refs: list[GroundingRef], indices: list[int], view: EvalView) -> None:
        self.refs, self.indices, self.view = refs, indices, view

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int, int, str]:
        index = self.indices[i]
        ref = self.refs[index]
        size = self.view.image_size
        try:
            image = load_image(ref.image)
        except BadSampleError as err:
            return index, torch.zeros(3, size, size), 0, 0, f"{err.kind}: {err.reason}"
        height, width = ref.size if ref.size is not None else (image.height, image.width)
        return index, self.view(image), height, width, ""


def _miss(index: int, ref: GroundingRef, reason: str, detail: str = "") -> dict[str, Any]:
    return {"index": index, "ref_id": ref.ref_id, "split": ref.split, "text": ref.text, "image": ref.image,
            "pred_box": None, "iou": 0.0, "hit": False, "miss": reason, **({"problem": detail} if detail else {})}


def predict_boxes(model: SimlaModel, refs: list[GroundingRef], dets: Detections, *, layer: int | None = None,
                  batch_size: int = 16, num_workers: int = 2, progress: bool = False) -> list[dict[str, Any]]:
    """One row per expression, in file order: the chosen box, its IoU and whether it hits (or why it missed)."""
    data = _Expressions(refs, this_rank_share(len(refs)), EvalView(model.config.vision.image_size))
    rows = []
    for indices, pixels, heights, widths, problems in eval_loader(data, batch_size=batch_size, num_workers=num_workers,
                                                                  progress=progress, desc="grounding"):
        work = []
        for row, index in enumerate(indices.tolist()):
            ref = refs[index]
            if problems[row]:
                rows.append(_miss(index, ref, "missing_image", f"{ref.image} ({problems[row]})"))
            elif not ref.text.strip():
                rows.append(_miss(index, ref, "empty_text"))
            elif not dets.get(ref.image_id):
                rows.append(_miss(index, ref, "no_proposals"))
            else:
                work.append(row)
        if not work:
            continue
        explanations = gradcam(model, pixels[work], [refs[int(indices[r])].text for r in work], layer=layer,
                               batch_size=batch_size)
        for row, explanation in zip(work, explanations):
            index = int(indices[row])
            ref, boxes = refs[index], dets[refs[index].image_id]
            heat = upsample_map(explanation.text_map, (int(heights[row]), int(widths[row])))
            best = choose_box(heat, boxes)
            if best is None:  # every proposal has zero area
                rows.append(_miss(index, ref, "no_proposals"))
                continue
            iou = box_iou(boxes[best], ref.box)
            rows.append({"index": index, "ref_id": ref.ref_id, "split": ref.split, "text": ref.text,
                         "image": ref.image, "pred_box": list(boxes[best]), "iou": round(iou, 6), "hit": iou >= 0.5,
                         "miss": None})
    return gather_in_order(rows)


def evaluate_grounding(model: SimlaModel, refs: list[GroundingRef], dets: Detections, output: str | Path | None = None,
                       *, layer: int | None = None, batch_size: int = 16, num_workers: int = 2,
                       progress: bool = False) -> dict[str, Any]:
    """Ground every expression; write OUT/results.json (one row per expression) and OUT/metrics.json on rank 0.

    metrics: accuracy (percent) overall and per split (val, testA, testB, ...), the misses by reason, the chance of
    a uniformly random proposal, the explained layer, and the throughput.
    """
    started = time.perf_counter()
    rows = predict_boxes(model, refs, dets, layer=layer, batch_size=batch_size, num_workers=num_workers,
                         progress=progress)
    seconds = max(all_gather_objects(time.perf_counter() - started))
    tally = GroundingTally()
    for row in rows:
        tally.add(row["split"], row["hit"], row["miss"])
        if row["miss"]:
            logger.warning("grounding miss (%s): ref %s %r%s", row["miss"], row["ref_id"], row["text"],
                           f" - {row['problem']}" if "problem" in row else "")
    chance = sum(random_pick_hit_rate(r.box, dets.get(r.image_id, [])) for r in refs) / max(1, len(refs))
    metrics = {**tally.metrics(), "chance": round(100 * chance, 2), "expressions": len(rows),
               "layer": model.config.gradcam_layer if layer is None else layer, "seconds": round(seconds, 2),
               "expressions_per_second": round(len(rows) / seconds, 1) if seconds else None}
    if output is not None and get_rank() == 0:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        results = [{k: v for k, v in row.items() if k != "index"} for row in rows]
        (out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def describe(metrics: dict[str, Any]) -> str:
    """A printable summary: accuracy per split, misses, chance and speed."""
    lines = [f"{'split':<10} {'accuracy':>9} {'correct':>8} {'total':>7}  misses"]
    for split, figures in metrics["splits"].items():
        misses = ", ".join(f"{k} {v}" for k, v in figures["misses"].items() if v) or "-"
        lines.append(f"{split:<10} {figures['accuracy']:>8.2f}% {figures['correct']:>8} {figures['total']:>7}  "
                     f"{misses}")
    lines.append(f"overall {metrics['accuracy']:.2f}% of {metrics['total']} expressions (a random proposal: "
                 f"{metrics['chance']:.2f}%), layer {metrics['layer']}, {metrics['expressions_per_second']} "
                 "expressions/s")
    return "\n".join(lines)


def evaluate_grounding_checkpoint(*, checkpoint: str, refs: str, dets: str, output: str, refer_dir: str | None = None,
                                  image_root: str | None = None, layer: int | None = None, image_size: int | None = None,
                                  batch_size: int = 16, num_workers: int = 2, device: str = "auto",
                                  trust_pickle: bool = False) -> tuple[dict[str, Any], str]:
    """`simla evaluate grounding`: ground every expression of `refs`; under torchrun the expressions are split
    across the processes."""
    expressions = read_grounding_refs(refs, image_root, refer_dir)
    proposals = read_detections(dets)
    with evaluation_group(device) as chosen:
        model = load_checkpoint(checkpoint, task="base", trust_pickle=trust_pickle, **size_override(image_size))
        metrics = evaluate_grounding(model.to(chosen), expressions, proposals, output, layer=layer,
                                     batch_size=batch_size, num_workers=num_workers, progress=get_rank() == 0)
    if get_rank() != 0:
        return metrics, ""
    return metrics, f"{describe(metrics)}\nwrote {Path(output) / 'results.json'} and metrics.json"


GROUNDING_EVALUATION = Evaluation(
    help="weakly supervised grounding: Grad-CAM picks a detector proposal per expression; accuracy (IoU >= 0.5) "
         "per split",
    run=evaluate_grounding_checkpoint,
    options=(
        Option("--refs", "expressions JSON: [{image, text, ref_id[, bbox, split, image_id, height, width]}] (the "
                         "reference's refcoco+_val/test.json)", required=True),
        Option("--dets", "detections JSON: {image_id: [[x, y, w, h], ...]}", required=True),
        Option("--refer-dir", "folder with REFER's refs(unc).p and instances.json (boxes, splits and image ids of "
                              "records that lack them)"),
        Option("--output", "folder for results.json (chosen boxes) and metrics.json", required=True),
        Option("--layer", "explained cross-attention layer (default: the config's explain.gradcam_layer, 8 of 12)",
               type=int),
        *checkpoint_options("a grounding/retrieval checkpoint", batch_size=16, per="expressions", tokenizer=False),
    ))
