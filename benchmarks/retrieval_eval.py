"""Retrieval evaluation speed: the ITM re-ranking of the top-k, three ways, in one process on the same features.

- reference: the authors' loop, one query at a time (an image query scores its k texts in one forward,
  a text query its k images), every pair recomputing its image's cross-attention keys and values;
- batched: simla's previous method, the same pairs in fixed-size batches that span queries;
- grouped: simla's default, every distinct pair of both directions once, grouped by image with the
  image's keys and values computed once and each chunk of texts cut to its longest caption.

Synthetic images and captions (random weights: the cost does not depend on them); captions have COCO-like
lengths (8-20 tokens) padded to 30 as the evaluation tokenises them. Scores of the three are compared.
Run: python benchmarks/retrieval_eval.py --model simla_base --image-size 384 --images 40 --captions 200 --k 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import simla
from simla.eval.rerank import topk_candidates
from simla.eval.retrieval import RetrievalFeatures, score_matrices

PADDED_LENGTH = 30


def synthetic_features(model, images: int, captions: int, batch: int) -> RetrievalFeatures:
    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    feats, tokens = [], []
    with torch.no_grad():
        for start in range(0, images, batch):
            n = min(batch, images - start)
            out = model.visual_encoder(torch.randn(n, 3, size, size, generator=g))
            tokens.append(out)
            feats.append(model.image_features(out))
        ids = torch.randint(1000, 5000, (captions, PADDED_LENGTH), generator=g)
        ids[:, 0] = model.config.text.cls_token_id
        lengths = torch.randint(8, 21, (captions,), generator=g)
        mask = (torch.arange(PADDED_LENGTH)[None] < lengths[:, None]).long()
        ids = ids * mask
        text = torch.cat([model.text_features(model.text_encoder(ids[s:s + 256], mask[s:s + 256]))
                          for s in range(0, captions, 256)])
    return RetrievalFeatures(torch.cat(feats), torch.cat(tokens), text, ids, mask)


@torch.no_grad()
def reference_loop(model, f: RetrievalFeatures, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One query at a time, as the authors' evaluation does."""
    sim = f.image_feat @ f.text_feat.t()
    i2t = torch.full_like(sim, -100.0)
    for i, texts in enumerate(topk_candidates(sim, k)):
        n = texts.numel()
        i2t[i, texts] = model.itm_logits(f.image_tokens[i:i + 1].repeat(n, 1, 1), f.text_ids[texts],
                                         f.text_mask[texts])[:, 1]
    t2i = torch.full_like(sim.t(), -100.0)
    for t, images in enumerate(topk_candidates(sim.t(), k)):
        n = images.numel()
        t2i[t, images] = model.itm_logits(f.image_tokens[images], f.text_ids[t:t + 1].repeat(n, 1),
                                          f.text_mask[t:t + 1].repeat(n, 1))[:, 1]
    return i2t, t2i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simla_tiny", help="model preset")
    parser.add_argument("--image-size", type=int, help="resolution (default: the preset's; paper evaluation: 384)")
    parser.add_argument("--images", type=int, default=200, help="number of images")
    parser.add_argument("--captions", type=int, default=1000, help="number of captions")
    parser.add_argument("--k", type=int, default=16, help="candidates re-scored by ITM per query")
    parser.add_argument("--batch-size", type=int, default=128, help="pairs per ITM forward (batched method)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    overrides = {"image_size": args.image_size} if args.image_size else {}
    model = simla.create_model(args.model, task="base", **overrides).eval()
    start = time.perf_counter()
    features = synthetic_features(model, args.images, args.captions, 16)
    embed_s = time.perf_counter() - start

    timings, results = {}, {}
    runs = (("reference", lambda: reference_loop(model, features, args.k)),
            ("batched", lambda: score_matrices(model, features, k=args.k, batch_size=args.batch_size,
                                               method="batched")),
            ("grouped", lambda: score_matrices(model, features, k=args.k)))
    for name, run in runs:
        start = time.perf_counter()
        results[name] = run()
        timings[name] = time.perf_counter() - start
    reference = results["reference"]
    report = {
        "model": args.model, "image_size": model.config.vision.image_size, "images": args.images,
        "captions": args.captions, "k": args.k, "threads": torch.get_num_threads(), "embedding_s": round(embed_s, 1),
        "pairs_per_direction_total": args.k * (args.images + args.captions),
        **{f"{name}_s": round(seconds, 2) for name, seconds in timings.items()},
        **{f"speedup_{name}_vs_reference": round(timings["reference"] / timings[name], 2)
           for name in ("batched", "grouped")},
        **{f"max_abs_diff_{name}": max(float((a - b).abs().max()) for a, b in zip(results[name], reference))
           for name in ("batched", "grouped")},
    }
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
