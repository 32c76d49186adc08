#!/usr/bin/env python
"""Time the nearest-neighbour stage of `simla search` (simla.search.vectors.VectorIndex) on synthetic features.

For each index size the script draws clustered unit vectors (stored as float16, like the real index), then
for each backend reports:

* build time: `VectorIndex(features, backend)`, i.e. the float16 -> float32 conversion and, for faiss,
  adding the rows (and training the IVF k-means);
* memory of the searchable structure: `VectorIndex.nbytes` (tensor bytes plus faiss lists and centroids)
  and the resident-set growth measured around the build (current RSS from /proc/self/statm, or psutil
  when installed), plus the peak RSS growth sampled while building;
* latency of one query at a time (median and p95 over `--queries` single-query searches, after warm-up);
* throughput of one batched search of `--batch` queries (queries/s, best of `--repeats`);
* recall@k and recall@10 against the exact search (1.0 for the exact backends up to ties).

The machine note includes the load average before and after the run: on a shared machine other
processes' CPU use shows up as latency outliers (p95) and slower builds.

The data: `N / --cluster-size` random unit centres; each item is its centre plus Gaussian noise of norm
about `--noise`, normalised, so items of one cluster have cosine about 1/(1+noise^2) and unrelated items
about 0. Queries are fresh draws from the same mixture (a caption lands near the images of its topic).

Examples:
    python benchmarks/search_query.py --sizes 10000 100000 --backends exact faiss
    python benchmarks/search_query.py --sizes 1000000 --backends exact faiss-flat faiss-ivf \\
        --nprobe 8 16 32 64 --json search.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from simla.search.vectors import DEFAULT_NPROBE, VectorIndex, faiss_available

from rss import RssSampler, current_rss_bytes  # benchmarks/rss.py


_MB = 1e6


@dataclass
class Result:
    size: int
    backend: str  # as requested: exact, faiss, faiss-flat, faiss-ivf
    backend_name: str  # as resolved by VectorIndex
    nprobe: int | None
    build_s: float
    structure_mb: float  # VectorIndex.nbytes
    rss_growth_mb: float | None  # resident set after the build minus before it
    peak_rss_growth_mb: float | None  # highest RSS sampled during the build minus before it
    single_median_ms: float
    single_p95_ms: float
    batch_queries_per_s: float
    recall_at_k: float
    recall_at_10: float | None  # the first 10 of the k rows against the true top 10 (k >= 10)


# ------------------------------------------------------------------------------------------- memory
# --------------------------------------------------------------------------------------------- data
def clustered_unit_vectors(n: int, dim: int, clusters: int, noise: float, generator: torch.Generator,
                           centres: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` float32 unit vectors around `clusters` unit centres (drawn unless given); returns (vectors, centres).

    Built in slices so a million 256-d rows never need more than one float32 copy at a time.
    """
    if centres is None:
        centres = torch.nn.functional.normalize(torch.randn(clusters, dim, generator=generator), dim=1)
    out = torch.empty(n, dim)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        assign = torch.randint(0, centres.shape[0], (stop - start,), generator=generator)
        points = centres[assign] + (noise / dim ** 0.5) * torch.randn(stop - start, dim, generator=generator)
        out[start:stop] = torch.nn.functional.normalize(points, dim=1)
    return out, centres


# ---------------------------------------------------------------------------------------------- run
def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean fraction of each query's true top-k rows that were found."""
    hits = [len(set(a) & set(b)) / max(1, len(b)) for a, b in zip(found.tolist(), truth.tolist())]
    return float(np.mean(hits))


def time_queries(index: VectorIndex, queries: torch.Tensor, k: int, batch: int, repeats: int,
                 warmup: int = 3) -> tuple[list[float], float]:
    """Per-query latencies (s) of single searches, and the best time (s) of one batched search."""
    for i in range(min(warmup, len(queries))):
        index.search(queries[i], k)
    singles = []
    for q in queries:
        start = time.perf_counter()
        index.search(q, k)
        singles.append(time.perf_counter() - start)
    batch_queries = queries[:batch]
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        index.search(batch_queries, k)
        best = min(best, time.perf_counter() - start)
    return singles, best


def bench_backend(features: np.ndarray, backend: str, queries: torch.Tensor, truth: torch.Tensor,
                  args: argparse.Namespace) -> list[Result]:
    """Build one index and measure it; an IVF index is measured once per requested nprobe."""
    gc.collect()
    before = current_rss_bytes()
    sampler = RssSampler()
    with sampler:
        start = time.perf_counter()
        index = VectorIndex(features, backend, seed=args.seed)
        build_s = time.perf_counter() - start
    after = current_rss_bytes()
    growth = None if before is None or after is None else (after - before) / _MB
    peak = None if before is None or not sampler.peak else (sampler.peak - before) / _MB
    probes: list[int | None] = list(args.nprobe) if index.nprobe is not None else [None]
    results = []
    for nprobe in probes:
        if nprobe is not None:
            index.nprobe = nprobe
        singles, batch_s = time_queries(index, queries, args.k, args.batch, args.repeats)
        _, rows = index.search(queries[:len(truth)], args.k)
        singles_ms = sorted(s * 1000 for s in singles)
        results.append(Result(
            size=len(features), backend=backend, backend_name=index.backend_name, nprobe=index.nprobe,
            build_s=build_s, structure_mb=index.nbytes / _MB, rss_growth_mb=growth, peak_rss_growth_mb=peak,
            single_median_ms=statistics.median(singles_ms),
            single_p95_ms=singles_ms[min(len(singles_ms) - 1, round(0.95 * (len(singles_ms) - 1)))],
            batch_queries_per_s=min(args.batch, len(queries)) / batch_s,
            recall_at_k=recall(rows, truth),
            recall_at_10=recall(rows[:, :10], truth[:, :10]) if args.k >= 10 else None,
        ))
        print(_row(results[-1]), file=sys.stderr, flush=True)
    del index
    gc.collect()
    return results


