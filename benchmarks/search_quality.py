"""Precision@k of `simla search` on a real collection: the easy-VQA test images, queried by class.

Every labelled easy-VQA test image (888 of 1,000; see `simla.demos.easy_vqa`) is indexed with the given
checkpoint; each of the 24 classes is queried with its caption ("a red circle") and a hit counts when its
image is of that class. Reported per class and on average, for ITC alone and with ITM re-ranking of the
top R candidates, with the time per query of each.

Run (after `simla demo`, whose pretrained model is the demo checkpoint):
    python benchmarks/search_quality.py --checkpoint runs/demo/pretrain/checkpoints/last.pt --rerank 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from simla.demos.easy_vqa import COLOURS, SHAPES, label_easy_vqa, write_retrieval_json
from simla.search import Index


def _precision(index: Index, label_of: dict[str, str], query: str, k: int, rerank: int) -> tuple[float, float]:
    started = time.perf_counter()
    hits = index.search(query, k=k, rerank=rerank, dedup=None)
    seconds = time.perf_counter() - started
    wanted = query.removeprefix("a ")
    return sum(label_of[hit.key] == wanted for hit in hits) / k, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="the model to index and query with")
    parser.add_argument("--workdir", default="runs/search_quality", help="where the index is built")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank", type=int, default=50, help="ITC candidates re-scored by ITM")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    items, _ = label_easy_vqa("test")
    annotations = write_retrieval_json(items, workdir / "test.json")
    label_of = {str(Path(item.image).resolve()): f"{item.colour} {item.shape}" for item in items}
    index_dir = workdir / "index"
    if (index_dir / "manifest.sqlite").exists():
        index = Index.open(index_dir)
        index.update(progress=False)
    else:
        index = Index.build(annotations, index_dir, checkpoint=args.checkpoint, progress=False)
    print(f"{len(index)} images indexed; {index.info()['errors']} errors")

    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            query = f"a {colour} {shape}"
            plain, plain_s = _precision(index, label_of, query, args.k, 0)
            reranked, rerank_s = _precision(index, label_of, query, args.k, args.rerank)
            rows.append({"query": query, "relevant": sum(v == f"{colour} {shape}" for v in label_of.values()),
                         "itc": plain, "itm": reranked, "itc_seconds": plain_s, "itm_seconds": rerank_s})
    print(f"| query | relevant images | P@{args.k} ITC | P@{args.k} ITM re-rank {args.rerank} |")
    print("|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['query']} | {row['relevant']} | {row['itc']:.2f} | {row['itm']:.2f} |")
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in ("itc", "itm", "itc_seconds", "itm_seconds")}
    print(f"| **mean of {len(rows)}** | | **{mean['itc']:.3f}** | **{mean['itm']:.3f}** |")
    print(f"time per query: ITC {1000 * mean['itc_seconds']:.1f} ms, with re-ranking "
          f"{1000 * mean['itm_seconds']:.1f} ms ({args.rerank} candidates)")
    if args.json:
        Path(args.json).write_text(json.dumps({"k": args.k, "rerank": args.rerank, "rows": rows, "mean": mean},
                                              indent=2))


if __name__ == "__main__":
    main()
