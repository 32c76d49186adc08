"""Search backends of :class:`~simla.search.vectors.VectorIndex`: one class per way of finding the top k.

Every backend implements :class:`SearchBackend`: ``add(features)`` stores rows, ``search(queries, k,
exclude=...)`` returns ``(scores, rows)``, ``nbytes`` and ``name`` describe it, and ``features`` holds
the rows for :meth:`SearchBackend.scores` and :meth:`SearchBackend.rows`. The backends trust their
inputs: :class:`~simla.search.vectors.VectorIndex` validates them and answers the empty cases.

:class:`ExactBackend` (name ``exact``)
    A chunked matrix product in torch. Rows are scored in blocks and a running top-k is merged after each
    block, so memory stays bounded (about ``_SCORE_BUDGET`` float32 scores, 64 MiB, however many queries
    and rows there are) and a (Q, N) score matrix is never built. Results are exact and deterministic:
    higher score first and, among equal scores, the lower row first. The features are held as one float32
    tensor: 4*N*D bytes (1 GiB for a million 256-d features), twice the float16 features stored on disk.

:class:`FaissFlatBackend` (name ``faiss-flat``, optional ``faiss-cpu``, ``pip install "simla[faiss]"``)
    An exact ``IndexFlatIP``: same answers as ``exact`` up to float rounding, sharing its float32 storage
    with the torch copy (4*N*D bytes in all). It measured slower than ``exact`` at every size (e.g. 77 ms
    vs 44 ms per query at 1M rows), so ``auto`` never picks it; ``backend="faiss"`` takes it below
    ``FAISS_IVF_MIN_ROWS`` rows, for a small collection.

:class:`FaissIVFBackend` (name ``faiss-ivf<nlist>``, optional ``faiss-cpu``)
    An inverted file (``IndexIVFFlat``, no compression) with nlist = 4*sqrt(N) spherical k-means
    centroids (unit-norm, which is the right partition for cosine), trained on a seeded random sample of
    ``_TRAIN_POINTS_PER_LIST`` rows per list; ``backend="faiss"`` takes it from ``FAISS_IVF_MIN_ROWS``
    rows. A query scans only the ``nprobe`` lists whose centroids are closest, so it is approximate: see
    ``DEFAULT_NPROBE`` for the measured recall. The inverted lists hold their own float32 copy of the
    features plus an int64 id per row (4*N*D + 8*N bytes); the features are also kept as given, float16
    borrowed without a copy, for :meth:`SearchBackend.scores` and the exact fallback below, which upcast
    them block by block. Building is the expensive part: 90 s for 1M 256-d rows on 2 CPU cores (k-means
    training and assigning every row both cost ~N*nlist*D, so ~N**1.5).

    An IVF search can come back with fewer than k rows (the probed lists held too few, typically with a
    large k or many excluded rows); those queries are answered again by the exact search, so the result
    always has k' rows. Among equal scores faiss may pick any of the tied rows at the cut-off; the rows
    it returns are put in the same order as ``exact`` (score, then row).

Measured numbers come from ``benchmarks/search_query.py`` (2 CPU cores, 256-d float16 features, k=20).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch

from ..errors import MissingExtraError


__all__ = ["DEFAULT_NPROBE", "FAISS_IVF_MIN_ROWS", "ExactBackend", "FaissFlatBackend", "FaissIVFBackend",
           "SearchBackend", "faiss_available", "ivf_nlist"]

#: The faiss backend uses an exact ``IndexFlatIP`` below this many rows and an IVF index from it: at 100k
#: rows the IVF build takes ~7 s and a flat search ~5 ms, so smaller collections are not worth training.
FAISS_IVF_MIN_ROWS = 100_000

#: IVF lists probed per query when ``nprobe`` is not given. recall@10 against the exact search on the
#: benchmark's clustered data (clusters of ~1000 items, noise 1.0), by nprobe 8/16/32/64: 10k rows
#: (nlist 250) 0.78/0.965/1.0/1.0; 100k (nlist 1265) 0.935/0.999/1.0/1.0; 1M (nlist 4000) 1.0 for all.
#: 16 is the smallest power of two reaching 0.95 everywhere; 32 is the default for margin, because recall
#: falls quickly on less clustered data (100k rows in clusters of 10k, noise 1.5: 0.50/0.71/0.94 at
#: nprobe 16/32/64) and costs only ~0.4 ms more per query at 1M rows (0.97 ms vs 0.61 ms).
DEFAULT_NPROBE = 32

#: Rows of the k-means training sample per IVF list: faiss asks for at least 39, and training cost grows
#: with the sample (it dominates the build: ~N**1.5 with nlist ~ sqrt(N)), so just above that.
_TRAIN_POINTS_PER_LIST = 40

#: Scores materialised at once by the exact search: 2**24 float32 = 64 MiB per block.
_SCORE_BUDGET = 1 << 24
#: Smallest row block of the exact search, and so the largest query chunk is _SCORE_BUDGET // this.
_MIN_BLOCK_ROWS = 1 << 16

_FAISS_MISSING = 'the faiss search backend needs the optional faiss-cpu package: pip install "simla[faiss]"'

Scored = tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------------------------- faiss
def _import_faiss() -> Any:
    """Import faiss, or raise an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise MissingExtraError(_FAISS_MISSING) from error
    return faiss


