"""Top-k re-ranking, row sharding and row gathering (the reference's ITM re-ranking protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simla.eval.rerank import gather_rows, rerank, shard_rows, topk_candidates

FILL = -100.0


def literal_topk(sim: torch.Tensor, k: int) -> list[list[int]]:
    """Best-first candidates per row: a stable ascending argsort, reversed (higher index first on ties)."""
    return [np.argsort(row, kind="stable")[::-1][:k].tolist() for row in sim.numpy()]


class RecordingScorer:
    """A fake pair scorer: looks scores up in a table and records every call's (queries, candidates)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table
        self.calls: list[tuple[list[int], list[int]]] = []

    def __call__(self, query_idx: torch.Tensor, cand_idx: torch.Tensor) -> torch.Tensor:
        assert query_idx.dtype == cand_idx.dtype == torch.long
        assert query_idx.shape == cand_idx.shape and query_idx.dim() == 1
        self.calls.append((query_idx.tolist(), cand_idx.tolist()))
        return self.table[query_idx, cand_idx]


def one_query_at_a_time(sim: torch.Tensor, k: int, table: torch.Tensor, rows=None) -> torch.Tensor:
    """The reference's loop: for each query, score its top-k candidates; -100 everywhere else."""
    expected = torch.full(sim.shape, FILL)
    for q in (range(sim.shape[0]) if rows is None else rows):
        for c in literal_topk(sim[q:q + 1], k)[0]:
            expected[q, c] = table[q, c]
    return expected


def make_case(num_queries: int, num_candidates: int, seed: int, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    if ties:
        sim = torch.randint(0, 4, (num_queries, num_candidates), generator=g).float()
    else:
        sim = torch.randn(num_queries, num_candidates, generator=g)
    table = torch.rand(num_queries, num_candidates, generator=g) + 1.0  # never equal to FILL
    return sim, table


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 3, 8, 20])
def test_topk_candidates_matches_stable_argsort(ties, k):
    sim, _ = make_case(12, 8, seed=k, ties=ties)
    got = topk_candidates(sim, k)
    assert got.dtype == torch.long and got.shape == (12, min(k, 8))
    assert got.tolist() == literal_topk(sim, k)


def test_topk_candidates_small_chunks_and_all_equal_rows(monkeypatch):
    import simla.eval.rerank as module

    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", 5)
    sim, _ = make_case(9, 11, seed=1, ties=True)
    sim[0] = 2.0  # a fully tied row: the highest indices win
    assert topk_candidates(sim, 4).tolist() == literal_topk(sim, 4)
    assert topk_candidates(sim, 4)[0].tolist() == [10, 9, 8, 7]


def test_topk_candidates_errors():
    with pytest.raises(ValueError, match="positive"):
        topk_candidates(torch.zeros(2, 3), 0)
    with pytest.raises(ValueError, match="2-D"):
        topk_candidates(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="NaN"):
        topk_candidates(torch.tensor([[0.0, float("nan")]]), 1)


