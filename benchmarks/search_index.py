"""What indexing and ITM re-ranking cost: `simla index build` and `Index.search(rerank=R)` against naive loops.

Synthetic JPEG photos (320x240) and random weights (the cost does not depend on them); one process, so the
ratios are comparable across machines and the absolute figures are this machine's.

- indexing: images/s of `Index.build` (DataLoader workers, batches, fp32, bf16 or int8) against a baseline
  that reads, decodes and embeds one image at a time in the main process;
- re-ranking: seconds per candidate of `search(text, rerank=R)` beyond the ITC-only search, against a
  baseline that scores each candidate alone with `model.itm_score` (one image and the text per forward).

Run: python benchmarks/search_index.py --models simla_tiny simla_base --images 256 --rerank 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import simla
from simla.checkpoint import save_checkpoint
from simla.data.images import load_image
from simla.search import Index

QUERY = "a man in a red shirt throwing a frisbee to a brown dog on the grass"


def _photos(folder: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        base = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)  # smooth colour fields, like photos compress
        image = Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC)
        image.save(folder / f"{i:05d}.jpg", quality=90)


def _naive_images_per_second(model, folder: Path) -> float:
    paths = sorted(folder.glob("*.jpg"))
    started = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            model.encode_image(model.prepare_pixels([load_image(path)]))
    return len(paths) / (time.perf_counter() - started)


def _build_images_per_second(checkpoint: Path, folder: Path, work: Path, precision: str, workers: int,
                             batch_size: int) -> float:
    out = work / f"index-{precision}"
    shutil.rmtree(out, ignore_errors=True)
    index = Index.build(folder, out, checkpoint=checkpoint, batch_size=batch_size, num_workers=workers,
                        precision=precision, progress=False)
    return index.last_summary.images_per_second


def _rerank_seconds_per_candidate(index: Index, rerank: int, batch_size: int) -> tuple[float, float]:
    index.search(QUERY, k=rerank)  # warm: model, features
    started = time.perf_counter()
    index.search(QUERY, k=rerank)
    itc = time.perf_counter() - started
    started = time.perf_counter()
    hits = index.search(QUERY, k=rerank, rerank=rerank, batch_size=batch_size)
    batched = (time.perf_counter() - started - itc) / rerank
    model = index.model
    started = time.perf_counter()
    with torch.no_grad():
        for hit in hits:
            model.itm_score(model.prepare_pixels([index.load_image(hit.item_id)]), [QUERY])
    alone = (time.perf_counter() - started) / len(hits)
    return batched, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["simla_tiny", "simla_base"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--rerank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _photos(work / "photos", args.images)
        for name in args.models:
            torch.manual_seed(0)
            model = simla.create_model(name, task="base").eval()
            checkpoint = save_checkpoint(model, work / f"{name}.pt")
            naive = _naive_images_per_second(model, work / "photos")
            fp32 = _build_images_per_second(checkpoint, work / "photos", work, "fp32", args.workers, args.batch_size)
            bf16 = _build_images_per_second(checkpoint, work / "photos", work, "bf16", args.workers, args.batch_size)
            int8 = _build_images_per_second(checkpoint, work / "photos", work, "int8", args.workers, args.batch_size)
            index = Index.open(work / "index-fp32")
            batched, alone = _rerank_seconds_per_candidate(index, args.rerank, args.batch_size)
            index.close()
            index = Index.open(work / "index-int8")  # queries and re-ranking follow the index: int8
            batched_int8, _ = _rerank_seconds_per_candidate(index, args.rerank, args.batch_size)
            index.close()
            rows.append({"model": name, "image_size": model.config.vision.image_size, "naive_images_s": naive,
                         "build_fp32_images_s": fp32, "build_bf16_images_s": bf16, "build_int8_images_s": int8,
                         "rerank_ms_per_candidate": 1000 * batched, "one_pair_ms_per_candidate": 1000 * alone,
                         "rerank_int8_ms_per_candidate": 1000 * batched_int8})
            del model

    print(f"{args.images} images, {args.threads} threads, {args.workers} loader workers, batch {args.batch_size}")
    print("| model | build fp32 img/s | build int8 img/s | int8 / fp32 | re-rank fp32 ms/candidate | int8 | fp32 / int8 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} ({r['image_size']} px) | {r['build_fp32_images_s']:.1f} | {r['build_int8_images_s']:.1f} | "
              f"{r['build_int8_images_s'] / r['build_fp32_images_s']:.2f}x | {r['rerank_ms_per_candidate']:.1f} | "
              f"{r['rerank_int8_ms_per_candidate']:.1f} | "
              f"{r['rerank_ms_per_candidate'] / r['rerank_int8_ms_per_candidate']:.2f}x |")
    print()
    print("| model | naive loop img/s | build fp32 img/s | build bf16 img/s | re-rank ms/candidate (batched) "
          "| one pair at a time ms | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} ({r['image_size']} px) | {r['naive_images_s']:.1f} | {r['build_fp32_images_s']:.1f} "
              f"({r['build_fp32_images_s'] / r['naive_images_s']:.2f}x) | {r['build_bf16_images_s']:.1f} "
              f"({r['build_bf16_images_s'] / r['naive_images_s']:.2f}x) | {r['rerank_ms_per_candidate']:.1f} | "
              f"{r['one_pair_ms_per_candidate']:.1f} | "
              f"{r['one_pair_ms_per_candidate'] / r['rerank_ms_per_candidate']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
