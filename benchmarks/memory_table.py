#!/usr/bin/env python
"""Peak memory of a pretraining step by batch size, with and without gradient checkpointing and bf16.

Every cell is one configuration of benchmarks/pretrain_step.py run in its own fresh process (on CPU a
process's RSS does not shrink back after a configuration, so configurations never share one). Prints a
Markdown table of peak memory and seconds per step, ready for the README:

    python benchmarks/memory_table.py --model simla_base --batch-sizes 2 4 8
    # the same cells under tcmalloc (simla's cpu_allocator=tcmalloc)
    python benchmarks/memory_table.py --model simla_base --precisions fp32 --cpu-allocator tcmalloc
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_step import RunConfig, _run_isolated  # noqa: E402

from simla.train.cpu_allocator import CPU_ALLOCATOR_POLICIES, PRELOADED_ALLOCATORS, find_allocator_library  # noqa: E402

VARIANTS = (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="simla_base", help="model preset (default simla_base)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8], help="default 2 4 8")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per cell (default 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per cell (default 1)")
    parser.add_argument("--text-length", type=int, default=20, help="padded caption length (default 20)")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATOR_POLICIES, default="auto",
                        help="CPU malloc policy of every cell (simla.train.cpu_allocator; default auto)")
    parser.add_argument("--output", type=Path, default=None, help="also write the cells as JSON here")
    args = parser.parse_args(argv)
    if args.cpu_allocator in PRELOADED_ALLOCATORS and find_allocator_library(args.cpu_allocator) is None:
        parser.error(f"--cpu-allocator {args.cpu_allocator}: the {args.cpu_allocator} library is not installed here")
    if min(args.batch_sizes) < 2:
        parser.error("batch sizes must be >= 2 (ITM draws in-batch negatives)")

    cells = []
    print("| batch | " + " | ".join(f"{p}{' + checkpointing' if c else ''}" for p, c in VARIANTS
                                    if p in args.precisions) + " |")
    print("|---:|" + "---:|" * sum(p in args.precisions for p, _ in VARIANTS))
    for batch_size in args.batch_sizes:
        row = []
        for precision, checkpointing in VARIANTS:
            if precision not in args.precisions:
                continue
            cfg = RunConfig(model=args.model, batch_size=batch_size, precision=precision, device=args.device,
                            steps=args.steps, warmup=args.warmup, grad_checkpointing=checkpointing, path="fast",
                            cpu_allocator=args.cpu_allocator,
                            compile=False, text_length=args.text_length, queue_size=None, seed=0)
            result = _run_isolated(cfg, None)
            cells.append({"batch_size": batch_size, "precision": precision, "grad_checkpointing": checkpointing,
                          "cpu_allocator": args.cpu_allocator, "malloc": result.malloc,
                          "peak_memory_mib": result.peak_memory_mib, "memory_kind": result.memory_kind,
                          "s_per_step": result.s_per_step})
            row.append(f"{result.peak_memory_mib / 1024:.1f} GiB ({result.s_per_step:.1f} s)")
        print(f"| {batch_size} | " + " | ".join(row) + " |", flush=True)
    if args.output is not None:
        args.output.write_text(json.dumps(cells, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