def run_size(size: int, args: argparse.Namespace) -> list[Result]:
    """Draw one collection of `size` rows and measure every backend on it against the same exact truth."""
    generator = torch.Generator().manual_seed(args.seed + size)
    clusters = max(1, size // args.cluster_size)
    data, centres = clustered_unit_vectors(size, args.dim, clusters, args.noise, generator)
    features = data.half().numpy()  # float16 on disk, as the real index stores it
    del data
    queries, _ = clustered_unit_vectors(max(args.queries, args.batch), args.dim, clusters, args.noise,
                                        generator, centres)
    # The truth for recall: exact search over the same float16 features, all queries in one batch.
    _, truth = VectorIndex(features, "exact").search(queries, args.k)
    gc.collect()
    results = []
    for backend in args.backends:
        results.extend(bench_backend(features, backend, queries, truth, args))
    return results


# ---------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time simla.search.vectors.VectorIndex on synthetic clustered unit vectors stored as float16: build "
            "time, memory, single-query latency, batched throughput and recall@k against the exact search."
        ),
        epilog=(
            "Backends: exact (chunked torch matmul), faiss (what the faiss backend picks for the size: flat "
            "below simla.search.vectors.FAISS_IVF_MIN_ROWS, IVF from it), faiss-flat and faiss-ivf (forced). "
            "Memory: structure = VectorIndex.nbytes; RSS growth is measured around the build."
        ),
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000],
                        help="index sizes N (default 10000 100000 1000000)")
    parser.add_argument("--dim", type=int, default=256, help="feature dimension (default 256, the ITC embedding)")
    parser.add_argument("--queries", type=int, default=100, help="single queries timed per backend (default 100)")
    parser.add_argument("--batch", type=int, default=100, help="queries in the batched search (default 100)")
    parser.add_argument("--repeats", type=int, default=3, help="batched searches timed, best kept (default 3)")
    parser.add_argument("--k", type=int, default=20, help="neighbours per query (default 20)")
    parser.add_argument("--backends", nargs="+", default=["exact", "faiss"],
                        choices=("exact", "faiss", "faiss-flat", "faiss-ivf"), help="default: exact faiss")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[DEFAULT_NPROBE],
                        help=f"IVF lists probed; several values sweep one built index (default {DEFAULT_NPROBE})")
    parser.add_argument("--cluster-size", type=int, default=1000, help="mean items per synthetic cluster (default 1000)")
    parser.add_argument("--noise", type=float, default=1.0,
                        help="norm of the noise around a cluster centre before normalising (default 1.0)")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss CPU threads (default: their choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the IVF training")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    for name in ("dim", "queries", "batch", "repeats", "k", "cluster_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if any(n < 1 for n in args.sizes) or any(p < 1 for p in args.nprobe):
        parser.error("--sizes and --nprobe must be >= 1")
    if any(b.startswith("faiss") for b in args.backends) and not faiss_available():
        parser.error('the faiss backends need faiss-cpu: pip install "simla[faiss]"')
    return args


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


_HEADER = ("| N | backend | build s | structure MB | RSS growth MB (peak) | single median ms | single p95 ms "
           "| batch queries/s | recall@k | recall@10 |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def _row(r: Result) -> str:
    name = r.backend_name + (f" nprobe {r.nprobe}" if r.nprobe is not None else "")
    return (f"| {r.size:,} | {name} | {r.build_s:.2f} | {r.structure_mb:.0f} | {_fmt(r.rss_growth_mb, '.0f')} "
            f"({_fmt(r.peak_rss_growth_mb, '.0f')}) | {r.single_median_ms:.2f} | {r.single_p95_ms:.2f} "
            f"| {r.batch_queries_per_s:,.0f} | {r.recall_at_k:.3f} | {_fmt(r.recall_at_10, '.3f')} |")


def _load_average() -> str | None:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        if faiss_available():
            import faiss

            faiss.omp_set_num_threads(args.threads)
    faiss_version = None
    if faiss_available():
        import faiss

        faiss_version = faiss.__version__
    meta: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss_version}",
        "dim": args.dim, "k": args.k, "queries": args.queries, "batch": args.batch,
        "cluster_size": args.cluster_size, "noise": args.noise, "seed": args.seed,
    }
    print(f"{meta['machine']}; dim {args.dim}, k {args.k}, {args.queries} single queries, batch {args.batch}, "
          f"clusters of ~{args.cluster_size} items, noise {args.noise}", file=sys.stderr, flush=True)
    meta["load_average_before"] = _load_average()
    results: list[Result] = []
    for size in args.sizes:
        results.extend(run_size(size, args))
    meta["load_average_after"] = _load_average()
    print(f"\n{meta['machine']}; load average {meta['load_average_before']} before, "
          f"{meta['load_average_after']} after; dim {args.dim}, k {args.k}, float16 features, "
          f"{args.queries} single queries, batch {args.batch}\n")
    print(_HEADER)
    for r in results:
        print(_row(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": [asdict(r) for r in results]}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