def faiss_available() -> bool:
    """Whether the optional faiss package can be imported."""
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def ivf_nlist(n: int) -> int:
    """IVF list count for ``n`` rows: about 4*sqrt(n), capped so each list gets enough training rows."""
    return max(1, min(round(4 * math.sqrt(n)), n // _TRAIN_POINTS_PER_LIST))


# ----------------------------------------------------------------------------------- exact top-k
def _canonical_order(vals: torch.Tensor, rows: torch.Tensor) -> Scored:
    """Sort each row of candidates by score descending and, among equal scores, by row ascending."""
    rows, perm = rows.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    return vals, rows.gather(1, perm)


def _block_topk(scores: torch.Tensor, k: int) -> Scored:
    """Top-k columns of each row of ``scores`` under the tie rule (lowest column among equal scores).

    ``torch.topk`` picks an arbitrary subset of values tied at the k-th place. Rows where that happened
    (more columns equal the k-th value than were taken) are redone: every column above the k-th value
    plus the lowest columns equal to it. That costs one comparison pass, and the repair only runs on
    rows with such a tie, which needs duplicate features or a constructed tie.
    """
    vals, cols = scores.topk(k, dim=1, sorted=False)
    kth = vals.min(dim=1, keepdim=True).values
    ambiguous = (scores == kth).sum(dim=1) > (vals == kth).sum(dim=1)
    if bool(ambiguous.any()):
        sub, sub_kth = scores[ambiguous], kth[ambiguous]
        above, equal = sub > sub_kth, sub == sub_kth
        needed = k - above.sum(dim=1, keepdim=True)
        keep = above | (equal & (equal.cumsum(dim=1) <= needed))
        sub_cols = keep.nonzero()[:, 1].view(-1, k)  # exactly k per row, in ascending column order
        cols[ambiguous] = sub_cols
        vals[ambiguous] = sub.gather(1, sub_cols)
    return _canonical_order(vals, cols)


def _exact_search(features: torch.Tensor, queries: torch.Tensor, k: int, exclude: torch.Tensor | None) -> Scored:
    """Exact top-k by blocks of rows and chunks of queries, merging a running top-k after each block.

    Blocks are visited in row order and each block's candidates are already in canonical order, so a
    stable sort of [running, block] by score keeps lower rows first among ties: the merge is exact.
    """
    n, q = features.shape[0], queries.shape[0]
    device = features.device
    query_chunk = max(1, min(q, _SCORE_BUDGET // _MIN_BLOCK_ROWS))
    block_rows = max(_MIN_BLOCK_ROWS, _SCORE_BUDGET // query_chunk)
    allowed = None if exclude is None else (~exclude).to(device)
    out_vals, out_rows = [], []
    for q0 in range(0, q, query_chunk):
        chunk = queries[q0:q0 + query_chunk]
        best_vals = torch.empty(chunk.shape[0], 0, device=device)
        best_rows = torch.empty(chunk.shape[0], 0, dtype=torch.int64, device=device)
        for r0 in range(0, n, block_rows):
            r1 = min(n, r0 + block_rows)
            take = r1 - r0 if allowed is None else int(allowed[r0:r1].sum())
            take = min(k, take)
            if take == 0:
                continue
            scores = chunk @ features[r0:r1].float().T  # float16 rows (IVF fallback) are upcast here
            if allowed is not None:
                scores.masked_fill_(~allowed[r0:r1], float("-inf"))
            vals, rows = _block_topk(scores, take)
            vals = torch.cat([best_vals, vals], dim=1)
            rows = torch.cat([best_rows, rows + r0], dim=1)
            vals, order = vals.sort(dim=1, descending=True, stable=True)
            best_vals, best_rows = vals[:, :k], rows.gather(1, order[:, :k])
        out_vals.append(best_vals)
        out_rows.append(best_rows)
    return torch.cat(out_vals).cpu(), torch.cat(out_rows).cpu()


def _append(stored: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` itself when nothing is stored yet (borrowed, no copy), else both rows sets in one tensor."""
    if stored.shape[0] == 0:
        return new
    dtype = torch.promote_types(stored.dtype, new.dtype)
    return torch.cat([stored.to(dtype), new.to(stored.device, dtype)])


# ------------------------------------------------------------------------------------- interface
class SearchBackend(ABC):
    """Top-k inner-product search over stored (N, D) rows; one subclass per way of searching.

    Subclasses set ``features`` (the stored rows, float32 or float16, on any device) in :meth:`add`,
    and implement :meth:`search`, :attr:`nbytes` and :attr:`name`. Inputs arrive validated: features
    and queries are finite float tensors of width ``dim``, 1 <= k <= the number of rows not excluded,
    and ``exclude`` is None or a CPU (N,) bool mask that excludes at least one row.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.features = torch.empty(0, dim)

    @classmethod
    def create(cls, dim: int, *, nprobe: int | None = None, seed: int = 0) -> "SearchBackend":
        """An empty backend for ``dim``-wide rows; ``nprobe`` and ``seed`` only matter to an IVF index."""
        return cls(dim)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    @abstractmethod
    def name(self) -> str:
        """The resolved backend name: ``"exact"``, ``"faiss-flat"`` or ``"faiss-ivf<nlist>"``."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Approximate bytes held by the searchable structure (features, lists, centroids)."""

    @abstractmethod
    def add(self, features: torch.Tensor) -> None:
        """Append (M, D) rows; they get the row numbers len(self) to len(self) + M - 1."""

    @abstractmethod
    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> Scored:
        """``(scores, rows)``: (Q, k) float32 and int64 CPU tensors, best first, ties by lower row."""

    @property
    def nprobe(self) -> int | None:
        """IVF lists scanned per query; ``None`` for a backend without lists."""
        return None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        raise ValueError(f"nprobe only applies to an IVF index, not to {self.name!r}")

    def rows(self, indices: Any) -> torch.Tensor:
        """The stored features of the given rows as float32, (len(indices), D)."""
        return self.features[torch.as_tensor(indices, dtype=torch.long)].float()

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """Exact (Q, N) float32 scores of every query against every row, upcast block by block, on the CPU."""
        q = queries.to(self.features.device)
        n = len(self)
        out = torch.empty(q.shape[0], n, device=q.device)
        for start in range(0, n, _MIN_BLOCK_ROWS):
            block = self.features[start:start + _MIN_BLOCK_ROWS].float()
            out[:, start:start + block.shape[0]] = q @ block.T
        return out.cpu()


# ------------------------------------------------------------------------------------------ exact
class ExactBackend(SearchBackend):
    """Chunked exact search in torch over one float32 tensor (4*N*D bytes); see the module docstring.

    The first :meth:`add` of a float32 tensor keeps it without a copy, on its device.
    """

    @property
    def name(self) -> str:
        return "exact"

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * self.features.element_size()

    def add(self, features: torch.Tensor) -> None:
        self.features = _append(self.features, features.float().contiguous())

    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> Scored:
        return _exact_search(self.features, queries.to(self.features.device), k, exclude)


# ------------------------------------------------------------------------------------------ faiss
class _FaissBackend(SearchBackend):
    """What the faiss backends share: the search with an exclusion selector and the exact repair."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._faiss = _import_faiss()  # raises, saying how to install it, before anything is built
        self._index: Any = None

    def _search_params(self, selector: Any) -> Any:
        """faiss search parameters that apply ``selector`` (and whatever else the index type needs)."""
        return self._faiss.SearchParameters(sel=selector)

    def search(self, queries: torch.Tensor, k: int, *, exclude: torch.Tensor | None = None) -> Scored:
        params = None
        if exclude is not None:
            bitmap = np.packbits((~exclude).numpy(), bitorder="little")
            params = self._search_params(self._faiss.IDSelectorBitmap(bitmap))  # keeps a reference to bitmap
        q = queries.cpu()
        matrix = np.ascontiguousarray(q.numpy(), dtype=np.float32)
        distances, labels = self._index.search(matrix, k, params=params)
        vals, rows = _canonical_order(torch.from_numpy(distances), torch.from_numpy(labels))
        short = (rows < 0).any(dim=1)
        if bool(short.any()):  # the probed lists held fewer than k allowed rows: answer exactly
            vals[short], rows[short] = _exact_search(self.features, q[short], k, exclude)
        return vals, rows


class FaissFlatBackend(_FaissBackend):
    """Exact faiss ``IndexFlatIP``; its float32 storage is shared with the torch copy instead of duplicated."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        self._index = self._faiss.IndexFlatIP(dim)

    @property
    def name(self) -> str:
        return "faiss-flat"

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * self.features.element_size()

    def add(self, features: torch.Tensor) -> None:
        data = features.cpu().float()
        if not data.shape[0]:
            self.features = _append(self.features, data.contiguous())
            return
        self._index.add(np.ascontiguousarray(data.numpy()))
        n = int(self._index.ntotal)
        stored = self._faiss.rev_swig_ptr(self._index.get_xb(), n * self.dim)  # re-read: add may reallocate
        self.features = torch.from_numpy(stored).view(n, self.dim)


class FaissIVFBackend(_FaissBackend):
    """Inverted file over spherical k-means lists, trained on a seeded sample of the first rows added.

    The lists hold their own float32 copy, so the features are kept as given (float16 stays float16,
    borrowed without a copy) for the exact fallback and :meth:`scores`, and are added in float32 slices
    so the build never holds a second full float32 copy. nlist is fixed by the first :meth:`add`.

    Args:
        dim: feature width D.
        nprobe: lists scanned per query (default ``DEFAULT_NPROBE``), capped at nlist once trained.
        seed: seeds the training sample and k-means, so the same features give the same index.
    """

    def __init__(self, dim: int, *, nprobe: int | None = None, seed: int = 0) -> None:
        super().__init__(dim)
        self._nprobe = nprobe or DEFAULT_NPROBE  # applied (and capped) when the index is trained
        self._seed = seed
        self._quantizer: Any = None

    @classmethod
    def create(cls, dim: int, *, nprobe: int | None = None, seed: int = 0) -> "FaissIVFBackend":
        return cls(dim, nprobe=nprobe, seed=seed)

    @property
    def name(self) -> str:
        return "faiss-ivf" if self._index is None else f"faiss-ivf{self._index.nlist}"

    @property
    def nlist(self) -> int:
        """Inverted lists of the trained index (0 before the first :meth:`add`)."""
        return 0 if self._index is None else int(self._index.nlist)

    @property
    def nbytes(self) -> int:
        n = len(self)
        return n * self.dim * self.features.element_size() + n * (self.dim * 4 + 8) + self.nlist * self.dim * 4

    @property
    def nprobe(self) -> int:
        return self._nprobe if self._index is None else int(self._index.nprobe)

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._nprobe = int(value)
        if self._index is not None:
            self._index.nprobe = min(int(value), self.nlist)

    def _search_params(self, selector: Any) -> Any:
        return self._faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe)

    def _train(self, data: torch.Tensor) -> None:
        """Create the IVF index for ``len(data)`` rows and train its k-means on a seeded sample of them."""
        faiss, n = self._faiss, data.shape[0]
        nlist = ivf_nlist(n)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = self._seed
        index.cp.spherical = True  # unit-norm centroids: the right partition for cosine similarity
        index.cp.max_points_per_centroid = _TRAIN_POINTS_PER_LIST  # no second, unseeded subsampling
        sample_size = min(n, nlist * _TRAIN_POINTS_PER_LIST)
        sample = np.random.default_rng(self._seed).choice(n, size=sample_size, replace=False)
        index.train(np.ascontiguousarray(data[torch.from_numpy(np.sort(sample))].float().numpy()))
        self._quantizer = quantizer  # the IVF index only borrows it
        self._index = index
        self.nprobe = self._nprobe

    def add(self, features: torch.Tensor) -> None:
        data = features.cpu().contiguous()
        if self._index is None:
            if not data.shape[0]:
                raise ValueError("an IVF index needs at least one row; use the exact or faiss-flat backend")
            self._train(data)
        for start in range(0, data.shape[0], _MIN_BLOCK_ROWS):
            self._index.add(np.ascontiguousarray(data[start:start + _MIN_BLOCK_ROWS].float().numpy()))
        self.features = _append(self.features, data)
