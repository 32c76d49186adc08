"""Top-k re-ranking of a similarity matrix, sharded over ranks (the reference's ITM re-ranking).

The reference evaluates retrieval in two stages: a cheap similarity ``S`` (ITC cosines) picks each
query's top-k candidates, and an expensive pair scorer (the ITM head) re-scores only those; every other
entry of the final matrix is ``-100``. It runs the scorer one query at a time (k pairs per forward); here
all (query, candidate) pairs of the processed rows are flattened and scored in fixed-size batches that
span query boundaries, so the scorer always sees full batches whatever k is.

Tie rule. ``torch.topk`` leaves the order of equal values unspecified (and it differs between devices),
so :func:`topk_candidates` breaks ties explicitly, the same way as :mod:`simla.eval.metrics`: descending
score and, among equal scores, the higher candidate index first. The top-k set is therefore exactly the
first k entries of the order used for ranking.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from simla.distributed import get_world_size, is_distributed

__all__ = ["topk_candidates", "rerank", "shard_rows", "gather_rows"]

logger = logging.getLogger(__name__)

#: Elements per row chunk in :func:`topk_candidates`; bounds its temporary masks and cumulative sums.
_CHUNK_ELEMENTS = 1 << 24


def _check_matrix(sim: Tensor, name: str = "sim") -> None:
    if not isinstance(sim, Tensor) or sim.dim() != 2:
        shape = tuple(sim.shape) if isinstance(sim, Tensor) else type(sim).__name__
        raise ValueError(f"{name} must be a 2-D tensor, got {shape}")
    # topk treats NaN as the largest value, which would make a broken similarity look like a perfect one.
    if sim.is_floating_point() and bool(torch.isnan(sim).any()):
        raise ValueError(f"{name} contains NaN")


def _topk_block(block: Tensor, k: int) -> Tensor:
    """Top-k column indices of each row of ``block``, ties to the higher index, sorted best first."""
    values, idx = torch.topk(block, k, dim=1)
    # The k-th largest *value* is well defined even when topk's choice among equal values is not: entries
    # strictly above it are always in, and only rows with more entries equal to it than free slots are
    # ambiguous. Those (rare with real-valued scores) are redone explicitly.
    kth = values[:, -1:]
    above = (block > kth).sum(dim=1)
    tied = (block == kth).sum(dim=1)
    ambiguous = (above + tied > k).nonzero().squeeze(1)
    if ambiguous.numel():
        sub, sub_kth = block[ambiguous], kth[ambiguous]
        is_tied = sub == sub_kth
        tied_from_right = is_tied.flip(1).cumsum(dim=1).flip(1)  # tied entries at this index or higher
        chosen = (sub > sub_kth) | (is_tied & (tied_from_right <= (k - above[ambiguous])[:, None]))
        # nonzero() is row-major, so each row's k chosen columns come out in ascending order.
        idx[ambiguous] = chosen.nonzero()[:, 1].view(-1, k)
    # Canonical order: indices descending, then a stable sort by score descending keeps the higher index
    # first among equal scores.
    idx = torch.sort(idx, dim=1, descending=True).values
    order = torch.sort(block.gather(1, idx), dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


def topk_candidates(sim: Tensor, k: int) -> Tensor:
    """Indices of each row's top-k entries: (Q, C) -> (Q, min(k, C)) int64, on ``sim``'s device.

    Rows are ordered best first: descending score and, among equal scores, the higher column index first
    (the order of ``np.argsort(row, kind="stable")[::-1]``), which also decides which tied entries make
    the cut at position k. Deterministic across devices, unlike ``torch.topk``'s indices.

    Raises:
        ValueError: if ``sim`` is not 2-D, contains NaN, or ``k < 1``.
    """
    _check_matrix(sim)
    if int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    num_rows, num_cols = sim.shape
    kk = min(int(k), num_cols)
    out = torch.empty((num_rows, kk), dtype=torch.long, device=sim.device)
    if kk == 0 or num_rows == 0:
        return out
    step = max(1, _CHUNK_ELEMENTS // num_cols)
    for start in range(0, num_rows, step):
        out[start:start + step] = _topk_block(sim[start:start + step], kk)
    return out


def _row_indices(rows: range, num_rows: int, device: torch.device) -> Tensor:
    if not isinstance(rows, range):
        raise ValueError(f"rows must be a range, got {type(rows).__name__}")
    if len(rows) and not (0 <= min(rows[0], rows[-1]) and max(rows[0], rows[-1]) < num_rows):
        raise ValueError(f"rows {rows} fall outside the {num_rows} rows of sim")
    return torch.arange(rows.start, rows.stop, rows.step, dtype=torch.long, device=device)


def rerank(
    sim: Tensor,
    k: int,
    score_pairs: Callable[[Tensor, Tensor], Tensor],
    batch_size: int = 256,
    fill: float = -100.0,
    rows: range | None = None,
    progress: bool = False,
) -> Tensor:
    """Re-score each query's top-k candidates by ``sim`` with an expensive pair scorer.

    For every query row ``q`` in ``rows`` (default: all rows), the candidates are
    ``topk_candidates(sim[q], k)``. All (query, candidate) pairs of those rows are flattened, query-major
    (each query's candidates best first), and passed to ``score_pairs`` in consecutive chunks of
    ``batch_size`` pairs, so one call usually mixes several queries. The scorer runs under
    ``torch.no_grad()`` (this is evaluation; a graph over thousands of batches would exhaust memory).

    Args:
        sim: (Q, C) first-stage similarities (e.g. ITC cosines).
        k: candidates per query; ``k > C`` means all C.
        score_pairs: ``score_pairs(query_idx, cand_idx) -> scores``, with two int64 tensors of the same
            length P (<= ``batch_size``) on ``sim``'s device, returning P scores (e.g. ITM positive logits).
        batch_size: pairs per ``score_pairs`` call.
        fill: the value of every entry that is not re-scored (the reference's -100).
        rows: the query rows to process, e.g. this rank's :func:`shard_rows`; other rows are all ``fill``.
        progress: show a tqdm progress bar over pairs.

    Returns:
        A (Q, C) tensor on ``sim``'s device holding the re-scored values at the selected entries and
        ``fill`` elsewhere. Its dtype is ``sim``'s when that is float32 or float64, else float32 (so a
        bf16 similarity does not round the scorer's outputs).

    Raises:
        ValueError: on a bad ``sim``, ``k``, ``batch_size`` or ``rows``, or if ``score_pairs`` returns
            something other than one score per pair.
    """
    _check_matrix(sim)
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    num_rows, num_cols = sim.shape
    rows = range(num_rows) if rows is None else rows
    row_idx = _row_indices(rows, num_rows, sim.device)
    dtype = sim.dtype if sim.dtype in (torch.float32, torch.float64) else torch.float32
    out = torch.full((num_rows, num_cols), float(fill), dtype=dtype, device=sim.device)
    # topk_candidates validates k even when nothing is left to score, so a bad k never passes silently.
    candidates = topk_candidates(sim.index_select(0, row_idx), k)
    if candidates.numel() == 0:
        return out

    query_idx = row_idx.repeat_interleave(candidates.shape[1])
    cand_idx = candidates.reshape(-1)
    num_pairs = cand_idx.numel()
    logger.debug("re-ranking %d rows x %d candidates = %d pairs in batches of %d",
                 len(rows), candidates.shape[1], num_pairs, batch_size)
    with torch.no_grad(), tqdm(total=num_pairs, desc="rerank", unit="pair", disable=not progress) as bar:
        for start in range(0, num_pairs, batch_size):
            q = query_idx[start:start + batch_size]
            c = cand_idx[start:start + batch_size]
            scores = score_pairs(q, c)
            if not isinstance(scores, Tensor) or tuple(scores.shape) != (q.numel(),):
                shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(f"score_pairs must return a tensor of shape ({q.numel()},), got {shape}")
            out[q, c] = scores.detach().to(device=out.device, dtype=out.dtype)
            bar.update(q.numel())
    return out


def shard_rows(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous chunk of ``range(n)``, split as the reference splits evaluation rows.

    Every rank gets ``n // world_size + 1`` rows starting at ``rank * (n // world_size + 1)``; the last
    non-empty chunk may be shorter and trailing ranks may get an empty range. Together the chunks cover
    ``0..n-1`` exactly once.
    """
    if int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    if int(world_size) != world_size or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if int(rank) != rank or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
    step = n // world_size + 1
    start = min(rank * step, n)  # clamp so an empty chunk is range(n, n), not a range past the end
    return range(start, min(start + step, n))


def gather_rows(matrix: Tensor, rows: range) -> Tensor:
    """Combine per-rank row blocks into the full matrix on every rank.

    Each rank computed only ``matrix[rows]`` (a contiguous block, as from :func:`shard_rows`). Under an
    initialised process group with more than one rank, the ranks exchange their blocks (``all_gather``,
    padded to the largest block) and each returns a copy of its ``matrix`` with every rank's block written
    in; rows no rank claims keep the local values (``fill`` after :func:`rerank`). Unlike the reference's
    all-reduce SUM of ``-100``-filled matrices, the gathered values are exact, not shifted by ``-100 (W-1)``.
    Otherwise (no process group, or world size 1) ``matrix`` itself is returned unchanged.

    All ranks must call this collectively with matrices of the same shape, dtype and device.

    Raises:
        ValueError: (on every rank alike) if a rank's ``rows`` is not contiguous or out of range, the
            blocks overlap, or the matrix shapes differ between ranks.
    """
    if not is_distributed() or get_world_size() == 1:
        return matrix
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    world = get_world_size()
    num_rows, num_cols = matrix.shape
    # Exchange bounds and shapes first, then validate on every rank with the same data, so that a bad
    # argument raises everywhere instead of leaving the other ranks hanging in the next collective.
    contiguous = rows.step == 1 or len(rows) <= 1
    start, stop = (rows[0], rows[-1] + 1) if len(rows) else (0, 0)
    meta = torch.tensor([start, stop, int(contiguous), num_rows, num_cols], dtype=torch.long, device=matrix.device)
    metas = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(metas, meta)
    spans = []
    for r, m in enumerate(metas):
        s, e, ok, q, c = (int(v) for v in m.tolist())
        if (q, c) != (num_rows, num_cols):
            raise ValueError(f"rank {r} has a {(q, c)} matrix, expected {(num_rows, num_cols)} on every rank")
        if not ok or not 0 <= s <= e <= num_rows:
            raise ValueError(f"rank {r} passed rows that are not a contiguous range within [0, {num_rows})")
        spans.append((s, e))
    ordered = sorted(span for span in spans if span[1] > span[0])
    for (_, e0), (s1, _) in zip(ordered, ordered[1:]):
        if s1 < e0:
            raise ValueError(f"row blocks of different ranks overlap: {spans}")

    longest = max(e - s for s, e in spans)
    block = matrix.new_zeros((longest, num_cols))
    block[: stop - start] = matrix[start:stop]
    blocks = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(blocks, block.contiguous())
    out = matrix.clone()
    for (s, e), gathered in zip(spans, blocks):
        out[s:e] = gathered[: e - s]
    return out