@pytest.mark.parametrize("ties", [False, True])
def test_rerank_equals_one_query_at_a_time_loop(ties):
    sim, table = make_case(7, 9, seed=3, ties=ties)
    k, batch = 4, 5
    scorer = RecordingScorer(table)
    got = rerank(sim, k, scorer, batch_size=batch)
    assert got.shape == sim.shape and got.dtype == torch.float32
    assert torch.equal(got, one_query_at_a_time(sim, k, table))
    # Fill elsewhere: exactly k re-scored entries per row.
    assert ((got != FILL).sum(dim=1) == k).all()
    # Batches are chunks of the flattened pairs: full except the last, and they span query boundaries.
    sizes = [len(q) for q, _ in scorer.calls]
    assert sizes == [batch] * (7 * k // batch) + ([7 * k % batch] if 7 * k % batch else [])
    assert any(len(set(q)) > 1 for q, _ in scorer.calls)
    pairs = [(q, c) for qs, cs in scorer.calls for q, c in zip(qs, cs)]
    assert len(pairs) == len(set(pairs)) == 7 * k


def test_rerank_rows_subset():
    sim, table = make_case(8, 6, seed=5)
    scorer = RecordingScorer(table)
    rows = range(2, 5)
    got = rerank(sim, 3, scorer, batch_size=4, rows=rows)
    assert torch.equal(got, one_query_at_a_time(sim, 3, table, rows=rows))
    assert (got[:2] == FILL).all() and (got[5:] == FILL).all()
    assert {q for qs, _ in scorer.calls for q in qs} == set(rows)
    # An empty shard scores nothing and returns an all-fill matrix.
    empty = RecordingScorer(table)
    assert (rerank(sim, 3, empty, rows=range(8, 8)) == FILL).all() and not empty.calls


def test_rerank_k_larger_than_candidates_scores_everything():
    sim, table = make_case(4, 3, seed=6)
    got = rerank(sim, 10, RecordingScorer(table), batch_size=256, fill=-7.0)
    assert torch.equal(got, table)


def test_rerank_custom_fill_dtype_and_no_grad():
    sim, table = make_case(3, 5, seed=7)
    table = table.double().requires_grad_()

    def scorer(q, c):
        assert not torch.is_grad_enabled()
        return table[q, c] * 2

    got = rerank(sim.double(), 2, scorer, fill=-1.0)
    assert got.dtype == torch.float64 and not got.requires_grad
    assert ((got == -1.0).sum(dim=1) == 3).all()
    assert rerank(sim.bfloat16(), 2, lambda q, c: table[q, c].detach()).dtype == torch.float32


def test_rerank_errors():
    sim, table = make_case(3, 4, seed=8)
    with pytest.raises(ValueError, match="shape"):
        rerank(sim, 2, lambda q, c: table[q, c][:-1], batch_size=4)
    with pytest.raises(ValueError, match="outside"):
        rerank(sim, 2, RecordingScorer(table), rows=range(2, 4))
    with pytest.raises(ValueError, match="batch_size"):
        rerank(sim, 2, RecordingScorer(table), batch_size=0)
    with pytest.raises(ValueError, match="positive"):
        rerank(sim, 0, RecordingScorer(table))


def test_rerank_progress_bar_runs():
    sim, table = make_case(3, 4, seed=9)
    assert torch.equal(rerank(sim, 2, RecordingScorer(table), batch_size=2, progress=True),
                       one_query_at_a_time(sim, 2, table))


@pytest.mark.parametrize("n", [0, 1, 5, 8, 9, 10, 17, 100])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8])
def test_shard_rows_covers_each_row_once(n, world_size):
    shards = [shard_rows(n, rank, world_size) for rank in range(world_size)]
    assert [row for shard in shards for row in shard] == list(range(n))
    step = n // world_size + 1
    for rank, shard in enumerate(shards):
        # The reference's slice: rows [rank*step, min(n, rank*step + step)).
        assert list(shard) == list(range(n))[rank * step:min(n, rank * step + step)]
        assert shard.step == 1 and 0 <= shard.start <= shard.stop <= n


def test_shard_rows_errors():
    with pytest.raises(ValueError, match="rank"):
        shard_rows(10, 2, 2)
    with pytest.raises(ValueError, match="world_size"):
        shard_rows(10, 0, 0)
    with pytest.raises(ValueError, match="n must"):
        shard_rows(-1, 0, 1)


def test_gather_rows_is_identity_at_world_size_one():
    matrix = torch.randn(4, 3)
    assert gather_rows(matrix, range(1, 3)) is matrix


def _gather_worker(rank: int, world_size: int, init_file: str, sim: torch.Tensor, table: torch.Tensor,
                   results: dict) -> None:
    """One gloo rank: re-rank its shard, gather, and report the full matrix."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        rows = shard_rows(sim.shape[0], rank, world_size)
        local = rerank(sim, 3, lambda q, c: table[q, c], batch_size=4, rows=rows)
        results[rank] = gather_rows(local, rows)
    finally:
        dist.destroy_process_group()


def test_gather_rows_under_gloo_equals_single_process(tmp_path):
    # 4 rows over 3 ranks gives chunks of 2, 2 and an empty one: uneven blocks exercise the padding.
    world_size = 3
    sim, table = make_case(4, 6, seed=10)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(world_size, str(tmp_path / "init"), sim, table, results),
                 nprocs=world_size, join=True)
        gathered = dict(results)
    expected = rerank(sim, 3, lambda q, c: table[q, c])
    assert sorted(gathered) == list(range(world_size))
    for rank in range(world_size):
        assert torch.equal(gathered[rank], expected), rank
