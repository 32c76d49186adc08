"""`simla demo search`: index the easy-VQA test images with the demo model and search them by class.

The labelled easy-VQA test images (888 of 1,000) are indexed, with their captions, by the model `simla demo`
pretrains (`--from DIR`, or pretrained first). Each of the 24 classes is then queried by its caption ("a
red circle"); a hit is relevant when its image is of that class. The report gives the precision@10 of
every query ranked by ITC alone and with the top candidates re-ranked by the ITM head, the time per
query of each, and an HTML results page (with the Grad-CAM overlay of the query over every hit).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..search import Index
from ..search.html import render_results_page
from .common import checkpoint_of, pretrained_demo, write_report
from .easy_vqa import COLOURS, SHAPES, label_easy_vqa, write_retrieval_json


K = 10
RERANK = {"full": 50, "quick": 20}
EXAMPLE_QUERY = "a red circle"


def _precision(index: Any, label_of: dict[str, str], query: str, rerank: int) -> tuple[float, float]:
    started = time.perf_counter()
    hits = index.search(query, k=K, rerank=rerank)
    seconds = time.perf_counter() - started
    return sum(label_of[hit.key] == query.removeprefix("a ") for hit in hits) / K, seconds


def class_query_precision(index: Any, label_of: dict[str, str], rerank: int) -> tuple[list[dict], dict[str, float]]:
    """Precision@10 of the 24 class queries ("a red circle") by ITC and with ITM re-ranking: (rows, means).

    ``label_of`` maps an indexed image's key to its class ("red circle")."""
    rows = []
    for colour in COLOURS:
        for shape in SHAPES:
            query = f"a {colour} {shape}"
            itc, itc_seconds = _precision(index, label_of, query, 0)
            itm, itm_seconds = _precision(index, label_of, query, rerank)
            rows.append({"query": query, "relevant": sum(v == query[2:] for v in label_of.values()),
                         "itc": itc, "itm": itm, "itc_ms": 1000 * itc_seconds, "itm_ms": 1000 * itm_seconds})
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in ("itc", "itm", "itc_ms", "itm_ms")}
    return rows, mean


def run_search_demo(output: str | Path = "runs/demo_search", *, quick: bool = False, steps: int | None = None,
                    source: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Index, query, write report.json, report.md and results.html; returns the report dict."""
    if steps is not None:
        raise ConfigError("the search demo trains nothing; --steps belongs to the other demos")
    mode = "quick" if quick else "full"
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = checkpoint_of(pretrained_demo(source, out, quick, seed))

    items, _ = label_easy_vqa("test")
    annotations = write_retrieval_json(items, out / "test.json", seed=seed)
    label_of = {str(Path(item.image).resolve()): f"{item.colour} {item.shape}" for item in items}
    index_dir = out / "index"
    if (index_dir / "manifest.sqlite").exists():  # a previous run's index: bring it up to date
        index = Index.open(index_dir, checkpoint=checkpoint)
        summary = index.update(num_workers=0, progress=False)
    else:
        # The images live in the easy-VQA package, not beside test.json: that folder is the source's root, the
        # only place the index may read from.
        image_root = os.path.commonpath([item.image for item in items])
        index = Index.build(annotations, index_dir, checkpoint=checkpoint, image_root=image_root, num_workers=0,
                            progress=False)
        summary = index.last_summary

    rerank = RERANK[mode]
    rows, mean = class_query_precision(index, label_of, rerank)

    hits = index.search(EXAMPLE_QUERY, k=K, rerank=rerank)
    overlays = index.explain(EXAMPLE_QUERY, [hit.item_id for hit in hits])
    page = render_results_page({"text": EXAMPLE_QUERY, "k": K, "rerank": rerank}, hits,
                               lambda hit: index.thumbnail(hit.item_id), overlays, title="simla demo search")
    (out / "results.html").write_text(page, encoding="utf-8")

    report: dict[str, Any] = {
        "mode": mode, "k": K, "rerank": rerank, "images": len(index), "index_errors": summary.errors,
        "indexing_images_per_second": round(summary.images_per_second, 1), "queries": rows,
        "precision_itc": mean["itc"], "precision_itm": mean["itm"],
        "query_ms_itc": round(mean["itc_ms"], 1), "query_ms_itm": round(mean["itm_ms"], 1),
        "pretrained_checkpoint": str(checkpoint), "index": str(index_dir),
        "seconds": round(time.perf_counter() - started, 1),
    }
    table = "\n".join([f"| query | relevant images | P@{K} ITC | P@{K} ITM re-rank {rerank} |", "|---|---:|---:|---:|"]
                      + [f"| {r['query']} | {r['relevant']} | {r['itc']:.2f} | {r['itm']:.2f} |" for r in rows]
                      + [f"| **mean of {len(rows)}** | | **{mean['itc']:.3f}** | **{mean['itm']:.3f}** |"])
    report["summary"] = "\n".join([
        f"simla demo search ({mode}): {len(index)} easy-VQA test images indexed "
        f"({report['indexing_images_per_second']} images/s), 24 class queries",
        f"precision@{K}: {mean['itc']:.3f} by ITC alone, {mean['itm']:.3f} with the top {rerank} re-ranked by ITM",
        f"time per query: {mean['itc_ms']:.1f} ms (ITC), {mean['itm_ms']:.1f} ms (with re-ranking)",
        f"search it yourself: simla search {index_dir} \"a blue triangle\" --rerank {rerank}",
        f"results page: {out / 'results.html'}; time: {report['seconds']} s",
    ])
    write_report(out, report, "simla demo search", f"{table}\n\n[results for \"{EXAMPLE_QUERY}\"](results.html)")
    index.close()
    return report
