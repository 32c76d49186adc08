"""Grounding evaluation: heat-map upsampling, proposal scores (summed-area table vs slicing), IoU, tallies."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from simla.eval.grounding_boxes import (
    MISS_REASONS,
    GroundingTally,
    box_iou,
    box_scores,
    choose_box,
    is_hit,
    random_pick_hit_rate,
    upsample_map,
)


def sliced_score(heat: torch.Tensor, box, power: float = 0.5) -> float:
    """The reference's per-proposal formula, with negative starts and ends clipped at 0 (no wrap-around)."""
    x, y, w, h = box
    rows = slice(max(0, int(y)), max(0, int(y + h)))
    cols = slice(max(0, int(x)), max(0, int(x + w)))
    return heat.double()[rows, cols].sum().item() / (w * h) ** power


# ---- upsample_map ----

def test_upsample_matches_bicubic_interpolate_and_can_go_negative():
    cam = torch.zeros(4, 6)
    cam[1, 2] = 1.0
    heat = upsample_map(cam, (30, 50))
    assert heat.shape == (30, 50) and heat.dtype == torch.float32
    expected = F.interpolate(cam[None, None], size=(30, 50), mode="bicubic", align_corners=False)[0, 0]
    assert torch.equal(heat, expected)
    assert heat.min() < 0  # bicubic overshoot, kept as the reference keeps it


def test_upsample_constant_map_and_dtype():
    heat = upsample_map(torch.full((3, 3), 2.0, dtype=torch.float64), (7, 5))
    assert heat.dtype == torch.float32 and torch.allclose(heat, torch.full((7, 5), 2.0))


@pytest.mark.parametrize("cam, size", [(torch.zeros(3), (4, 4)), (torch.zeros(3, 3), (0, 4))])
def test_upsample_rejects_bad_input(cam, size):
    with pytest.raises(ValueError):
        upsample_map(cam, size)


# ---- box_scores ----

def test_hand_computed_scores():
    heat = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # rows [0..3], [4..7], [8..11]
    boxes = [[1, 0, 2, 2],  # rows 0-1, cols 1-2: 1+2+5+6 = 14, / sqrt(4)
             [2.7, 1.2, 5, 5],  # rows int(1.2)=1..int(6.2)->3, cols 2..4: 6+7+10+11 = 34, / 5
             [-1.5, 0, 2, 1],  # cols int(-1.5)=-1 -> 0 .. int(0.5)=0: empty, 0
             [0, 0, 0.5, 3],  # cols 0..int(0.5)=0: empty, 0
             [0, 0, 4, 3, 0.99]]  # extra numbers (a detector score) are ignored: 66 / sqrt(12)
    expected = [7.0, 34 / 5, 0.0, 0.0, 66 / math.sqrt(12)]
    assert box_scores(heat, boxes).tolist() == pytest.approx(expected)


def test_negative_start_is_clipped_not_wrapped():
    heat = torch.zeros(4, 4)
    heat[:, 3] = 100.0  # Python's heat[:, -2:1] would be empty; heat[:, -2:] would wrap to the right edge
    heat[:, 0] = 1.0
    # x = -2, w = 3: columns [-2, 1) -> clipped to [0, 1): only the left column
    assert box_scores(heat, [[-2, 0, 3, 4]]).item() == pytest.approx(4.0 / math.sqrt(12))


