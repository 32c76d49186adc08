#!/usr/bin/env python
"""Time full SIMLA pretraining steps on a synthetic batch: throughput and peak memory.

One step = forward (all five losses, momentum teachers and queues included) + total.backward() + AdamW
step (simla.train.optim.build_optimizer) + zero_grad, exactly what a training loop does per batch minus
data loading. The batch is built once on the device and reused, so the numbers measure the model only.

Examples:
    python benchmarks/pretrain_step.py --device cpu --precision bf16 --baseline-precision fp32
    python benchmarks/pretrain_step.py --model simla_base --batch-size 64 --device cuda --precision bf16 \\
        --grad-checkpointing --baseline-precision fp32 --json

Memory: on CUDA, `torch.cuda.max_memory_allocated` since the configuration's model was built (weights,
optimiser state, activations). On CPU, two figures: `peak_rss_mib` is the process-lifetime peak
(`getrusage` ru_maxrss), so it can only grow from one configuration to the next (that is why a baseline runs
FIRST); `sampled_peak_rss_mib` is the peak of the current RSS sampled every few milliseconds while that
configuration ran, which is per-configuration and is what the memory ratio uses on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import simla
from simla.masking import BlockMaskGenerator
from simla.train.optim import build_optimizer

from rss import MIB as _MIB  # benchmarks/rss.py
from rss import RssSampler, current_rss_bytes, lifetime_peak_rss_mib


@dataclass
class RunConfig:
    model: str
    batch_size: int
    precision: str
    device: str
    steps: int
    warmup: int
    grad_checkpointing: bool
    text_length: int
    queue_size: int | None
    seed: int


@dataclass
class RunResult:
    config: RunConfig
    samples_per_s: float
    s_per_step: float
    peak_memory_mib: float  # CUDA max allocated, or the sampled per-run RSS peak on CPU
    memory_kind: str
    peak_rss_mib: float | None  # CPU only: process-lifetime ru_maxrss at the end of this run
    start_rss_mib: float | None  # CPU only: current RSS before this configuration built its model
    final_loss: float
    parameters: int
    trainable_parameters: int


# ------------------------------------------------------------------------------------------- memory
# -------------------------------------------------------------------------------------------- batch
def synthetic_batch(model: simla.SimlaForPretraining, batch_size: int, length: int, device: torch.device,
                    seed: int) -> dict[str, torch.Tensor]:
    """A well-formed random pretraining batch: [CLS]-led captions with right padding, block MIM masks."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    size, grid = config.vision.image_size, config.grid_size
    ids = torch.randint(1000, config.text.vocab_size, (batch_size, length), generator=g)
    ids[:, 0] = config.text.cls_token_id
    lengths = torch.randint(max(2, length // 2), length + 1, (batch_size,), generator=g)
    lengths[0] = length  # the padded length is really `length`
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask  # [PAD] = 0
    o = config.objectives
    masker = BlockMaskGenerator(grid, o.mim_num_masked, o.mim_min_block, min_aspect=o.mim_min_aspect)
    rng = random.Random(seed)
    patch_mask = torch.stack([torch.from_numpy(masker(rng)).flatten() for _ in range(batch_size)])
    batch = {
        "image": torch.randn(batch_size, 3, size, size, generator=g),
        "text_ids": ids,
        "text_mask": mask,
        "patch_mask": patch_mask,
        "visual_tokens": torch.randint(0, o.visual_vocab_size, (batch_size, grid * grid), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------- run
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run(cfg: RunConfig) -> RunResult:
    """Build the model and optimiser for `cfg`, warm up, then time `cfg.steps` full training steps."""
    device = torch.device(cfg.device)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(cfg.seed)
    overrides: dict[str, Any] = {} if cfg.queue_size is None else {"queue_size": cfg.queue_size}

    start_rss = current_rss_bytes() if device.type == "cpu" else None
    sampler = RssSampler()
    with sampler if device.type == "cpu" else contextlib.nullcontext():
        model = simla.create_model(cfg.model, **overrides).to(device)
        if not isinstance(model, simla.SimlaForPretraining):
            raise TypeError(f"{cfg.model} did not build a pretraining model")
        model.train()
        if cfg.grad_checkpointing:
            model.visual_encoder.set_grad_checkpointing(True)
            model.text_encoder.set_grad_checkpointing(True)
        optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.02)
        batch = synthetic_batch(model, cfg.batch_size, cfg.text_length, device, cfg.seed)
        alpha = model.config.objectives.alpha

        def step() -> torch.Tensor:
            with _autocast(device, cfg.precision):
                total = model(batch, alpha=alpha).total
            total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return total.detach()

        for _ in range(cfg.warmup):
            step()
        _sync(device)  # the timer must not start while warm-up kernels are still queued
        start = time.perf_counter()
        for _ in range(cfg.steps):
            loss = step()
        _sync(device)
        elapsed = time.perf_counter() - start

    if device.type == "cuda":
        peak, kind, lifetime = torch.cuda.max_memory_allocated(device) / _MIB, "cuda_max_allocated", None
    else:
        peak, kind, lifetime = sampler.peak / _MIB, "cpu_sampled_rss", lifetime_peak_rss_mib()
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = RunResult(
        config=cfg,
        samples_per_s=cfg.batch_size * cfg.steps / elapsed,
        s_per_step=elapsed / cfg.steps,
        peak_memory_mib=peak,
        memory_kind=kind,
        peak_rss_mib=lifetime,
        start_rss_mib=None if start_rss is None else start_rss / _MIB,
        final_loss=float(loss.float().item()),
        parameters=parameters,
        trainable_parameters=trainable,
    )
    del model, optimizer, batch
    _free(device)
    return result


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time full SIMLA pretraining steps (forward with all five losses, backward, AdamW step, zero_grad) "
            "on a synthetic batch and report samples/s, seconds/step and peak memory. With "
            "--baseline-precision, a baseline configuration (same model and batch, that precision, no "
            "gradient checkpointing) runs FIRST in the same process and the ratios are reported."
        ),
        epilog=(
            "Peak memory is torch.cuda.max_memory_allocated on CUDA. On CPU it is the RSS sampled every 2 ms "
            "during the configuration (per run); the process-lifetime ru_maxrss is also shown and can only "
            "grow, which is why the baseline runs first."
        ),
    )
    parser.add_argument("--model", default="simla_tiny", help="model preset (simla.list_models()); default simla_tiny")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 = torch.autocast(bfloat16) around the forward (default fp32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device (default: cuda when available, else cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed warm-up steps (default 5)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute ViT blocks and encoder layers in backward (online encoders)")
    parser.add_argument("--baseline-precision", choices=("fp32", "bf16"), default=None,
                        help="also run a baseline at this precision without gradient checkpointing, first, "
                             "and report ratios against it")
    parser.add_argument("--text-length", type=int, default=20, help="padded caption length incl. [CLS] (default 20)")
    parser.add_argument("--queue-size", type=int, default=None, help="override the ITC queue size of the preset")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and the synthetic batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    for name in ("batch_size", "steps", "text_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.batch_size < 2:
        parser.error("--batch-size must be >= 2 (ITM draws in-batch negatives)")
    return args


def _describe(result: RunResult) -> str:
    c = result.config
    tag = f"{c.precision}{' +ckpt' if c.grad_checkpointing else ''}"
    line = (f"{tag:<12} {result.samples_per_s:9.2f} samples/s  {result.s_per_step * 1000:9.1f} ms/step  "
            f"peak {result.peak_memory_mib:9.1f} MiB ({result.memory_kind})")
    if result.peak_rss_mib is not None:
        line += f"  (RSS at start {result.start_rss_mib:.1f})  lifetime ru_maxrss {result.peak_rss_mib:.1f} MiB"
    return line + f"  loss {result.final_loss:.4f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base = dict(model=args.model, batch_size=args.batch_size, device=args.device, steps=args.steps,
                warmup=args.warmup, text_length=args.text_length, queue_size=args.queue_size, seed=args.seed)
    baseline = None
    if args.baseline_precision is not None:
        # First, because on CPU the lifetime peak RSS would otherwise include the main run.
        baseline = run(RunConfig(precision=args.baseline_precision, grad_checkpointing=False, **base))
    result = run(RunConfig(precision=args.precision, grad_checkpointing=args.grad_checkpointing, **base))

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "result": asdict(result),
    }
    if baseline is not None:
        report["baseline"] = asdict(baseline)
        report["ratio_vs_baseline"] = {
            "samples_per_s": result.samples_per_s / baseline.samples_per_s,
            "peak_memory": result.peak_memory_mib / baseline.peak_memory_mib if baseline.peak_memory_mib else None,
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}, batch {args.batch_size}, text length {args.text_length}, {report['device_name']}, "
          f"torch {torch.__version__}; {args.warmup} warm-up + {args.steps} timed steps; "
          f"{result.parameters / 1e6:.2f}M parameters ({result.trainable_parameters / 1e6:.2f}M trainable)")
    if baseline is not None:
        print("baseline     " + _describe(baseline))
    print("run          " + _describe(result))
    if baseline is not None:
        r = report["ratio_vs_baseline"]
        memory = f"{r['peak_memory']:.3f}x" if r["peak_memory"] is not None else "n/a"
        print(f"ratio vs baseline: {r['samples_per_s']:.3f}x samples/s, {memory} peak memory")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
