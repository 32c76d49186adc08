"""Weakly supervised grounding: pick the detector proposal a heat map points at, and score it (pure torch).

The reference's RefCOCO+ evaluation, reproduced except for its bugs:

1. The patch-grid Grad-CAM map is upsampled to the image's (H, W) with bicubic interpolation
   (``align_corners=False``); values may go negative.
2. A proposal [x, y, w, h] scores ``heat[int(y):int(y+h), int(x):int(x+w)].sum() / (w*h) ** 0.5``. Slices
   are clipped at the far edges as Python's are; a negative start (or end) is clipped at 0, where Python
   would wrap around to the other side of the image. We sum with a summed-area table in float64, so all
   proposals of an image cost one cumulative sum and four look-ups each, not a Python loop of slices.
   A proposal with w*h <= 0 (the reference would divide by zero) scores -inf, so it is never chosen.
3. The best-scoring proposal is chosen, whatever the sign of its score; ties go to the earlier proposal.
   The reference starts from max_score=0 and, when no proposal scores above 0, silently reuses the box
   chosen for the PREVIOUS expression; here nothing carries over between calls, and an image without
   (usable) proposals gives None, which the caller counts as a miss.
4. A hit is IoU >= 0.5 with the ground truth, IoU computed as the REFER toolkit does (inclusive pixels).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..explain.gradcam import upsample_map

__all__ = ["HIT_IOU", "MISS_REASONS", "GroundingTally", "box_iou", "box_scores", "choose_box", "is_hit",
           "random_pick_hit_rate", "upsample_map"]

HIT_IOU = 0.5
AREA_POWER = 0.5  # the reference's alpha: sum / area ** alpha
MISS_REASONS = ("no_proposals", "empty_text", "missing_image")

BoxLike = Sequence[float]
Boxes = Tensor | Sequence[BoxLike]


def _as_boxes(boxes: Boxes, device: torch.device) -> Tensor:
    """(N, 4) float64 (x, y, w, h); float64 so that int(y + h) rounds as the reference's Python floats do."""
    if isinstance(boxes, Tensor):
        table = boxes.detach().to(device=device, dtype=torch.float64)
    else:
        rows = [list(b) for b in boxes]
        if any(len(row) < 4 for row in rows):
            raise ValueError("expected boxes of at least 4 numbers [x, y, w, h]")
        table = torch.tensor([row[:4] for row in rows], dtype=torch.float64, device=device)
    table = table.reshape(-1, table.shape[-1]) if table.numel() else table.reshape(0, 4)
    if table.shape[1] < 4:
        raise ValueError(f"expected boxes of at least 4 numbers [x, y, w, h], got shape {tuple(table.shape)}")
    table = table[:, :4]
    if not torch.isfinite(table).all():
        raise ValueError("boxes must be finite numbers")
    return table


def _slice_bounds(start: Tensor, length: Tensor, limit: int) -> tuple[Tensor, Tensor]:
    """[int(start), int(start + length)) clipped to [0, limit], as indices (an empty slice has lo == hi)."""
    lo = torch.trunc(start).clamp(0, limit).long()
    hi = torch.trunc(start + length).clamp(0, limit).long()
    return lo, torch.maximum(lo, hi)


def box_scores(heat: Tensor, boxes: Boxes, area_power: float = AREA_POWER) -> Tensor:
    """(N,) float64 scores: the heat inside each box over its area ** area_power, via a summed-area table."""
    if heat.dim() != 2:
        raise ValueError(f"expected a 2-D (H, W) heat map, got shape {tuple(heat.shape)}")
    heat = heat.detach().to(torch.float64)
    if not torch.isfinite(heat).all():  # one NaN would spread to every box below and right of it in the table
        raise ValueError("the heat map has NaN or infinite values")
    table = _as_boxes(boxes, heat.device)
    if table.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=heat.device)
    integral = F.pad(heat.cumsum(0).cumsum(1), (1, 0, 1, 0))  # integral[r, c] = heat[:r, :c].sum()
    x, y, w, h = table.unbind(1)
    r0, r1 = _slice_bounds(y, h, heat.shape[0])
    c0, c1 = _slice_bounds(x, w, heat.shape[1])
    sums = integral[r1, c1] - integral[r0, c1] - integral[r1, c0] + integral[r0, c0]
    area = w * h
    scores = sums / area.clamp(min=torch.finfo(torch.float64).tiny) ** area_power
    return torch.where(area > 0, scores, torch.full_like(scores, -math.inf))


