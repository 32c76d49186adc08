"""The pointing game on synthetic maps: peaks, edges, ties, flat maps, content words and the baselines."""

from __future__ import annotations

import pytest
import torch

from simla.eval.pointing import (
    PointingTally,
    centre_hits,
    contains,
    content_words,
    map_hits,
    peak_point,
    random_point_rate,
)


def spot(size=(128, 128), at=(20, 30)) -> torch.Tensor:
    """A map that is zero except for a peak of 1 at pixel (row, col) `at`, with a lower shoulder beside it."""
    heat = torch.zeros(size)
    heat[at] = 1.0
    heat[at[0], at[1] + 1] = 0.5
    return heat


def test_the_peak_is_the_maximal_pixel_centre_and_ties_go_to_the_first_in_row_major_order():
    assert peak_point(spot(at=(20, 30))) == (30.5, 20.5)  # (x, y): column first
    tied = torch.zeros(10, 10)
    tied[7, 1] = tied[2, 8] = tied[2, 9] = 3.0
    assert peak_point(tied) == (8.5, 2.5)  # the top-most row wins, then the left-most column
    assert peak_point(torch.zeros(5, 5)) is None and peak_point(torch.full((5, 5), 0.3)) is None
    assert peak_point(torch.tensor([[0.0, float("nan")]])) is None
    with pytest.raises(ValueError, match="H, W"):
        peak_point(torch.zeros(2, 3, 3))


def test_boxes_are_half_open_so_a_shared_edge_belongs_to_one_box():
    left, right = (0, 0, 64, 64), (64, 0, 64, 64)
    assert contains(left, (63.5, 10)) and not contains(right, (63.5, 10))
    assert contains(right, (64.0, 10)) and not contains(left, (64.0, 10))
    assert not contains(left, (10, 64.0))


def test_a_map_hits_when_its_peak_is_inside_and_a_flat_map_never_hits():
    box = (25, 15, 10, 10)  # x 25..34, y 15..24
    assert map_hits(spot(at=(20, 30)), box)
    assert not map_hits(spot(at=(20, 35)), box)  # one pixel right of the box
    assert map_hits(spot(at=(24, 25)), box) and not map_hits(spot(at=(25, 25)), box)  # last row in, next out
    assert not map_hits(torch.zeros(128, 128), (0, 0, 128, 128))  # flat: no peak, even for a box of everything


def test_baselines_centre_and_random_point():
    size = (128, 128)
    # On a 2x2 canvas the centre (64, 64) is the corner of the four tiles: only the bottom-right tile's
    # box can hold it, and only when the box starts exactly there.
    assert centre_hits(size, (64, 64, 30, 30)) and not centre_hits(size, (34, 34, 30, 30))
    assert not centre_hits(size, (70, 70, 30, 30))
    assert centre_hits((100, 200), (90, 40, 20, 20))  # (100, 50) of a 200-wide, 100-high image
    assert random_point_rate(size, (0, 0, 64, 32)) == pytest.approx(0.125)
    assert random_point_rate(size, (100, 100, 64, 64)) == pytest.approx(28 * 28 / 128 ** 2)  # clipped to the image
    assert random_point_rate(size, (-10, 0, 20, 128)) == pytest.approx(10 / 128)


def test_content_words_leave_out_function_words():
    words = ["the", "Triangle,", "that", "is", "blue", "--"]
    assert content_words(words) == [1, 4]
    assert content_words(["a", "red", "circle"]) == [1, 2]


def test_tally_counts_whole_text_content_words_groups_and_baselines():
    tally = PointingTally()
    box_a, box_b, box_c = (10, 10, 20, 20), (64, 64, 40, 40), (0, 90, 20, 20)
    # 1: the text and "red" hit, "circle" is on another object (box_c), "a" is not counted though it hits.
    maps = torch.stack([spot(at=(15, 15)), spot(at=(15, 15)), spot(at=(100, 5))])
    assert tally.add(box_a, spot(at=(15, 15)), ["a", "red", "circle"], maps, others=[box_b, box_c])
    # 2: the text misses (on no object), "circle" hits, "blue" is ignored by the model (an all-zero map).
    maps = [torch.zeros(128, 128), spot(at=(80, 80)), torch.zeros(128, 128)]
    assert not tally.add(box_b, spot(at=(5, 5)), ["the", "circle", "that", "is", "blue"],
                         [maps[0], maps[1], maps[0], maps[0], maps[2]], others=[box_a])
    figures = tally.figures(groups={"colour words": ["red", "blue", "green"], "shape words": ["circle"]})
    assert figures["expressions"] == 2
    assert figures["whole_text"] == {"hits": 1, "total": 2, "rate": 50.0, "flat": 0, "on_another_object": 0}
    assert figures["content_words"] == {"hits": 2, "total": 4, "rate": 50.0, "flat": 1, "on_another_object": 1}
    assert figures["by_word"]["circle"] == {"hits": 1, "total": 2, "rate": 50.0, "flat": 0, "on_another_object": 1}
    assert figures["by_word"]["blue"] == {"hits": 0, "total": 1, "rate": 0.0, "flat": 1, "on_another_object": 0}
    assert set(figures["by_word"]) == {"red", "circle", "blue"}
    assert figures["groups"]["colour words"] == {"hits": 1, "total": 2, "rate": 50.0, "flat": 1,
                                                 "on_another_object": 0}
    assert figures["groups"]["shape words"]["total"] == 2
    assert figures["centre"] == {"hits": 1, "total": 2, "rate": 50.0}  # box_b starts at the centre
    assert figures["random_point"] == pytest.approx(100 * (400 + 1600) / 2 / 128 ** 2, abs=0.01)
    assert figures["random_object"] == pytest.approx(100 * (1 / 3 + 1 / 2) / 2, abs=0.01)
    # Without word maps only the whole text is counted; without other objects nothing is "another object".
    alone = PointingTally()
    assert not alone.add(box_a, spot(at=(100, 5)))
    assert alone.figures()["content_words"]["total"] == 0 and "groups" not in alone.figures()
    assert alone.figures()["whole_text"]["on_another_object"] == 0 and alone.figures()["random_object"] == 100.0
    # A hit is a hit even where another object's box overlaps the named one.
    assert alone.add(box_a, spot(at=(15, 15)), others=[(0, 0, 30, 30)])
    assert alone.figures()["whole_text"]["on_another_object"] == 0
