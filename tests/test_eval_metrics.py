"""Retrieval metrics against a literal argsort implementation of the reference protocol (an image's rank is
the best rank among its captions, a caption's rank is its image's rank; ties go to the higher index)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from simla.eval.metrics import (
    RETRIEVAL_KEYS,
    class_recall,
    format_table,
    retrieval_metrics,
    validate_retrieval_maps,
)


def literal_metrics(scores_i2t, scores_t2i, txt2img, img2txt) -> dict[str, float]:
    """The reference procedure spelled out with Python loops, with a stable argsort reversed for ties."""
    def recall(ranks, k):
        return 100.0 * len(np.where(ranks < k)[0]) / len(ranks)

    i2t_ranks = np.zeros(scores_i2t.shape[0])
    for index, row in enumerate(scores_i2t):
        order = np.argsort(row, kind="stable")[::-1]
        best = 1e20
        for t in img2txt[index]:
            best = min(best, np.where(order == t)[0][0])
        i2t_ranks[index] = best
    t2i_ranks = np.zeros(scores_t2i.shape[0])
    for index, row in enumerate(scores_t2i):
        order = np.argsort(row, kind="stable")[::-1]
        t2i_ranks[index] = np.where(order == txt2img[index])[0][0]
    tr = [recall(i2t_ranks, k) for k in (1, 5, 10)]
    ir = [recall(t2i_ranks, k) for k in (1, 5, 10)]
    tm, im = sum(tr) / 3, sum(ir) / 3
    return {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": tm,
            "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": im, "r_mean": (tm + im) / 2}


def random_maps(num_images: int, rng: np.random.Generator, max_captions: int = 6):
    """Uneven caption counts (1..max_captions) and captions shuffled so an image's texts are not adjacent."""
    counts = rng.integers(1, max_captions + 1, size=num_images)
    owners = np.repeat(np.arange(num_images), counts)
    rng.shuffle(owners)
    txt2img = owners.tolist()
    img2txt = [[] for _ in range(num_images)]
    for t, i in enumerate(txt2img):
        img2txt[i].append(t)
    return txt2img, img2txt


def assert_same(got: dict[str, float], want: dict[str, float]) -> None:
    assert list(got) == list(RETRIEVAL_KEYS)
    for key in RETRIEVAL_KEYS:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key


@pytest.mark.parametrize("seed", range(4))
def test_matches_literal_on_random_scores(seed):
    rng = np.random.default_rng(seed)
    num_images = int(rng.integers(8, 40))
    txt2img, img2txt = random_maps(num_images, rng)
    i2t = rng.standard_normal((num_images, len(txt2img))).astype(np.float32)
    t2i = rng.standard_normal((len(txt2img), num_images)).astype(np.float32)
    assert_same(retrieval_metrics(i2t, t2i, txt2img, img2txt), literal_metrics(i2t, t2i, txt2img, img2txt))


@pytest.mark.parametrize("seed", range(6))
def test_matches_literal_with_many_ties(seed):
    # Scores in 0..3 make most comparisons ties, so the higher-index-first rule decides most ranks.
    rng = np.random.default_rng(100 + seed)
    num_images = int(rng.integers(5, 30))
    txt2img, img2txt = random_maps(num_images, rng, max_captions=5)
    i2t = rng.integers(0, 4, size=(num_images, len(txt2img)))
    t2i = rng.integers(0, 4, size=(len(txt2img), num_images))
    want = literal_metrics(i2t, t2i, txt2img, img2txt)
    assert_same(retrieval_metrics(i2t, t2i, txt2img, img2txt), want)
    # Same answer from float tensors and from float64 arrays.
    assert_same(retrieval_metrics(torch.tensor(i2t, dtype=torch.float32), torch.tensor(t2i, dtype=torch.float32),
                                  txt2img, img2txt), want)
    assert_same(retrieval_metrics(i2t.astype(np.float64), t2i.astype(np.float64), txt2img, img2txt), want)


def test_matches_literal_with_small_chunks(monkeypatch):
    # Force many row chunks so chunk boundaries are exercised.
    import simla.eval.metrics as metrics

    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 7)
    rng = np.random.default_rng(7)
    txt2img, img2txt = random_maps(13, rng)
    i2t = rng.integers(0, 3, size=(13, len(txt2img))).astype(np.float32)
    t2i = rng.integers(0, 3, size=(len(txt2img), 13)).astype(np.float32)
    assert_same(retrieval_metrics(i2t, t2i, txt2img, img2txt), literal_metrics(i2t, t2i, txt2img, img2txt))


def test_infinite_scores_are_ranked_not_rejected():
    rng = np.random.default_rng(3)
    txt2img, img2txt = random_maps(12, rng)
    i2t = rng.integers(0, 3, size=(12, len(txt2img))).astype(np.float64)
    t2i = rng.integers(0, 3, size=(len(txt2img), 12)).astype(np.float64)
    i2t[i2t == 0] = -np.inf
    t2i[t2i == 2] = np.inf
    assert_same(retrieval_metrics(i2t, t2i, txt2img, img2txt), literal_metrics(i2t, t2i, txt2img, img2txt))