def test_scores_equal_slicing_on_random_boxes():
    rng = random.Random(0)
    heat = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    boxes = []
    for _ in range(400):
        x, y = rng.uniform(-20, 60), rng.uniform(-20, 45)
        w, h = rng.choice([rng.uniform(0.01, 1.5), rng.uniform(1, 70)]), rng.choice([rng.uniform(0.01, 1.5),
                                                                                      rng.uniform(1, 50)])
        boxes.append([round(x) if rng.random() < 0.3 else x, round(y) if rng.random() < 0.3 else y, w, h])
    boxes += [[0, 0, 53, 37], [50, 30, 10, 10], [-5, -5, 3, 3], [60, 0, 5, 5], [0, 40, 5, 5]]
    got = box_scores(heat, boxes)
    expected = torch.tensor([sliced_score(heat, b) for b in boxes], dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (len(boxes),)
    assert torch.allclose(got, expected, rtol=0, atol=1e-9)
    assert (expected == 0).sum() >= 10  # the zero-size and off-image slices were exercised


def test_tensor_boxes_and_area_power():
    heat = torch.rand(20, 30, generator=torch.Generator().manual_seed(1))
    boxes = [[2.5, 3, 10, 7, 0.5], [0, 0, 30, 20, 0.1]]
    from_tensor = box_scores(heat, torch.tensor(boxes, dtype=torch.float64), area_power=1.0)
    assert torch.allclose(from_tensor, torch.tensor([sliced_score(heat, b[:4], 1.0) for b in boxes],
                                                    dtype=torch.float64))
    assert box_scores(heat, torch.tensor([2.5, 3, 10, 7])).shape == (1,)  # one box as a 1-D tensor
    assert box_scores(heat, []).shape == (0,) and box_scores(heat, torch.zeros(0, 4)).shape == (0,)


def test_degenerate_boxes_score_minus_infinity():
    scores = box_scores(torch.ones(5, 5), [[0, 0, 0, 3], [0, 0, 2, -1], [0, 0, 2, 2]])
    assert scores[:2].tolist() == [-math.inf, -math.inf] and scores[2].item() == pytest.approx(2.0)


@pytest.mark.parametrize("heat, boxes", [
    (torch.zeros(2, 3, 3), [[0, 0, 1, 1]]), (torch.tensor([[0.0, math.nan]]), [[0, 0, 1, 1]]),
    (torch.zeros(3, 3), [[0, 0, 1]]), (torch.zeros(3, 3), [[0, 0, math.inf, 1]]),
])
def test_box_scores_rejects_bad_input(heat, boxes):
    with pytest.raises(ValueError):
        box_scores(heat, boxes)


# ---- choose_box ----

def test_choose_takes_the_argmax_even_when_every_score_is_negative():
    heat = -torch.ones(10, 10)
    heat[0:2, 0:2] = -0.1
    boxes = [[5, 5, 4, 4], [0, 0, 2, 2], [0, 0, 10, 10]]  # -16/4, -0.4/2, -100/10
    assert choose_box(heat, boxes) == 1  # the reference would keep the previous expression's box


def test_choose_ties_empty_and_no_state():
    heat = torch.zeros(8, 8)
    heat[2:4, 2:4] = 1.0
    assert choose_box(heat, [[0, 0, 1, 1], [2, 2, 2, 2], [2, 2, 2, 2]]) == 1  # first of equal scores
    assert choose_box(heat, []) is None
    assert choose_box(heat, [[0, 0, 0, 4]]) is None  # no proposal with an area
    assert choose_box(torch.zeros(8, 8), [[5, 5, 1, 1], [2, 2, 2, 2]]) == 0  # nothing from the previous call
    assert choose_box(heat, [[0, 0, 0, 4], [6, 6, 1, 1]]) == 1


# ---- IoU ----

@pytest.mark.parametrize("a, b, iou", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [20, 20, 5, 5], 0.0),
    ([0, 0, 10, 10], [10, 0, 10, 10], 0.0),  # touching edges
    ([0, 0, 10, 10], [9, 0, 10, 10], 0.0),  # a one-pixel column: x1 == x2, not counted (REFER's strict <)
    ([0, 0, 10, 10], [8, 0, 10, 10], 20 / 180),  # columns 8..9 inclusive: 2 * 10
    ([0, 0, 10, 10], [5, 0, 10, 10], 50 / 150),  # half overlap: columns 5..9, rows 0..9
    ([0, 0, 10, 10], [0, 0, 10, 5], 0.5),  # rows 0..4: 50 / (100 + 50 - 50)
    ([2, 3, 4, 5], [4, 5, 6, 7], 2 * 3 / (20 + 42 - 6)),  # x 4..5 inclusive (2 pixels), y 5..7 (3)
    ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # empty union: 0, not a division by zero
])
def test_box_iou_hand_computed(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_is_hit_threshold_and_chance():
    gt = [0, 0, 10, 10]
    assert is_hit([0, 0, 10, 5], gt) and not is_hit([5, 0, 10, 10], gt) and not is_hit(None, gt)
    boxes = [[0, 0, 10, 10, 0.9], [0, 0, 10, 5], [5, 0, 10, 10], [50, 50, 3, 3]]
    assert random_pick_hit_rate(gt, boxes) == 0.5
    assert random_pick_hit_rate(gt, torch.tensor([b[:4] for b in boxes])) == 0.5
    assert random_pick_hit_rate(gt, []) == 0.0


# ---- tally ----

def test_tally_metrics_per_split_and_overall():
    tally = GroundingTally()
    for hit in (True, True, False):
        tally.add("val", hit)
    tally.add("val", False, "no_proposals")
    tally.add("testA", True)
    tally.add("testA", False, "empty_text")
    tally.add("testA", False, "missing_image")
    tally.add("testA", False, "empty_text")
    metrics = tally.metrics()
    assert metrics["splits"]["val"] == {"accuracy": 50.0, "correct": 2, "total": 4,
                                        "misses": {"no_proposals": 1, "empty_text": 0, "missing_image": 0}}
    assert metrics["splits"]["testA"] == {"accuracy": 25.0, "correct": 1, "total": 4,
                                          "misses": {"no_proposals": 0, "empty_text": 2, "missing_image": 1}}
    assert (metrics["accuracy"], metrics["correct"], metrics["total"]) == (37.5, 3, 8)
    assert list(metrics["splits"]) == ["val", "testA"] and set(MISS_REASONS) == set(metrics["splits"]["val"]["misses"])


def test_tally_empty_and_bad_reasons():
    assert GroundingTally().metrics() == {"splits": {}, "accuracy": 0.0, "correct": 0, "total": 0}
    with pytest.raises(ValueError, match="unknown miss reason"):
        GroundingTally().add("val", False, "timeout")
    with pytest.raises(ValueError, match="cannot be a hit"):
        GroundingTally().add("val", True, "no_proposals")