def choose_box(heat: Tensor, boxes: Boxes, area_power: float = AREA_POWER) -> int | None:
    """Index of the best-scoring proposal (the first among ties); None when there is none with a positive area."""
    scores = box_scores(heat, boxes, area_power)
    if scores.numel() == 0 or not torch.isfinite(scores).any():
        return None
    return int(torch.argmax(scores))


def box_iou(a: BoxLike, b: BoxLike) -> float:
    """IoU of two [x, y, w, h] boxes the REFER toolkit way: inclusive pixel corners (x + w - 1), and an
    intersection only when the corners are strictly ordered (a one-pixel-wide overlap counts as none);
    0.0 when the union is empty (the toolkit would divide by zero)."""
    ax, ay, aw, ah = (float(v) for v in list(a)[:4])
    bx, by, bw, bh = (float(v) for v in list(b)[:4])
    x1, y1 = max(ax, bx), max(ay, by)
    x2, y2 = min(ax + aw - 1, bx + bw - 1), min(ay + ah - 1, by + bh - 1)
    inter = (x2 - x1 + 1) * (y2 - y1 + 1) if x1 < x2 and y1 < y2 else 0.0
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def is_hit(pred: BoxLike | None, gt: BoxLike) -> bool:
    """Whether a predicted box grounds the expression (no prediction: a miss)."""
    return pred is not None and box_iou(pred, gt) >= HIT_IOU


def random_pick_hit_rate(gt_box: BoxLike, boxes: Boxes) -> float:
    """The chance that a proposal picked at random is a hit (0.0 without proposals): the floor to beat."""
    rows = boxes.tolist() if isinstance(boxes, Tensor) else list(boxes)
    if not rows:
        return 0.0
    return sum(is_hit(row, gt_box) for row in rows) / len(rows)


class GroundingTally:
    """Hits and misses per split. A miss may carry a reason (no proposals, empty text, missing image) so a
    report can tell model errors from data gaps; such misses still count in the total, as the reference's."""

    def __init__(self) -> None:
        self._correct: Counter[str] = Counter()
        self._total: Counter[str] = Counter()
        self._misses: dict[str, Counter[str]] = {}

    def add(self, split: str, hit: bool, reason: str | None = None) -> None:
        if reason is not None and reason not in MISS_REASONS:
            raise ValueError(f"unknown miss reason {reason!r}; expected one of {list(MISS_REASONS)} or None")
        if reason is not None and hit:
            raise ValueError(f"a result with a miss reason ({reason!r}) cannot be a hit")
        self._total[split] += 1
        self._correct[split] += bool(hit)
        misses = self._misses.setdefault(split, Counter())
        if reason is not None:
            misses[reason] += 1

    @staticmethod
    def _summary(correct: int, total: int) -> dict[str, Any]:
        # A percentage rounded to 0.01, as every simla evaluation reports accuracy.
        return {"accuracy": round(100 * correct / total, 2) if total else 0.0, "correct": correct, "total": total}

    def metrics(self) -> dict[str, Any]:
        """{"splits": {split: {accuracy, correct, total, misses}}, "accuracy", "correct", "total"}; accuracy is a
        percentage (0.0 for nothing counted); every miss reason is listed, zero or not."""
        splits = {split: {**self._summary(self._correct[split], total),
                          "misses": {reason: self._misses[split][reason] for reason in MISS_REASONS}}
                  for split, total in self._total.items()}
        return {"splits": splits, **self._summary(sum(self._correct.values()), sum(self._total.values()))}
