"""Image-text retrieval metrics with the reference protocol (docs/reference-behaviour.md).

The reference ranks every score row with ``np.argsort(row)[::-1]`` and looks up where the ground truth
lands. An image query's rank is the best (minimum) rank among its ground-truth captions; a text query's
rank is the rank of its single image; R@K is the percentage of queries whose rank is < K.

Tie rule. NumPy's default argsort is not stable, so the reference's order among equal scores is
unspecified. We fix it to what ``np.argsort(row, kind="stable")[::-1]`` gives: descending score and,
among equal scores, the HIGHER candidate index first. The rank of candidate ``j`` in a row ``s`` is then
``#{c : s[c] > s[j]} + #{c : s[c] == s[j] and c > j}``, which we count directly, in row chunks, instead
of sorting: a 5k x 25k evaluation needs one pass of comparisons per direction and no (Q, C) index matrix.
Because this order is a strict total order on (score, index), "the best-ranked of several ground truths"
is simply the ground truth with the lexicographically largest (score, index), so an image query needs one
count, not one per caption.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["validate_retrieval_maps", "retrieval_metrics", "class_recall", "format_table", "RETRIEVAL_KEYS"]

logger = logging.getLogger(__name__)

#: The keys :func:`retrieval_metrics` returns, in the reference's order.
RETRIEVAL_KEYS: tuple[str, ...] = (
    "txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean",
)

#: Elements compared per chunk when counting ranks; bounds the temporary boolean masks to a few tens of
#: MB while keeping chunks large enough that the per-chunk overhead is negligible.
_CHUNK_ELEMENTS = 1 << 24

#: How many offending items an error message lists before summarising the rest as a count.
_MAX_LISTED = 5


def _as_index(value: Any, what: str) -> int:
    """``value`` as a Python int; a clear ValueError for floats, strings and the like."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{what} must be an integer index, got {value!r}") from None


def _describe_image(i: int, image_names: Sequence[str] | None) -> str:
    return f"image {i} ({image_names[i]!r})" if image_names is not None else f"image {i}"


def validate_retrieval_maps(
    num_images: int,
    num_texts: int,
    txt2img: Sequence[int],
    img2txt: Sequence[Sequence[int]],
    image_names: Sequence[str] | None = None,
) -> None:
    """Check that the caption maps of an evaluation set describe one consistent image-caption relation.

    ``txt2img[t]`` is the image of caption ``t``; ``img2txt[i]`` lists the captions of image ``i``. The two
    must agree exactly: every caption appears in exactly one image's list, and that image is its
    ``txt2img`` entry. Every image needs at least one caption, since an image query without a ground truth
    has no rank (the reference would crash on ``min`` of an empty list, far from the cause).

    Args:
        num_images: number of images (rows of the i2t score matrix).
        num_texts: number of captions (columns of the i2t score matrix).
        txt2img: length ``num_texts``, the image index of each caption.
        img2txt: length ``num_images``, the caption indices of each image.
        image_names: optional file names, used only to name offending images in error messages.

    Raises:
        ValueError: on a length mismatch, an out-of-range or non-integer index, an image without captions,
            a caption listed twice or under the wrong image, or a caption missing from ``img2txt``.
    """
    num_images = _as_index(num_images, "num_images")
    num_texts = _as_index(num_texts, "num_texts")
    if num_images < 0 or num_texts < 0:
        raise ValueError(f"num_images and num_texts must be >= 0, got {num_images} and {num_texts}")
    if image_names is not None and len(image_names) != num_images:
        raise ValueError(f"image_names has {len(image_names)} entries but there are {num_images} images")
    if len(txt2img) != num_texts:
        raise ValueError(f"txt2img has {len(txt2img)} entries but there are {num_texts} texts")
    if len(img2txt) != num_images:
        raise ValueError(f"img2txt has {len(img2txt)} entries but there are {num_images} images")

    owners = [_as_index(i, f"txt2img[{t}]") for t, i in enumerate(txt2img)]
    for t, i in enumerate(owners):
        if not 0 <= i < num_images:
            raise ValueError(f"txt2img[{t}] = {i} is out of range for {num_images} images")

    # Report every caption-less image at once (up to a few): a broken annotation file usually has several.
    empty = [i for i, caps in enumerate(img2txt) if len(caps) == 0]
    if empty:
        listed = ", ".join(_describe_image(i, image_names) for i in empty[:_MAX_LISTED])
        more = f" and {len(empty) - _MAX_LISTED} more" if len(empty) > _MAX_LISTED else ""
        raise ValueError(f"{len(empty)} image(s) have no captions: {listed}{more}; every image needs at "
                         "least one ground-truth caption for image-to-text retrieval")

    listed_under = [-1] * num_texts
    for i, caps in enumerate(img2txt):
        for raw in caps:
            t = _as_index(raw, f"img2txt[{i}] entry")
            if not 0 <= t < num_texts:
                raise ValueError(f"img2txt[{i}] lists text {t}, out of range for {num_texts} texts "
                                 f"({_describe_image(i, image_names)})")
            if listed_under[t] != -1:
                raise ValueError(f"text {t} is listed twice in img2txt (under images {listed_under[t]} and {i})")
            listed_under[t] = i
            if owners[t] != i:
                raise ValueError(f"txt2img and img2txt disagree: img2txt[{i}] lists text {t} but "
                                 f"txt2img[{t}] = {owners[t]}")
    missing = [t for t, i in enumerate(listed_under) if i == -1]
    if missing:
        t = missing[0]
        raise ValueError(f"txt2img and img2txt disagree: {len(missing)} text(s) appear in no img2txt list, "
                         f"e.g. text {t} (txt2img[{t}] = {owners[t]})")