def perfect_and_reversed(num_images: int = 15, captions: int = 2):
    txt2img = [t // captions for t in range(num_images * captions)]
    img2txt = [list(range(i * captions, (i + 1) * captions)) for i in range(num_images)]
    gt = np.zeros((num_images, len(txt2img)))
    gt[txt2img, np.arange(len(txt2img))] = 1.0
    return gt, txt2img, img2txt


def test_perfect_scores_give_100():
    gt, txt2img, img2txt = perfect_and_reversed()
    result = retrieval_metrics(gt, gt.T, txt2img, img2txt)
    assert all(value == 100.0 for value in result.values())


def test_reversed_scores_give_0():
    # Every ground truth scores below >= 10 other candidates in both directions.
    gt, txt2img, img2txt = perfect_and_reversed()
    result = retrieval_metrics(-gt, -gt.T, txt2img, img2txt)
    assert all(value == 0.0 for value in result.values())


def test_hand_case_and_tie_rule():
    # 3 images; captions: image 0 -> {0, 3}, image 1 -> {1}, image 2 -> {2}.
    txt2img = [0, 1, 2, 0]
    img2txt = [[0, 3], [1], [2]]
    i2t = np.array([
        [0.1, 0.9, 0.5, 0.8],  # best GT is text 3 at rank 1 (text 1 outscores it)
        [0.2, 0.3, 0.3, 0.0],  # GT text 1 ties with text 2, which has the higher index: rank 1
        [0.0, 0.0, 0.7, 0.0],  # GT text 2 at rank 0
    ])
    t2i = np.array([
        [1.0, 1.0, 1.0],  # GT image 0, three-way tie: the two higher indices come first, rank 2
        [0.0, 0.5, 0.5],  # GT image 1 ties with image 2: rank 1
        [0.0, 0.0, 0.5],  # rank 0
        [0.5, 0.5, 0.0],  # GT image 0 ties with image 1: rank 1
    ])
    result = retrieval_metrics(i2t, t2i, txt2img, img2txt)
    assert result["txt_r1"] == pytest.approx(100 / 3)
    assert result["txt_r5"] == result["txt_r10"] == 100.0
    assert result["img_r1"] == 25.0
    assert result["img_r5"] == result["img_r10"] == 100.0
    assert result["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    assert result["img_r_mean"] == pytest.approx(225 / 3)
    assert result["r_mean"] == pytest.approx((result["txt_r_mean"] + result["img_r_mean"]) / 2)
    assert_same(result, literal_metrics(i2t, t2i, txt2img, img2txt))


def test_shape_and_value_errors():
    gt, txt2img, img2txt = perfect_and_reversed(4, 2)
    with pytest.raises(ValueError, match="transpose"):
        retrieval_metrics(gt, gt, txt2img, img2txt)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(gt[0], gt.T, txt2img, img2txt)
    bad = gt.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(bad, gt.T, txt2img, img2txt)
    with pytest.raises(ValueError, match="no captions"):
        retrieval_metrics(gt, gt.T, txt2img, [*img2txt[:-1], []])


def test_validation_names_the_image_without_captions():
    names = ["a.jpg", "b.jpg", "c.jpg"]
    with pytest.raises(ValueError, match=r"image 1 \('b\.jpg'\)"):
        validate_retrieval_maps(3, 2, [0, 2], [[0], [], [1]], image_names=names)
    with pytest.raises(ValueError, match="image 1"):
        validate_retrieval_maps(3, 2, [0, 2], [[0], [], [1]])


@pytest.mark.parametrize("txt2img, img2txt, pattern", [
    ([0, 1, 1], [[0], [1, 2]], None),  # consistent: no error
    ([0, 0, 1], [[0], [1, 2]], "disagree"),  # txt2img says text 1 is image 0's
    ([0, 1, 1], [[0], [1, 2, 1]], "twice"),  # text 1 listed twice
    ([0, 1, 1], [[0], [1]], "no img2txt list"),  # text 2 missing from img2txt
    ([0, 1, 2], [[0], [1, 2]], "out of range"),  # txt2img points past the last image
    ([0, 1, 1], [[0], [1, 3]], "out of range"),  # img2txt points past the last text
    ([0, 1], [[0], [1, 2]], "txt2img has 2 entries"),
    ([0, 1, 1], [[0], [1, 2], [2]], "img2txt has 3 entries"),
    ([0, 1.5, 1], [[0], [1, 2]], "integer"),
])
def test_validation_errors(txt2img, img2txt, pattern):
    if pattern is None:
        validate_retrieval_maps(2, 3, txt2img, img2txt)
        return
    with pytest.raises(ValueError, match=pattern):
        validate_retrieval_maps(2, 3, txt2img, img2txt)


def test_validation_accepts_numpy_indices():
    validate_retrieval_maps(2, 3, np.array([0, 1, 1]), [np.array([0]), np.array([1, 2])])


def test_coco_like_scale_matches_literal():
    # 1k images x 5k texts, five captions each (the COCO layout), spans many row chunks; checked against
    # the literal procedure rather than a clock.
    rng = np.random.default_rng(0)
    txt2img = np.repeat(np.arange(1000), 5).tolist()
    img2txt = [list(range(5 * i, 5 * i + 5)) for i in range(1000)]
    i2t = rng.standard_normal((1000, 5000)).astype(np.float32)
    t2i = np.ascontiguousarray(i2t.T)
    i2t[np.arange(0, 1000, 3), np.arange(0, 5000, 15)] += 10.0  # every third image finds a caption first
    assert_same(retrieval_metrics(i2t, t2i, txt2img, img2txt), literal_metrics(i2t, t2i, txt2img, img2txt))


def test_directions_are_not_interchangeable():
    # Three images with two captions each; image i's captions are 2i and 2i+1. The image-to-text scores
    # rank every image's own caption first, the text-to-image scores rank the wrong image first for every
    # caption. A swap of the directions (or of the maps) must show in the recalls.
    txt2img = [0, 0, 1, 1, 2, 2]
    img2txt = [[0, 1], [2, 3], [4, 5]]
    i2t = np.full((3, 6), 0.0)
    for i, texts in enumerate(img2txt):
        i2t[i, texts[0]] = 1.0
    t2i = np.zeros((6, 3))
    for t, i in enumerate(txt2img):
        t2i[t, (i + 1) % 3] = 1.0
    result = retrieval_metrics(i2t, t2i, txt2img, img2txt)
    assert result["txt_r1"] == 100.0 and result["img_r1"] == 0.0
    swapped = retrieval_metrics(t2i.T.copy(), i2t.T.copy(), txt2img, img2txt)
    # Swapped, each image's top text belongs to another image; captions 0, 2, 4 now find their image,
    # and of the all-tied captions 1, 3, 5 only caption 5 does (ties go to the highest index, image 2).
    assert swapped["txt_r1"] == 0.0
    assert swapped["img_r1"] == pytest.approx(100.0 * 4 / 6)


def brute_class_recall(scores, query_classes, candidate_classes, ks):
    out = {}
    for k in ks:
        hits = 0
        for q, row in enumerate(scores):
            top = np.argsort(row, kind="stable")[::-1][:k]
            hits += any(candidate_classes[c] == query_classes[q] for c in top)
        out[f"r{k}"] = 100.0 * hits / len(scores)
    return out


def test_class_recall_hand_case():
    scores = np.array([
        [0.9, 0.1, 0.5],  # class "cat": top-1 is candidate 0 ("cat") -> hit at 1
        [0.9, 0.1, 0.5],  # class "dog": candidate 1 ("dog") is last -> hit only at 3
        [0.2, 0.2, 0.2],  # class "bird": no bird candidate -> never a hit
        [0.3, 0.3, 0.1],  # class "dog": tie, higher index (candidate 1, "dog") first -> hit at 1
    ])
    queries = ["cat", "dog", "bird", "dog"]
    candidates = ["cat", "dog", "cat"]
    result = class_recall(scores, queries, candidates, ks=(1, 2, 3))
    assert result == {"r1": 50.0, "r2": 50.0, "r3": 75.0}
    assert class_recall(scores, queries, candidates) == {"r1": 50.0, "r5": 75.0, "r10": 75.0}


@pytest.mark.parametrize("seed", range(3))
def test_class_recall_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(30, 25)).astype(np.float32)
    queries = rng.integers(0, 6, size=30)
    candidates = rng.integers(0, 5, size=25)  # class 5 has no candidate
    want = brute_class_recall(scores, queries, candidates, (1, 3, 5, 10))
    assert class_recall(torch.from_numpy(scores), torch.from_numpy(queries), candidates, ks=(1, 3, 5, 10)) == want


def test_class_recall_errors():
    with pytest.raises(ValueError, match="labels"):
        class_recall(np.zeros((2, 3)), [0, 1], [0, 1])
    with pytest.raises(ValueError, match="ks"):
        class_recall(np.zeros((2, 3)), [0, 1], [0, 1, 2], ks=(0,))


def test_format_table_lists_every_key_aligned():
    gt, txt2img, img2txt = perfect_and_reversed(3, 1)
    result = retrieval_metrics(gt, gt.T, txt2img, img2txt)
    result["txt_r1"] = 75.8
    table = format_table(result)
    lines = table.splitlines()
    assert len(lines) == 4
    assert "75.80" in lines[1] and "100.00" in lines[2]
    assert lines[3].startswith("r_mean")
    # The value columns line up: the header and both direction rows have the same width.
    assert len(lines[0]) == len(lines[1]) == len(lines[2])
    assert "n/a" in format_table({"txt_r1": 1.0})
