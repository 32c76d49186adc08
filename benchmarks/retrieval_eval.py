"""Retrieval evaluation speed: ITC-only ranking vs ITC + batched ITM re-ranking, in one process.

A synthetic set (default 1k images, 5k captions) is embedded once; then the score matrices are computed
with `--itc-only` semantics and with ITM re-ranking of the top-k, and the wall times and their ratio are
reported. Run: python benchmarks/retrieval_eval.py --model simla_tiny --images 1000 --captions 5000 --k 16
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import simla
from simla.eval.metrics import retrieval_metrics
from simla.eval.retrieval import RetrievalFeatures, score_matrices


def synthetic_features(model, images: int, captions: int, length: int, batch: int) -> RetrievalFeatures:
    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    feats, tokens = [], []
    with torch.no_grad():
        for start in range(0, images, batch):
            n = min(batch, images - start)
            out = model.visual_encoder(torch.randn(n, 3, size, size, generator=g))
            tokens.append(out)
            feats.append(model.image_features(out))
        ids = torch.randint(1000, 5000, (captions, length), generator=g)
        ids[:, 0] = model.config.text.cls_token_id
        mask = torch.ones_like(ids)
        text = torch.cat([model.text_features(model.text_encoder(ids[s:s + 256], mask[s:s + 256]))
                          for s in range(0, captions, 256)])
    return RetrievalFeatures(torch.cat(feats), torch.cat(tokens), text, ids, mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simla_tiny", help="model preset")
    parser.add_argument("--images", type=int, default=1000, help="number of images")
    parser.add_argument("--captions", type=int, default=5000, help="number of captions (spread over the images)")
    parser.add_argument("--k", type=int, default=16, help="candidates re-scored by ITM per query")
    parser.add_argument("--text-length", type=int, default=20, help="tokens per caption")
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per ITM forward")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = simla.create_model(args.model, task="base").eval()
    start = time.perf_counter()
    features = synthetic_features(model, args.images, args.captions, args.text_length, 64)
    embed_s = time.perf_counter() - start
    txt2img = [i % args.images for i in range(args.captions)]
    img2txt = [[t for t in range(i, args.captions, args.images)] for i in range(args.images)]
    timings = {}
    with torch.no_grad():
        for name, itc_only in (("itc_only", True), ("itc_plus_itm", False)):
            start = time.perf_counter()
            i2t, t2i = score_matrices(model, features, k=args.k, itc_only=itc_only, batch_size=args.batch_size)
            retrieval_metrics(i2t, t2i, txt2img, img2txt)
            timings[name] = time.perf_counter() - start
    report = {"model": args.model, "images": args.images, "captions": args.captions, "k": args.k,
              "threads": torch.get_num_threads(), "embedding_s": round(embed_s, 2),
              "itc_only_s": round(timings["itc_only"], 2), "itc_plus_itm_s": round(timings["itc_plus_itm"], 2),
              "itm_pairs": args.k * (args.images + args.captions),
              "ratio_itm_vs_itc_only": round(timings["itc_plus_itm"] / max(timings["itc_only"], 1e-9), 1)}
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
