#!/usr/bin/env python
"""The GPU pretraining benchmark: the paper configuration at batch 64, reference path against fast path.

Prepared to run once, unattended, on one NVIDIA GPU (about 10 minutes on an H100/H200, most of it
compilation and the reference path's steps). Each configuration runs in its own process, one after the
other, through benchmarks/pretrain_step.py:

  reference   fp32, eager, attention as separate score/softmax/dropout/product kernels (SDPA's math
              backend, as the authors' code computes it), the reference execution (ReferencePretraining),
              per-tensor AdamW
  fast        bf16 autocast, SDPA's fused (flash) attention, simla's execution, fused AdamW, regional
              torch.compile, and gradient checkpointing when --grad-checkpointing is given

For each: samples/s, seconds/step, peak memory (torch.cuda.max_memory_allocated) and MFU, the share of
the GPU's dense bf16 peak FLOP/s that the model FLOPs reach. Model FLOPs per sample are counted by
torch.utils.flop_counter on one eager step of the fast path's layout (forward + backward; recomputation
is not counted). Then the loader check: simla's pretraining loader (the model's views) through a
DataLoader with --loader-workers processes on the JPEGs of --loader-images (benchmarks/input_pipeline.py
writes them to runs/bench_jpegs; carry that folder to the GPU machine), against the fast path's samples/s:
does a step ever wait for data? Prints Markdown and writes everything as JSON (--output).

    python benchmarks/gpu_pretrain.py --output gpu_pretrain.json --loader-images runs/bench_jpegs
    python benchmarks/gpu_pretrain.py --device cpu --model simla_tiny --batch-size 4 --steps 1 --no-compile  # smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from simla.config import get_config  # noqa: E402
from simla.masking import BlockMaskGenerator  # noqa: E402
from pretrain_step import RunConfig, RunResult, _run_isolated, flops_per_sample  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets; the first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named `device_name`, or None when it is not in the table."""
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", default="simla_base", help="model preset (default simla_base, the paper's)")
    parser.add_argument("--batch-size", type=int, default=64, help="pairs per step per GPU (default 64)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (default 10)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed steps, compilation included (default 4)")
    parser.add_argument("--text-length", type=int, default=30, help="padded caption length (default 30)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="checkpoint the fast path's blocks")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="fast path without torch.compile")
    parser.add_argument("--skip-reference", action="store_true", help="run the fast path only")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu only for a smoke test")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the GPU's dense bf16 peak in TFLOP/s (default: looked up by device name)")
    parser.add_argument("--loader-images", type=Path, default=None,
                        help="JPEG folder for the loader check (e.g. runs/bench_jpegs from input_pipeline.py)")
    parser.add_argument("--loader-workers", type=int, default=None,
                        help="DataLoader workers for the loader check (default: all cores but one)")
    parser.add_argument("--output", type=Path, default=None, help="write the full results as JSON here")
    args = parser.parse_args(argv)
    if args.loader_images is not None and not sorted(args.loader_images.glob("*.jpg")):
        parser.error(f"--loader-images {args.loader_images}: no .jpg files (python benchmarks/input_pipeline.py "
                     "makes runs/bench_jpegs)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU is visible (use --device cpu --model simla_tiny for a smoke test)")
    if args.batch_size < 2 or args.steps < 1:
        parser.error("--batch-size must be >= 2 and --steps >= 1")
    if args.compile and args.warmup < 3:
        parser.error("--warmup must be >= 3 with compilation (the first steps compile)")
    return args


def loader_check(args: argparse.Namespace, gpu_samples_per_s: float) -> dict:
    """simla's pretraining loader with the given worker count against the GPU's training rate."""
    from input_pipeline import _tokenizer, loader_samples_per_second

    workers = args.loader_workers or max(1, (os.cpu_count() or 2) - 1)
    paths = sorted(args.loader_images.glob("*.jpg"))
    config = get_config(args.model)
    o = config.objectives
    masker = BlockMaskGenerator(config.grid_size, o.mim_num_masked, o.mim_min_block, min_aspect=o.mim_min_aspect)
    rate = loader_samples_per_second(paths, _tokenizer(None), args.batch_size, workers, batches=max(8, 2 * workers),
                                     image_size=config.vision.image_size, masker=masker)
    return {"workers": workers, "samples_per_s": rate, "gpu_samples_per_s": gpu_samples_per_s,
            "keeps_up": rate >= gpu_samples_per_s, "workers_needed": math.ceil(gpu_samples_per_s / (rate / workers))}


def _row(name: str, result: RunResult, flops: float, peak: float | None) -> dict:
    achieved = result.samples_per_s * flops
    return {"path": name, "samples_per_s": result.samples_per_s, "s_per_step": result.s_per_step,
            "peak_memory_gib": result.peak_memory_mib / 1024, "achieved_tflops": achieved / 1e12,
            "mfu": achieved / (peak * 1e12) if peak else None, "final_loss": result.final_loss,
            "config": dataclasses.asdict(result.config)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(device_name) if args.device == "cuda" else None)
    common = dict(model=args.model, batch_size=args.batch_size, device=args.device, steps=args.steps,
                  text_length=args.text_length, queue_size=None, seed=0)
    fast = RunConfig(precision="bf16", grad_checkpointing=args.grad_checkpointing, path="fast", cpu_allocator="auto",
                     compile=args.compile, warmup=args.warmup, **common)
    reference = RunConfig(precision="fp32", grad_checkpointing=False, path="reference", compile=False,
                          cpu_allocator="system",
                          warmup=min(args.warmup, 2), **common)
    flops = flops_per_sample(dataclasses.replace(fast, batch_size=min(args.batch_size, 8)))
    print(f"{args.model} on {device_name}: {flops / 1e12:.3f} TFLOP per sample per step (forward + backward); "
          f"bf16 peak {peak if peak else 'unknown'} TFLOP/s", flush=True)
    rows = []
    if not args.skip_reference:
        rows.append(_row("reference", _run_isolated(reference, None), flops, peak))
    rows.append(_row("fast", _run_isolated(fast, None), flops, peak))

    print("\n| path | samples/s | s/step | peak memory | TFLOP/s | MFU |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['path']} | {r['samples_per_s']:.1f} | {r['s_per_step']:.3f} | {r['peak_memory_gib']:.1f} GiB "
              f"| {r['achieved_tflops']:.1f} | {mfu} |")
    report = {"device": device_name, "torch": torch.__version__, "batch_size": args.batch_size,
              "flops_per_sample": flops, "peak_bf16_tflops": peak, "rows": rows}
    if len(rows) == 2:
        report["speedup"] = rows[1]["samples_per_s"] / rows[0]["samples_per_s"]
        print(f"\nfast / reference: {report['speedup']:.2f}x samples/s, "
              f"{rows[1]['peak_memory_gib'] / rows[0]['peak_memory_gib']:.2f}x peak memory")
    if args.loader_images is not None:
        report["loader"] = loader = loader_check(args, rows[-1]["samples_per_s"])
        verdict = "never waits for data" if loader["keeps_up"] else "waits for data"
        print(f"\nloader: {loader['samples_per_s']:.0f} samples/s with {loader['workers']} workers "
              f"({loader['samples_per_s'] / loader['workers']:.1f} per worker) against {loader['gpu_samples_per_s']:.0f} "
              f"samples/s trained: the GPU {verdict} (at least {loader['workers_needed']} workers needed)")
    if args.output is not None:
        args.output.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
