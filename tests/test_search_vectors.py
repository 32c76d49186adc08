"""simla.search.vectors: exact top-k against brute force, the tie rule, edge cases, the faiss backends."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from simla.search import backends, vectors
from simla.search.vectors import VectorIndex, choose_backend


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def clustered(n: int, d: int, clusters: int, seed: int = 0, noise: float = 0.5) -> torch.Tensor:
    """Unit vectors around random unit centres, like embeddings of a collection with themes."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(clusters, d, generator=g), dim=1)
    assign = torch.randint(0, clusters, (n,), generator=g)
    points = centres[assign] + noise * torch.randn(n, d, generator=g) / d ** 0.5
    return torch.nn.functional.normalize(points, dim=1)


def brute_force(features: torch.Tensor, queries: torch.Tensor, k: int,
                exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full score matrix; stable descending sort = higher score first, lower row first among ties."""
    scores = queries.float() @ features.float().T
    if exclude is not None:
        scores[:, exclude] = float("-inf")
    vals, rows = scores.sort(dim=1, descending=True, stable=True)
    return vals[:, :k], rows[:, :k]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Shrink the exact search's blocks so small tests cross block and query-chunk boundaries."""
    monkeypatch.setattr(backends, "_SCORE_BUDGET", 4096)
    monkeypatch.setattr(backends, "_MIN_BLOCK_ROWS", 256)


# ----------------------------------------------------------------------------------------- exact
def test_exact_matches_brute_force_topk():
    features, queries = unit(3000, 32), unit(40, 32, seed=1)  # 40 queries: several query chunks
    index = VectorIndex(features, "exact")
    assert index.backend_name == "exact" and len(index) == 3000
    scores, rows = index.search(queries, 25)
    ref = (queries @ features.T).topk(25, dim=1)
    assert scores.dtype == torch.float32 and rows.dtype == torch.int64
    assert scores.shape == rows.shape == (40, 25)
    assert torch.equal(rows, ref.indices)
    torch.testing.assert_close(scores, ref.values)


def test_ties_lower_row_first_across_blocks():
    features = unit(1000, 16)
    # Rows 900, 5, 300 and 600 are copies of row 17 (four of them in other blocks of 256 rows), so a
    # query equal to it ties five ways at the top; k=3 cuts through the tie.
    for row in (900, 5, 300, 600):
        features[row] = features[17]
    query = features[17].clone()
    scores, rows = VectorIndex(features, "exact").search(query, 3)
    assert rows.tolist() == [[5, 17, 300]]
    assert torch.equal(scores[0], scores[0, :1].expand(3))
    # And with many queries and a cut inside the tie, the whole order equals the stable brute force.
    queries = torch.cat([features[[17, 3, 900]], unit(5, 16, seed=2)])
    for k in (1, 2, 5, 7):
        _, rows = VectorIndex(features, "exact").search(queries, k)
        _, ref_rows = brute_force(features, queries, k)
        assert torch.equal(rows, ref_rows)


def test_tie_of_zero_scores_and_exact_duplicates():
    # Orthogonal one-hot rows: every query scores 0 against all rows but one, so the cut falls in a
    # tie of hundreds of equal (zero) scores.
    features = torch.zeros(600, 600)
    features[torch.arange(600), torch.arange(600)] = 1.0
    queries = features[[599, 0, 300]]
    scores, rows = VectorIndex(features, "exact").search(queries, 4)
    assert rows.tolist() == [[599, 0, 1, 2], [0, 1, 2, 3], [300, 0, 1, 2]]
    assert scores[:, 1:].abs().max() == 0


def test_float16_and_numpy_inputs():
    features = unit(700, 24).half()
    queries = unit(6, 24, seed=3)
    index = VectorIndex(features.numpy(), "exact")
    scores, rows = index.search(queries.half().numpy(), 10)
    ref_scores, ref_rows = brute_force(features.float(), queries.half().float(), 10)
    assert torch.equal(rows, ref_rows)
    torch.testing.assert_close(scores, ref_scores)
    # Read-only arrays (memory-mapped files) are copied rather than wrapped.
    frozen = features.float().numpy().copy()
    frozen.flags.writeable = False
    assert torch.equal(VectorIndex(frozen, "exact").search(queries, 10)[1], rows)


def test_one_dimensional_query_is_one_query():
    features = unit(300, 8)
    index = VectorIndex(features, "exact")
    _, rows = index.search(features[42], 3)
    assert rows.shape == (1, 3) and rows[0, 0] == 42
    assert index.scores(features[42]).shape == (1, 300)


def test_empty_index_and_k_larger_than_n():
    empty = VectorIndex(torch.empty(0, 8), "exact")
    assert len(empty) == 0
    scores, rows = empty.search(unit(3, 8), 5)
    assert scores.shape == rows.shape == (3, 0)
    features, queries = unit(7, 8), unit(2, 8, seed=1)
    scores, rows = VectorIndex(features, "exact").search(queries, 50)
    assert rows.shape == (2, 7)
    assert torch.equal(rows, brute_force(features, queries, 7)[1])
    # No queries at all.
    assert VectorIndex(features, "exact").search(torch.empty(0, 8), 3)[1].shape == (0, 3)


def test_exclude_mask():
    features, queries = unit(1200, 16), unit(5, 16, seed=4)
    exclude = torch.zeros(1200, dtype=torch.bool)
    exclude[::3] = True
    exclude[256:700] = True  # a whole block excluded
    index = VectorIndex(features, "exact")
    scores, rows = index.search(queries, 20, exclude=exclude)
    ref_scores, ref_rows = brute_force(features, queries, 20, exclude)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(rows, ref_rows)
    assert not exclude[rows].any()
    # k' shrinks to the rows left; an all-False mask is the same as no mask.
    keep_three = torch.ones(1200, dtype=torch.bool)
    keep_three[[5, 800, 1100]] = False
    assert sorted(index.search(queries, 10, exclude=keep_three.numpy())[1][0].tolist()) == [5, 800, 1100]
    assert index.search(queries, 4, exclude=torch.ones(1200, dtype=torch.bool))[1].shape == (5, 0)
    nothing = torch.zeros(1200, dtype=torch.bool)
    assert torch.equal(index.search(queries, 9, exclude=nothing)[1], index.search(queries, 9)[1])


def test_scores_are_the_full_cosine_matrix():
    features, queries = unit(50, 8), unit(4, 8, seed=5)
    torch.testing.assert_close(VectorIndex(features, "exact").scores(queries), queries @ features.T)


def test_errors():
    features = unit(20, 8)
    index = VectorIndex(features, "exact")
    with pytest.raises(ValueError, match="shape"):
        index.search(unit(2, 9), 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(features[0], 0)
    with pytest.raises(ValueError, match="NaN"):
        index.search(torch.full((8,), float("nan")), 3)
    with pytest.raises(ValueError, match="exclude"):
        index.search(features[0], 3, exclude=torch.zeros(19, dtype=torch.bool))
    with pytest.raises(ValueError, match="exclude"):
        index.search(features[0], 3, exclude=torch.zeros(20))
    with pytest.raises(ValueError, match="unknown search backend"):
        VectorIndex(features, "annoy")
    with pytest.raises(ValueError, match="2-D"):
        VectorIndex(features[0], "exact")
    with pytest.raises(ValueError, match="NaN"):
        VectorIndex(torch.full((3, 8), float("nan")), "exact")
    with pytest.raises(ValueError, match="floats"):
        VectorIndex(torch.ones(3, 8, dtype=torch.int64), "exact")
    with pytest.raises(ValueError, match="nprobe"):
        VectorIndex(features, "exact", nprobe=0)


def test_missing_faiss_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "simla\[faiss\]"'):
        VectorIndex(unit(10, 8), "faiss")
    assert choose_backend(10 ** 9) == "exact"
    assert VectorIndex(unit(10, 8)).backend_name == "exact"


def test_auto_picks_exact_for_small_n():
    assert choose_backend(1000) == "exact"
    assert VectorIndex(unit(1000, 8)).backend_name == "exact"


# ----------------------------------------------------------------------------------------- faiss
def test_auto_picks_faiss_from_the_threshold():
    pytest.importorskip("faiss")
    assert choose_backend(vectors.FAISS_AUTO_THRESHOLD - 1) == "exact"
    assert choose_backend(vectors.FAISS_AUTO_THRESHOLD) == "faiss"
    assert vectors.FAISS_AUTO_THRESHOLD >= vectors.FAISS_IVF_MIN_ROWS  # auto's faiss is always IVF


def test_faiss_flat_equals_exact():
    pytest.importorskip("faiss")
    features, queries = unit(2000, 32).half(), unit(30, 32, seed=6)
    exact = VectorIndex(features, "exact")
    flat = VectorIndex(features, "faiss")
    assert flat.backend_name == "faiss-flat" and len(flat) == 2000
    for exclude in (None, torch.rand(2000, generator=torch.Generator().manual_seed(0)) < 0.3):
        e_scores, e_rows = exact.search(queries, 15, exclude=exclude)
        f_scores, f_rows = flat.search(queries, 15, exclude=exclude)
        assert torch.equal(f_rows, e_rows)
        torch.testing.assert_close(f_scores, e_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.scores(queries), exact.scores(queries))
    assert VectorIndex(torch.empty(0, 32), "faiss").search(queries, 3)[1].shape == (30, 0)


def test_faiss_ivf_recall_and_reproducibility():
    pytest.importorskip("faiss")
    features = clustered(20_000, 32, clusters=200, seed=7)
    # Queries near stored items, as a caption is near its image.
    queries = features[torch.randperm(20_000, generator=torch.Generator().manual_seed(8))[:200]]
    queries = torch.nn.functional.normalize(queries + 0.05 * unit(200, 32, seed=9), dim=1)
    ivf = VectorIndex(features, "faiss-ivf", seed=3)
    assert ivf.backend_name == f"faiss-ivf{vectors.ivf_nlist(20_000)}" and ivf.nprobe == vectors.DEFAULT_NPROBE
    _, rows = ivf.search(queries, 10)
    _, truth = VectorIndex(features, "exact").search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows.tolist(), truth.tolist())])
    assert recall >= 0.9, recall
    # Seeded: a second build returns the same rows.
    assert torch.equal(VectorIndex(features, "faiss-ivf", seed=3).search(queries, 10)[1], rows)
    # A k beyond what nprobe=1 can reach still gets k rows (exact fallback), and exclusions hold.
    narrow = VectorIndex(features, "faiss-ivf", nprobe=1, seed=3)
    exclude = torch.zeros(20_000, dtype=torch.bool)
    exclude[truth[:, 0]] = True
    _, rows = narrow.search(queries[:5], 400, exclude=exclude)
    assert rows.shape == (5, 400) and not exclude[rows].any()
    assert torch.equal(rows, VectorIndex(features, "exact").search(queries[:5], 400, exclude=exclude)[1])
    narrow.nprobe = 10 ** 6  # capped at nlist: every list scanned, so the answer is exact
    assert narrow.nprobe == vectors.ivf_nlist(20_000)
    assert torch.equal(narrow.search(queries, 10)[1], truth)
    with pytest.raises(ValueError, match="nprobe"):
        narrow.nprobe = 0
    with pytest.raises(ValueError, match="IVF"):
        VectorIndex(features[:10], "exact").nprobe = 4


def test_faiss_ivf_borrows_float16_features():
    pytest.importorskip("faiss")
    features = clustered(5000, 16, clusters=50, seed=10).half()
    queries = unit(8, 16, seed=11)
    ivf = VectorIndex(features, "faiss-ivf")
    assert ivf.nbytes == 5000 * 16 * 2 + 5000 * (16 * 4 + 8) + vectors.ivf_nlist(5000) * 16 * 4
    torch.testing.assert_close(ivf.scores(queries), queries @ features.float().T)
