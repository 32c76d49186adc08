"""simla.search.backends through its interface: every backend agrees with the exact one, nbytes, the chooser."""

from __future__ import annotations

import sys

import pytest
import torch

from simla.search import vectors
from simla.search.backends import (ExactBackend, FaissFlatBackend, FaissIVFBackend, SearchBackend, ivf_nlist)
from simla.search.vectors import make_backend, resolve_backend

N, D = 3000, 32


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def built(cls: type[SearchBackend], features: torch.Tensor, **options) -> SearchBackend:
    if cls is not ExactBackend:
        pytest.importorskip("faiss")
    backend = cls.create(features.shape[1], **options)
    backend.add(features)
    return backend


def exhaustive_ivf(features: torch.Tensor) -> SearchBackend:
    """An IVF backend that probes every list, so its answer is exact up to float rounding."""
    return built(FaissIVFBackend, features, nprobe=10 ** 6, seed=1)


@pytest.mark.parametrize("make", [lambda f: built(FaissFlatBackend, f), exhaustive_ivf], ids=["flat", "ivf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_every_backend_answers_the_exact_top_k(make, dtype):
    features, queries = unit(N, D).to(dtype), unit(25, D, seed=1)
    exact, other = built(ExactBackend, features), make(features)
    exclude = torch.rand(N, generator=torch.Generator().manual_seed(2)) < 0.4
    for k, mask in ((1, None), (10, None), (40, exclude)):
        e_scores, e_rows = exact.search(queries, k, exclude=mask)
        o_scores, o_rows = other.search(queries, k, exclude=mask)
        assert o_scores.shape == o_rows.shape == (25, k)
        assert o_scores.dtype == torch.float32 and o_rows.dtype == torch.int64
        assert torch.equal(o_rows, e_rows)
        torch.testing.assert_close(o_scores, e_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(other.scores(queries), exact.scores(queries), atol=1e-6, rtol=0)
    torch.testing.assert_close(other.rows([0, 7]), features[[0, 7]].float())
    assert len(other) == len(exact) == N


@pytest.mark.parametrize("cls", [ExactBackend, FaissFlatBackend, FaissIVFBackend])
def test_two_adds_equal_one(cls):
    features, queries = unit(N, D), unit(10, D, seed=3)
    whole = built(cls, features, nprobe=10 ** 6)
    parts = built(cls, features[:2000], nprobe=10 ** 6)
    parts.add(features[2000:])
    assert len(parts) == N
    # IVF: nlist comes from the first add (2000 rows), but with every list probed the answer is the same.
    assert torch.equal(parts.search(queries, 15)[1], whole.search(queries, 15)[1])
    assert torch.equal(parts.features, whole.features)
    if cls is FaissIVFBackend:
        assert parts.name == f"faiss-ivf{ivf_nlist(2000)}"
    else:
        assert parts.name == whole.name and parts.nbytes == whole.nbytes


def test_nbytes_follow_the_documented_formulas():
    pytest.importorskip("faiss")
    for dtype, size in ((torch.float32, 4), (torch.float16, 2)):
        features = unit(N, D).to(dtype)
        assert built(ExactBackend, features).nbytes == 4 * N * D  # float16 is upcast: one float32 tensor
        assert built(FaissFlatBackend, features).nbytes == 4 * N * D  # shared with faiss, counted once
        ivf = built(FaissIVFBackend, features)
        nlist = ivf_nlist(N)
        assert ivf.name == f"faiss-ivf{nlist}"
        assert ivf.nbytes == size * N * D + N * (4 * D + 8) + nlist * D * 4
    assert ExactBackend(D).nbytes == 0


def test_flat_shares_its_storage_with_faiss():
    flat = built(FaissFlatBackend, unit(100, D))
    xb = flat._faiss.rev_swig_ptr(flat._index.get_xb(), 100 * D)
    assert flat.features.data_ptr() == xb.ctypes.data


def test_ivf_keeps_float16_features_without_a_copy():
    features = unit(N, D).half()
    assert built(FaissIVFBackend, features).features.data_ptr() == features.data_ptr()


def test_nprobe_belongs_to_ivf_only():
    assert ExactBackend(D).nprobe is None
    with pytest.raises(ValueError, match="IVF"):
        ExactBackend(D).nprobe = 4
    pytest.importorskip("faiss")
    ivf = FaissIVFBackend(D, nprobe=500)
    assert ivf.name == "faiss-ivf" and ivf.nprobe == 500  # not trained yet: not capped yet
    ivf.add(unit(N, D))
    assert ivf.nprobe == ivf_nlist(N)  # capped at nlist by training
    with pytest.raises(ValueError, match="at least one row"):
        FaissIVFBackend(D).add(torch.empty(0, D))


def test_search_backend_is_abstract():
    with pytest.raises(TypeError):
        SearchBackend(D)


# ----------------------------------------------------------------------------------------- chooser
def test_chooser_picks_the_documented_backend_per_size():
    pytest.importorskip("faiss")
    auto, ivf_min = vectors.FAISS_AUTO_THRESHOLD, vectors.FAISS_IVF_MIN_ROWS
    expected = {
        ("auto", 0): "exact", ("auto", auto - 1): "exact", ("auto", auto): "faiss-ivf",
        ("faiss", 0): "faiss-flat", ("faiss", ivf_min - 1): "faiss-flat", ("faiss", ivf_min): "faiss-ivf",
        ("exact", 10 ** 9): "exact", ("faiss-flat", 10 ** 9): "faiss-flat", ("faiss-ivf", 10): "faiss-ivf",
    }
    for (name, n), resolved in expected.items():
        assert resolve_backend(name, n) == resolved, (name, n)
        backend = make_backend(name, D, n, nprobe=3, seed=1)
        assert type(backend) is vectors.BACKEND_CLASSES[resolved]
    assert make_backend("faiss-ivf", D, 10, nprobe=3).nprobe == 3
    with pytest.raises(ValueError, match="unknown search backend"):
        resolve_backend("annoy", 10)


def test_chooser_without_faiss(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    assert resolve_backend("auto", 10 ** 9) == "exact"
    assert isinstance(make_backend("auto", D, 10 ** 9), ExactBackend)
    assert resolve_backend("faiss", 10) == "faiss-flat"  # the name resolves; creating it says what to install
    with pytest.raises(ImportError, match=r'pip install "simla\[faiss\]"'):
        make_backend("faiss", D, 10)
