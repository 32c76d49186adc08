"""Nearest-neighbour stage of ``simla search``: top-k inner products over stored ITC features.

The index stores one L2-normalised ITC feature per item, so the inner product of a query with a row is
their cosine similarity. :class:`VectorIndex` answers "which k rows score highest for this query" with
one of two backends:

``exact``
    A chunked matrix product in torch. Rows are scored in blocks and a running top-k is merged after each
    block, so memory stays bounded (about ``_SCORE_BUDGET`` float32 scores, 64 MiB, however many queries
    and rows there are) and a (Q, N) score matrix is never built. Results are exact and deterministic:
    higher score first and, among equal scores, the lower row first. The features are held as one float32
    tensor: 4*N*D bytes (1 GiB for a million 256-d features), twice the float16 features stored on disk.

``faiss`` (optional ``faiss-cpu``, ``pip install "simla[faiss]"``)
    Below ``FAISS_IVF_MIN_ROWS`` rows an exact ``IndexFlatIP`` (backend name ``faiss-flat``): same answers
    as ``exact`` up to float rounding, sharing its float32 storage with the torch copy (4*N*D bytes in
    all). It measured slower than ``exact`` at every size (e.g. 77 ms vs 44 ms per query at 1M rows), so
    ``auto`` never picks it; it is there for an explicit ``backend="faiss"`` on a small collection.
    From ``FAISS_IVF_MIN_ROWS`` rows an inverted file (``IndexIVFFlat``, no compression, backend name
    ``faiss-ivf<nlist>``) with nlist = 4*sqrt(N) spherical k-means centroids (unit-norm, which is the
    right partition for cosine), trained on a seeded random sample of ``_TRAIN_POINTS_PER_LIST`` rows
    per list. A query scans only the ``nprobe`` lists whose centroids are closest, so it is
    approximate: see ``DEFAULT_NPROBE`` for the measured recall. The inverted lists hold their own
    float32 copy of the features plus an int64 id per row (4*N*D + 8*N bytes); the features are also kept
    as given, float16 borrowed without a copy, for :meth:`VectorIndex.scores` and the exact fallback
    below, which upcast them block by block. Building is the expensive part: 90 s for 1M 256-d rows
    on 2 CPU cores (k-means training and assigning every row both cost ~N*nlist*D, so ~N**1.5).

    An IVF search can come back with fewer than k rows (the probed lists held too few, typically with a
    large k or many excluded rows); those queries are answered again by the exact search, so the result
    always has k' rows. Among equal scores faiss may pick any of the tied rows at the cut-off; the rows
    it returns are put in the same order as ``exact`` (score, then row).

``auto`` (the default) takes ``faiss`` when faiss is installed and N >= ``FAISS_AUTO_THRESHOLD``, else
``exact``.

Measured numbers come from ``benchmarks/search_query.py`` (2 CPU cores, 256-d float16 features, k=20).
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch

#: ``auto`` switches from ``exact`` to ``faiss`` (an IVF index) at this many rows, when faiss is installed.
#: Exact single-query latency is linear, ~44 ns per row on 2 cores: 2.6 ms at 100k rows, 44 ms at 1M,
#: 87 ms at 2M, 197 ms at 4M. IVF answers in ~1 ms at 1M but its build took 90 s there (the time of ~2,000
#: exact queries, paid on every load) and its recall depends on how clustered the features are. So the
#: exact search is kept while it stays under ~0.1 s per query, i.e. up to 2M rows; a long-lived process
#: serving many queries can pass ``backend="faiss"`` explicitly from ~1M rows.
FAISS_AUTO_THRESHOLD = 2_000_000

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

_BACKENDS = ("auto", "exact", "faiss", "faiss-flat", "faiss-ivf")
_FAISS_MISSING = 'the faiss search backend needs the optional faiss-cpu package: pip install "simla[faiss]"'


# ------------------------------------------------------------------------------------------ backends
def _import_faiss() -> Any:
    """Import faiss, or raise an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:
        from ..errors import MissingExtraError

        raise MissingExtraError(_FAISS_MISSING) from error
    return faiss


