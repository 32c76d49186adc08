"""Nearest-neighbour stage of ``simla search``: top-k inner products over stored ITC features.

The index stores one L2-normalised ITC feature per item, so the inner product of a query with a row is
their cosine similarity. :class:`VectorIndex` answers "which k rows score highest for this query": it
validates the features and queries and hands the search to a :class:`~simla.search.backends.SearchBackend`
(see :mod:`simla.search.backends` for each backend's storage, speed and measured numbers):

``exact`` (:class:`~simla.search.backends.ExactBackend`)
    A chunked matrix product in torch with bounded memory (64 MiB of scores). Results are exact and
    deterministic: higher score first and, among equal scores, the lower row first. 4*N*D bytes.

``faiss`` (optional ``faiss-cpu``, ``pip install "simla[faiss]"``)
    Below ``FAISS_IVF_MIN_ROWS`` rows an exact ``IndexFlatIP`` (backend name ``faiss-flat``,
    :class:`~simla.search.backends.FaissFlatBackend`): same answers as ``exact`` up to float rounding,
    sharing its float32 storage with the torch copy. It measured slower than ``exact`` at every size, so
    ``auto`` never picks it; it is there for an explicit ``backend="faiss"`` on a small collection.
    From ``FAISS_IVF_MIN_ROWS`` rows an inverted file (backend name ``faiss-ivf<nlist>``,
    :class:`~simla.search.backends.FaissIVFBackend`) with nlist = 4*sqrt(N) spherical k-means lists, of
    which a query scans ``nprobe``: approximate (see ``DEFAULT_NPROBE``), with an exact fallback for
    queries that come back short, so the result always has k' rows in the order of ``exact``.
    ``"faiss-flat"`` and ``"faiss-ivf"`` force one of the two whatever the size (benchmarks, tests).

``auto`` (the default) takes ``faiss`` when faiss is installed and N >= ``FAISS_AUTO_THRESHOLD``, else
``exact``.

The chooser (:func:`make_backend`) resolves the names ``auto`` and ``faiss`` by the row count (see
``_ALIASES``) to one of ``BACKEND_CLASSES`` and creates it; the backend object does the rest.

Measured numbers come from ``benchmarks/search_query.py`` (2 CPU cores, 256-d float16 features, k=20).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import numpy as np
import torch

from .backends import (DEFAULT_NPROBE, FAISS_IVF_MIN_ROWS, ExactBackend, FaissFlatBackend, FaissIVFBackend,
                       SearchBackend, faiss_available, ivf_nlist)

__all__ = ["BACKEND_CLASSES", "DEFAULT_NPROBE", "FAISS_AUTO_THRESHOLD", "FAISS_IVF_MIN_ROWS", "VectorIndex",
           "choose_backend", "faiss_available", "ivf_nlist", "make_backend", "resolve_backend"]

#: ``auto`` switches from ``exact`` to ``faiss`` (an IVF index) at this many rows, when faiss is installed.
#: Exact single-query latency is linear, ~44 ns per row on 2 cores: 2.6 ms at 100k rows, 44 ms at 1M,
#: 87 ms at 2M, 197 ms at 4M. IVF answers in ~1 ms at 1M but its build took 90 s there (the time of ~2,000
#: exact queries, paid on every load) and its recall depends on how clustered the features are. So the
#: exact search is kept while it stays under ~0.1 s per query, i.e. up to 2M rows; a long-lived process
#: serving many queries can pass ``backend="faiss"`` explicitly from ~1M rows.
FAISS_AUTO_THRESHOLD = 2_000_000


# ------------------------------------------------------------------------------------------ chooser
def choose_backend(n: int) -> str:
    """The backend ``auto`` resolves to for ``n`` rows: ``"faiss"`` or ``"exact"``.

    faiss only from ``FAISS_AUTO_THRESHOLD`` rows and only when it is installed: below that the exact
    search is fast enough and needs no training.
    """
    return "faiss" if n >= FAISS_AUTO_THRESHOLD and faiss_available() else "exact"


def _faiss_by_size(n: int) -> str:
    """The faiss index type ``faiss`` resolves to for ``n`` rows: flat below ``FAISS_IVF_MIN_ROWS``, else IVF."""
    return "faiss-ivf" if n >= FAISS_IVF_MIN_ROWS else "faiss-flat"


#: The backend classes by name.
BACKEND_CLASSES: dict[str, type[SearchBackend]] = {
    "exact": ExactBackend, "faiss-flat": FaissFlatBackend, "faiss-ivf": FaissIVFBackend}

#: Names that stand for a choice by row count: each maps n to another name (``auto`` -> ``faiss`` ->
#: ``faiss-ivf`` at 2M rows with faiss installed).
_ALIASES: dict[str, Callable[[int], str]] = {"auto": choose_backend, "faiss": _faiss_by_size}

_BACKENDS = tuple(sorted({*_ALIASES, *BACKEND_CLASSES}))  # auto, exact, faiss, faiss-flat, faiss-ivf


def _check_name(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown search backend {backend!r}; choose one of {', '.join(_BACKENDS)}")


def resolve_backend(backend: str, n: int) -> str:
    """The key of ``BACKEND_CLASSES`` that ``backend`` (any accepted name) stands for with ``n`` rows."""
    _check_name(backend)
    while backend in _ALIASES:
        backend = _ALIASES[backend](n)
    return backend


def make_backend(backend: str, dim: int, n: int, *, nprobe: int | None = None, seed: int = 0) -> SearchBackend:
    """An empty backend object of the class ``backend`` resolves to for ``n`` rows of width ``dim``.

    ``nprobe`` and ``seed`` are passed on to an IVF backend and ignored by the others. Creating a faiss
    backend raises an ImportError that says how to install faiss when it is missing.
    """
    return BACKEND_CLASSES[resolve_backend(backend, n)].create(dim, nprobe=nprobe, seed=seed)


# ----------------------------------------------------------------------------------------- inputs
def _as_tensor(x: Any, name: str, *, keep_half: bool = False) -> torch.Tensor:
    """A torch view (no copy where possible) of a numpy array or tensor, as float32.

    With ``keep_half`` a float16 input stays float16, so a caller's float16 features can be borrowed
    instead of doubled in size.
    """
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"{name} must hold floats, got dtype {x.dtype}")
        wanted = np.float16 if keep_half and x.dtype == np.float16 else np.float32
        if x.dtype != wanted or not x.flags.writeable:
            x = x.astype(wanted)  # a writable copy: torch warns about wrapping read-only memory
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise ValueError(f"{name} must hold floats, got dtype {x.dtype}")
        x = x.detach()
        return x if keep_half and x.dtype == torch.float16 else x.float()
    raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _as_mask(exclude: Any, n: int) -> torch.Tensor | None:
    """The validated (n,) bool exclusion mask, or None when it excludes nothing."""
    if exclude is None:
        return None
    mask = torch.as_tensor(exclude)
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(f"exclude must be a bool mask of shape ({n},), got {mask.dtype} {tuple(mask.shape)}")
    mask = mask.cpu()
    return mask if bool(mask.any()) else None


# ----------------------------------------------------------------------------------------- index
class VectorIndex:
    """Top-k inner-product search over N stored L2-normalised features (inner product = cosine).

    Args:
        features: (N, D) float16 or float32 numpy array or torch tensor, rows L2-normalised; N may be 0.
            The exact and flat backends keep a float32 torch tensor (4*N*D bytes); the IVF backend keeps
            the features as given next to its lists. A float32 CPU tensor or writable float32 array (and
            for IVF a float16 one) is used without a copy, so do not modify it afterwards.
        backend: ``"auto"``, ``"exact"``, ``"faiss"`` (flat or IVF by size), or ``"faiss-flat"`` /
            ``"faiss-ivf"`` to force one faiss index type (benchmarks, tests). See the module docstring.
        nprobe: IVF lists scanned per query (default ``DEFAULT_NPROBE``, capped at nlist); ignored by the
            exact and flat backends.
        seed: seeds the IVF training sample and k-means, so the same features give the same index.

    Attributes:
        backend: the :class:`~simla.search.backends.SearchBackend` object that answers the queries.
    """

    def __init__(self, features: Any, backend: str = "auto", *, nprobe: int | None = None, seed: int = 0) -> None:
        _check_name(backend)
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        data = _as_tensor(features, "features", keep_half=True)
        if data.dim() != 2:
            raise ValueError(f"features must be a 2-D (N, D) array, got shape {tuple(data.shape)}")
        if data.shape[1] < 1:
            raise ValueError("features must have at least one dimension (D >= 1)")
        if not bool(torch.isfinite(data).all()):
            raise ValueError("features contain NaN or infinite values")
        self.dim = int(data.shape[1])
        self.backend = make_backend(backend, self.dim, int(data.shape[0]), nprobe=nprobe, seed=seed)
        self.backend.add(data)

    @property
    def backend_name(self) -> str:
        """The resolved backend: ``"exact"``, ``"faiss-flat"`` or ``"faiss-ivf<nlist>"``."""
        return self.backend.name

    @property
    def nprobe(self) -> int | None:
        """IVF lists scanned per query (``None`` for the exact backends); settable, capped at nlist."""
        return self.backend.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.backend.nprobe = value

    def __len__(self) -> int:
        return len(self.backend)

    def rows(self, indices: Any) -> torch.Tensor:
        """The stored features of the given rows as float32, (len(indices), D) (e.g. to compare hits)."""
        return self.backend.rows(indices)

    @property
    def nbytes(self) -> int:
        """Approximate bytes held by the searchable structure (features, lists, centroids)."""
        return self.backend.nbytes

    def _queries(self, queries: Any) -> torch.Tensor:
        q = _as_tensor(queries, "queries")
        if q.dim() == 1:
            q = q.unsqueeze(0)
        if q.dim() != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (Q, {self.dim}) or ({self.dim},), got {tuple(q.shape)}")
        if not bool(torch.isfinite(q).all()):
            raise ValueError("queries contain NaN or infinite values")
        return q

    def scores(self, queries: Any) -> torch.Tensor:
        """Exact (Q, N) float32 cosine scores of every query against every row (small sets: tests, dedup)."""
        return self.backend.scores(self._queries(queries))

    def search(self, queries: Any, k: int, *, exclude: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best rows per query, best first.

        Args:
            queries: (Q, D) or (D,) float array or tensor.
            k: rows wanted per query (>= 1).
            exclude: optional (N,) bool mask of rows never to return (e.g. deleted items).

        Returns:
            ``(scores, rows)``: float32 and int64 tensors of shape (Q, k') on the CPU, where
            k' = min(k, number of rows not excluded). Exact backend: higher score first, among equal
            scores the lower row first.
        """
        try:
            k = operator.index(k)
        except TypeError:
            raise ValueError(f"k must be an integer, got {k!r}") from None
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._queries(queries)
        n = len(self)
        mask = _as_mask(exclude, n)
        k = min(k, n - (0 if mask is None else int(mask.sum())))
        if k == 0 or q.shape[0] == 0:
            return torch.empty(q.shape[0], k), torch.empty(q.shape[0], k, dtype=torch.int64)
        return self.backend.search(q, k, exclude=mask)

    def __repr__(self) -> str:
        probe = f", nprobe={self.nprobe}" if self.nprobe is not None else ""
        return f"VectorIndex(n={len(self)}, dim={self.dim}, backend={self.backend_name!r}{probe})"
