#!/usr/bin/env python
"""NLVR2 training step time against the retrieval model's, in the same process (a ratio, not a timing).

The NLVR2 encoder is one and a half times deeper (18 layers for the paper model) and reads two images per
example, so a step costs more than a retrieval fine-tuning step at the same batch. One step = forward
(momentum distillation included, alpha 0.4) + backward + AdamW step + zero_grad on a synthetic batch built
once; the two models alternate so that background load affects both alike.

Example (the paper model at 384 px, batch 2, on CPU):
    python benchmarks/nlvr_step.py --model simla_base --image-size 384 --batch-size 2 --steps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import simla
from simla.factory import build_model
from simla.train.optim import build_optimizer


def make_batch(config, batch_size: int, length: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    size = config.vision.image_size
    ids = torch.randint(1000, 5000, (batch_size, length), generator=generator)
    ids[:, 0] = config.text.cls_token_id
    return {
        "image": torch.randn(batch_size, 3, size, size, generator=generator),
        "image0": torch.randn(batch_size, 3, size, size, generator=generator),
        "image1": torch.randn(batch_size, 3, size, size, generator=generator),
        "text_ids": ids, "text_mask": torch.ones_like(ids),
        "image_id": torch.arange(batch_size), "label": torch.arange(batch_size) % 2,
    }


def step_seconds(model, optimizer, batch) -> float:
    started = time.perf_counter()
    loss = sum(model(batch, alpha=0.4).values())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simla_tiny", help="preset (simla_base = the paper model)")
    parser.add_argument("--image-size", type=int, default=None, help="resolution (paper fine-tuning: 384)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--text-length", type=int, default=20)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model (after one warm-up step)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args()

    overrides = {"vision.use_mask_token": False, "queue_size": 256}
    if args.image_size:
        overrides["vision.image_size"] = args.image_size
    generator = torch.Generator().manual_seed(0)
    runs = {}
    for task in ("retrieval", "nlvr"):
        model = build_model(simla.get_config(args.model, **overrides), task).train()
        runs[task] = {"model": model, "optimizer": build_optimizer(model, lr=1e-5, weight_decay=0.02), "times": [],
                      "layers": len(model.text_encoder.layers)}
    batch = make_batch(runs["nlvr"]["model"].config, args.batch_size, args.text_length, generator)
    for run in runs.values():
        step_seconds(run["model"], run["optimizer"], batch)  # warm-up
    for _ in range(args.steps):
        for run in runs.values():  # alternate, so that background load affects both alike
            run["times"].append(step_seconds(run["model"], run["optimizer"], batch))
    result = {task: {"encoder_layers": run["layers"], "median_step_s": round(statistics.median(run["times"]), 3)}
              for task, run in runs.items()}
    result["nlvr_over_retrieval"] = round(result["nlvr"]["median_step_s"] / result["retrieval"]["median_step_s"], 2)
    result["setting"] = {"model": args.model, "image_size": runs["nlvr"]["model"].config.vision.image_size,
                         "batch_size": args.batch_size, "threads": torch.get_num_threads()}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model} at {result['setting']['image_size']} px, batch {args.batch_size}:")
    for task in ("retrieval", "nlvr"):
        print(f"  {task:<9} {result[task]['encoder_layers']:>2} encoder layers  {result[task]['median_step_s']:.3f} s/step")
    print(f"  NLVR2 step / retrieval step: {result['nlvr_over_retrieval']}x")


if __name__ == "__main__":
    main()