def faiss_available() -> bool:
    """Whether the optional faiss package can be imported."""
    try:
        _import_faiss()
    except ImportError:
        return False
    return True


def choose_backend(n: int) -> str:
    """The backend ``auto`` resolves to for ``n`` rows: ``"faiss"`` or ``"exact"``.

    faiss only from ``FAISS_AUTO_THRESHOLD`` rows and only when it is installed: below that the exact
    search is fast enough and needs no training.
    """
    return "faiss" if n >= FAISS_AUTO_THRESHOLD and faiss_available() else "exact"


def ivf_nlist(n: int) -> int:
    """IVF list count for ``n`` rows: about 4*sqrt(n), capped so each list gets enough training rows."""
    return max(1, min(round(4 * math.sqrt(n)), n // _TRAIN_POINTS_PER_LIST))


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


# ----------------------------------------------------------------------------------- exact top-k
def _canonical_order(vals: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of candidates by score descending and, among equal scores, by row ascending."""
    rows, perm = rows.sort(dim=1)
    vals = vals.gather(1, perm)
    vals, perm = vals.sort(dim=1, descending=True, stable=True)
    return vals, rows.gather(1, perm)


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _exact_search(features: torch.Tensor, queries: torch.Tensor, k: int,
                  exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
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
        backend_name: the resolved backend: ``"exact"``, ``"faiss-flat"`` or ``"faiss-ivf<nlist>"``.
    """

    def __init__(self, features: Any, backend: str = "auto", *, nprobe: int | None = None, seed: int = 0) -> None:
        if backend not in _BACKENDS:
            raise ValueError(f"unknown search backend {backend!r}; choose one of {', '.join(_BACKENDS)}")
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
        self._n = int(data.shape[0])
        self._faiss_index: Any = None
        if backend == "auto":
            backend = choose_backend(self._n)
        if backend == "faiss":
            backend = "faiss-ivf" if self._n >= FAISS_IVF_MIN_ROWS else "faiss-flat"
        if backend == "exact":
            self._features = data.float().contiguous()
            self.backend_name = "exact"
        elif backend == "faiss-flat":
            self._build_flat(data)
        else:
            self._build_ivf(data, nprobe or DEFAULT_NPROBE, seed)

    # ----------------------------------------------------------------------------- faiss building
    def _build_flat(self, data: torch.Tensor) -> None:
        """Exact faiss index; its float32 storage is shared with the torch copy instead of duplicated."""
        faiss = _import_faiss()
        index = faiss.IndexFlatIP(self.dim)
        if self._n:
            index.add(np.ascontiguousarray(data.cpu().float().numpy()))
            stored = faiss.rev_swig_ptr(index.get_xb(), self._n * self.dim)
            self._features = torch.from_numpy(stored).view(self._n, self.dim)
        else:
            self._features = data.cpu().float().contiguous()
        self._faiss_index = index
        self.backend_name = "faiss-flat"

    def _build_ivf(self, data: torch.Tensor, nprobe: int, seed: int) -> None:
        """Inverted file over spherical k-means lists, trained on a seeded sample of the rows.

        The lists hold their own float32 copy, so the features are kept as given (float16 stays
        float16, borrowed without a copy) for the exact fallback and :meth:`scores`, and are added in
        float32 slices so the build never holds a second full float32 copy.
        """
        faiss = _import_faiss()
        if self._n < 1:
            raise ValueError("an IVF index needs at least one row; use the exact or faiss-flat backend")
        self._features = data.cpu().contiguous()
        nlist = ivf_nlist(self._n)
        quantizer = faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.cp.spherical = True  # unit-norm centroids: the right partition for cosine similarity
        index.cp.max_points_per_centroid = _TRAIN_POINTS_PER_LIST  # no second, unseeded subsampling
        sample_size = min(self._n, nlist * _TRAIN_POINTS_PER_LIST)
        sample = np.random.default_rng(seed).choice(self._n, size=sample_size, replace=False)
        index.train(np.ascontiguousarray(self._features[torch.from_numpy(np.sort(sample))].float().numpy()))
        for start in range(0, self._n, _MIN_BLOCK_ROWS):
            index.add(np.ascontiguousarray(self._features[start:start + _MIN_BLOCK_ROWS].float().numpy()))
        self._quantizer = quantizer  # the IVF index only borrows it
        self._faiss_index = index
        self.backend_name = f"faiss-ivf{nlist}"
        self.nprobe = nprobe

    # ----------------------------------------------------------------------------------- queries
    @property
    def nprobe(self) -> int | None:
        """IVF lists scanned per query (``None`` for the exact backends); settable, capped at nlist."""
        index = self._faiss_index
        return int(index.nprobe) if index is not None and hasattr(index, "nprobe") else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.nprobe is None:
            raise ValueError(f"nprobe only applies to an IVF index, not to {self.backend_name!r}")
        if value < 1:
            raise ValueError(f"nprobe must be >= 1, got {value}")
        self._faiss_index.nprobe = min(int(value), int(self._faiss_index.nlist))

    def __len__(self) -> int:
        return self._n

    def rows(self, indices: Any) -> torch.Tensor:
        """The stored features of the given rows as float32, (len(indices), D) (e.g. to compare hits)."""
        return self._features[torch.as_tensor(indices, dtype=torch.long)].float()

    @property
    def nbytes(self) -> int:
        """Approximate bytes held by the searchable structure (features, lists, centroids)."""
        total = self._n * self.dim * self._features.element_size()
        if self.backend_name.startswith("faiss-ivf"):
            total += self._n * (self.dim * 4 + 8) + self._faiss_index.nlist * self.dim * 4
        return total

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
        q = self._queries(queries).to(self._features.device)
        out = torch.empty(q.shape[0], self._n, device=q.device)
        for start in range(0, self._n, _MIN_BLOCK_ROWS):
            block = self._features[start:start + _MIN_BLOCK_ROWS].float()
            out[:, start:start + block.shape[0]] = q @ block.T
        return out.cpu()

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
        mask = _as_mask(exclude, self._n)
        available = self._n - (0 if mask is None else int(mask.sum()))
        k = min(k, available)
        if k == 0 or q.shape[0] == 0:
            return torch.empty(q.shape[0], k), torch.empty(q.shape[0], k, dtype=torch.int64)
        if self._faiss_index is None:
            return _exact_search(self._features, q.to(self._features.device), k, mask)
        return self._faiss_search(q, k, mask)

    def _faiss_search(self, q: torch.Tensor, k: int,
                      mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _import_faiss()
        index = self._faiss_index
        ivf = self.nprobe is not None
        params = None
        if mask is not None:
            bitmap = np.packbits((~mask).numpy(), bitorder="little")
            selector = faiss.IDSelectorBitmap(bitmap)  # keeps a reference to bitmap
            params = (faiss.SearchParametersIVF(sel=selector, nprobe=self.nprobe) if ivf
                      else faiss.SearchParameters(sel=selector))
        matrix = np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32)
        distances, labels = index.search(matrix, k, params=params)
        vals, rows = _canonical_order(torch.from_numpy(distances), torch.from_numpy(labels))
        short = (rows < 0).any(dim=1)
        if bool(short.any()):  # the probed lists held fewer than k allowed rows: answer exactly
            vals[short], rows[short] = _exact_search(self._features, q[short], k, mask)
        return vals, rows

    def __repr__(self) -> str:
        probe = f", nprobe={self.nprobe}" if self.nprobe is not None else ""
        return f"VectorIndex(n={self._n}, dim={self.dim}, backend={self.backend_name!r}{probe})"
