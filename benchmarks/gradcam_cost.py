"""What a Grad-CAM explanation costs: `simla.explain.gradcam` against the plain ITM score of the same pairs.

Both run in one process on the same synthetic pixels and texts (random weights: the cost does not depend
on them), so the ratio is comparable across machines; the absolute times are this machine's.
Run: python benchmarks/gradcam_cost.py --model simla_base --image-size 384 --batch 1 8
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import simla
from simla.explain import gradcam

TEXT = "a man in a red shirt throwing a frisbee to a brown dog on the grass"


def _best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simla_base", help="preset (simla_base is the paper model)")
    parser.add_argument("--image-size", type=int, default=384, help="resolution (the paper's grounding: 384)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="pairs per call")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (the best is kept)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = simla.create_model(args.model, task="base", image_size=args.image_size).eval()
    rows = []
    for batch in args.batch:
        pixels = torch.randn(batch, 3, args.image_size, args.image_size)
        texts = [TEXT] * batch
        gradcam(model, pixels, texts)  # warm-up

        def score() -> None:
            with torch.no_grad():
                model.itm_score(pixels, texts)

        explain_s = _best_of(args.repeats, lambda: gradcam(model, pixels, texts))
        score_s = _best_of(args.repeats, score)
        rows.append({"batch": batch, "gradcam_s_per_pair": round(explain_s / batch, 3),
                     "itm_score_s_per_pair": round(score_s / batch, 3), "ratio": round(explain_s / score_s, 2)})
    print(json.dumps({"model": args.model, "image_size": args.image_size, "threads": torch.get_num_threads(),
                      "words": len(TEXT.split()), "results": rows}, indent=2))


if __name__ == "__main__":
    main()