def _as_score_matrix(scores: Any, name: str) -> Tensor:
    """A 2-D, NaN-free tensor view of a numpy array or tensor (no copy where possible)."""
    if isinstance(scores, Tensor):
        tensor = scores.detach()
    else:
        tensor = torch.as_tensor(np.asarray(scores))
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(tensor.shape)}")
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    # NaN compares false with everything, so it would silently get the best possible rank.
    if tensor.is_floating_point() and bool(torch.isnan(tensor).any()):
        raise ValueError(f"{name} contains NaN")
    return tensor


def _ranks(scores: Tensor, target: Tensor) -> Tensor:
    """Rank (0 = first) of candidate ``target[q]`` in row ``q`` under the documented order.

    Counts the candidates that come before the target: strictly higher scores, plus equal scores at a
    higher index. Rows are processed in chunks to bound the size of the temporary masks.
    """
    num_rows, num_cols = scores.shape
    ranks = torch.empty(num_rows, dtype=torch.long, device=scores.device)
    cols = torch.arange(num_cols, device=scores.device)
    step = max(1, _CHUNK_ELEMENTS // max(num_cols, 1))
    for start in range(0, num_rows, step):
        block = scores[start:start + step]
        tgt = target[start:start + step, None]
        gt = block.gather(1, tgt)
        ahead = (block > gt) | ((block == gt) & (cols[None, :] > tgt))
        ranks[start:start + step] = ahead.sum(dim=1)
    return ranks


def _recalls(ranks: Tensor, ks: Sequence[int]) -> list[float]:
    """Percentages of ranks < K, as exact Python arithmetic on the counts (100 * hits / n)."""
    n = ranks.numel()
    return [100.0 * int((ranks < k).sum()) / n for k in ks]


def retrieval_metrics(scores_i2t: Any, scores_t2i: Any, txt2img: Sequence[int],
                      img2txt: Sequence[Sequence[int]]) -> dict[str, float]:
    """Recall@1/5/10 in both directions, as the reference computes them (module docstring).

    Args:
        scores_i2t: (num_images, num_texts) scores, numpy array or tensor (any device); higher is better.
        scores_t2i: (num_texts, num_images) scores. Not assumed to be the transpose of ``scores_i2t``:
            after ITM re-ranking the two directions hold different values.
        txt2img: the image of each caption.
        img2txt: the captions of each image (validated against ``txt2img``).

    Returns:
        ``txt_r1, txt_r5, txt_r10`` (image-to-text retrieval, from ``scores_i2t``; an image's rank is the
        best rank among its captions), ``img_r1, img_r5, img_r10`` (text-to-image, from ``scores_t2i``),
        ``txt_r_mean`` / ``img_r_mean`` (mean of each direction's three recalls) and ``r_mean`` (mean of the
        two means), all in percent. Ties are ordered as ``np.argsort(row, kind="stable")[::-1]`` orders
        them: among equal scores the higher candidate index ranks first (see the module docstring).

    Raises:
        ValueError: on shapes that do not match each other or the maps, invalid maps, an empty evaluation
            set, or NaN scores.
    """
    i2t = _as_score_matrix(scores_i2t, "scores_i2t")
    t2i = _as_score_matrix(scores_t2i, "scores_t2i")
    num_images, num_texts = i2t.shape
    if tuple(t2i.shape) != (num_texts, num_images):
        raise ValueError(f"scores_t2i has shape {tuple(t2i.shape)}, expected {(num_texts, num_images)} "
                         f"(the transpose of scores_i2t's {(num_images, num_texts)})")
    if num_images == 0 or num_texts == 0:
        raise ValueError(f"retrieval metrics need at least one image and one text, got {num_images} "
                         f"images and {num_texts} texts")
    validate_retrieval_maps(num_images, num_texts, txt2img, img2txt)

    # Image queries: every (image, caption) ground-truth pair, via txt2img (equivalent to img2txt once
    # validated, and already flat). Pick each image's best-ranked caption = the largest (score, index).
    device = i2t.device
    owner = torch.as_tensor([int(i) for i in txt2img], dtype=torch.long, device=device)
    text_ids = torch.arange(num_texts, device=device)
    pair_scores = i2t[owner, text_ids]
    best_score = torch.empty(num_images, dtype=i2t.dtype, device=device).scatter_reduce(
        0, owner, pair_scores, reduce="amax", include_self=False)
    candidate = torch.where(pair_scores == best_score[owner], text_ids, torch.full_like(text_ids, -1))
    best_text = torch.full((num_images,), -1, dtype=torch.long, device=device).scatter_reduce(
        0, owner, candidate, reduce="amax", include_self=True)
    i2t_ranks = _ranks(i2t, best_text)

    # Text queries: one ground-truth image each.
    t2i_ranks = _ranks(t2i, owner.to(t2i.device))

    ks = (1, 5, 10)
    tr = _recalls(i2t_ranks, ks)
    ir = _recalls(t2i_ranks, ks)
    txt_mean = sum(tr) / len(tr)
    img_mean = sum(ir) / len(ir)
    result = {
        "txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": txt_mean,
        "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": img_mean,
        "r_mean": (txt_mean + img_mean) / 2,
    }
    logger.debug("retrieval metrics over %d images / %d texts: %s", num_images, num_texts, result)
    return result


def _class_ids(query_classes: Any, candidate_classes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Map query and candidate labels (ints, strings, ...) to shared dense integer ids."""
    def to_numpy(x: Any) -> np.ndarray:
        return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)

    q, c = to_numpy(query_classes), to_numpy(candidate_classes)
    if q.ndim != 1 or c.ndim != 1:
        raise ValueError(f"class labels must be 1-D, got shapes {q.shape} and {c.shape}")
    # One joint factorisation so that equal labels get equal ids whatever their original type.
    _, ids = np.unique(np.concatenate([q, c]), return_inverse=True)
    ids = ids.reshape(-1)
    return ids[: len(q)], ids[len(q):]


def class_recall(scores: Any, query_classes: Any, candidate_classes: Any,
                 ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Class-level recall@K: a query is a hit if any of its top-K candidates shares its class label.

    A looser metric than :func:`retrieval_metrics`, for demos on data whose captions are per class rather
    than per image. "Top-K" uses the same order as :func:`retrieval_metrics` (descending score, higher
    index first among ties), so the hit test is "the best-ranked same-class candidate has rank < K". A
    query whose class no candidate has is never a hit.

    Args:
        scores: (Q, C) scores, numpy array or tensor; higher is better.
        query_classes: length Q labels (any type NumPy can sort, e.g. ints or strings).
        candidate_classes: length C labels.
        ks: the cut-offs; each must be a positive int.

    Returns:
        ``{"r1": ..., "r5": ..., "r10": ...}`` (one ``f"r{k}"`` per cut-off), in percent.
    """
    matrix = _as_score_matrix(scores, "scores")
    num_queries, num_candidates = matrix.shape
    ks = tuple(_as_index(k, "ks entry") for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be non-empty positive integers, got {ks}")
    q_ids, c_ids = _class_ids(query_classes, candidate_classes)
    if len(q_ids) != num_queries or len(c_ids) != num_candidates:
        raise ValueError(f"got {len(q_ids)} query and {len(c_ids)} candidate labels for a score matrix of "
                         f"shape {(num_queries, num_candidates)}")
    if num_queries == 0:
        raise ValueError("class_recall needs at least one query")

    device = matrix.device
    q_ids_t = torch.as_tensor(q_ids, device=device)
    c_ids_t = torch.as_tensor(c_ids, device=device)
    cols = torch.arange(num_candidates, device=device)
    best = torch.full((num_queries,), -1, dtype=torch.long, device=device)
    step = max(1, _CHUNK_ELEMENTS // max(num_candidates, 1))
    # With no candidates at all there is nothing to hit; range() below is then empty.
    for start in range(0, num_queries if num_candidates else 0, step):
        block = matrix[start:start + step]
        same = q_ids_t[start:start + step, None] == c_ids_t[None, :]
        # Best same-class score per row; the row minimum stands in for "no same-class candidate", which
        # never beats a real same-class score, and the `same &` below keeps such rows at -1.
        floor = block.min(dim=1, keepdim=True).values
        top = torch.where(same, block, floor).max(dim=1, keepdim=True).values
        at_top = same & (block == top)
        best[start:start + step] = torch.where(at_top, cols[None, :], torch.full_like(cols, -1)[None, :]).amax(1)

    has_match = best >= 0
    ranks = torch.full((num_queries,), num_candidates + max(ks), dtype=torch.long, device=device)
    if bool(has_match.any()):
        rows = has_match.nonzero().squeeze(1)
        ranks[rows] = _ranks(matrix[rows], best[rows])
    return {f"r{k}": value for k, value in zip(ks, _recalls(ranks, ks))}


def format_table(metrics: Mapping[str, float]) -> str:
    """A small aligned text table of the reference retrieval keys (missing keys print as ``n/a``).

    Example::

        direction        R@1     R@5    R@10    mean
        text (i2t)     75.80   93.12   96.50   88.47
        image (t2i)    57.70   82.10   89.30   76.37
        r_mean         82.42
    """
    def cell(key: str) -> str:
        value = metrics.get(key)
        return f"{'n/a':>7}" if value is None else f"{float(value):7.2f}"

    label_width = 13
    lines = [f"{'direction':<{label_width}}" + "".join(f" {h:>7}" for h in ("R@1", "R@5", "R@10", "mean"))]
    for label, prefix in (("text (i2t)", "txt"), ("image (t2i)", "img")):
        keys = (f"{prefix}_r1", f"{prefix}_r5", f"{prefix}_r10", f"{prefix}_r_mean")
        lines.append(f"{label:<{label_width}}" + "".join(f" {cell(k)}" for k in keys))
    lines.append(f"{'r_mean':<{label_width}} {cell('r_mean')}")
    return "\n".join(lines)
