#!/usr/bin/env python
"""Time full SIMLA pretraining steps on a synthetic batch: throughput and peak memory, fast vs reference path.

One step = forward (all five losses, momentum teachers and queues included) + total.backward() + AdamW
step (simla.train.optim.build_optimizer) + zero_grad, exactly what a training loop does per batch minus
data loading. The batch is built once on the device and reused, so the numbers measure the model only.

Two execution paths compute the same losses:
  reference  what the authors' code does: eager, their execution (simla.models.pretrain_reference.
             ReferencePretraining: separate passes, every caption re-projects its image's cross-attention
             keys/values, teachers always run, torch's dropout), explicit attention (SDPA's math backend),
             torch's per-tensor AdamW loop and glibc's malloc defaults. The baseline that speed claims are measured against.
  fast       simla's defaults: its execution, the fused AdamW, the one-pass EMA update, the CPU allocator
             policy; plus --compile (regional torch.compile of every block) and/or --precision bf16.

Examples:
    # CPU speed: the fast path against the reference path, in one process (baseline first)
    python benchmarks/pretrain_step.py --model simla_base --batch-size 4 --compile --baseline reference
    # CPU speed, steadiest: both paths alive in their own processes, their timed steps alternating
    python benchmarks/pretrain_step.py --model simla_base --batch-size 4 --warmup 2 --steps 6 --baseline reference --interleave
    # CPU memory: checkpointing against the plain fast path, each configuration in its own process
    python benchmarks/pretrain_step.py --model simla_base --batch-size 8 --grad-checkpointing --baseline plain --isolate

Memory: on CUDA, `torch.cuda.max_memory_allocated` since the configuration's model was built (weights,
optimiser state, activations). On CPU, two figures: `peak_rss_mib` is the process-lifetime peak
(`getrusage` ru_maxrss), so it can only grow from one configuration to the next; `sampled_peak_rss_mib` is
the peak of the current RSS sampled every few milliseconds while that configuration ran, which is
per-configuration and is what the memory ratio uses on CPU. Memory freed by one configuration is not
always handed back to the OS before the next starts, so compare memory with --isolate (every
configuration in a fresh process, run one after another by this script).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import simla
from simla.masking import BlockMaskGenerator
from simla.models.pretrain_reference import ReferencePretraining
from simla.train.compile import compile_blocks
from simla.train.cpu_allocator import (CPU_ALLOCATOR_POLICIES, PRELOADED_ALLOCATORS, active_allocator,
                                      configure_cpu_allocator, find_allocator_library, preload_environment,
                                      resolve_cpu_allocator)
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
    path: str  # "fast" or "reference"
    compile: bool
    cpu_allocator: str  # simla.train.cpu_allocator policy on CPU: "auto" (the fast path's), "system", a malloc
    text_length: int
    queue_size: int | None
    seed: int
    alpha: float | None = None  # distillation weight of the step (None: the preset's, 0.4 for the paper)


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
    malloc: str | None = None  # CPU only: the malloc that served the process (simla.train.cpu_allocator)


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


def _attention_kernels(path: str) -> contextlib.AbstractContextManager:
    """The reference path computes attention as the authors' code does: scores, softmax, dropout and a
    second product as separate kernels (SDPA's math backend); the fast path lets SDPA pick a fused kernel."""
    if path == "reference":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _build(cfg: RunConfig, device: torch.device) -> tuple[simla.SimlaForPretraining, torch.optim.Optimizer]:
    """The model and optimiser of `cfg`'s path, in training mode on `device`."""
    overrides: dict[str, Any] = {}
    if cfg.queue_size is not None:
        overrides["queue_size"] = cfg.queue_size
    if device.type == "cpu":  # process-wide: compare configurations with --isolate
        configure_cpu_allocator(resolve_cpu_allocator(cfg.cpu_allocator, cfg.grad_checkpointing))
    # The authors' execution is its own class; the fast path is simla's pretraining model.
    model_class = ReferencePretraining if cfg.path == "reference" else simla.SimlaForPretraining
    model = model_class(simla.get_config(cfg.model, **overrides)).to(device)
    model.train()
    if cfg.grad_checkpointing:
        model.visual_encoder.set_grad_checkpointing(True)
        model.text_encoder.set_grad_checkpointing(True)
    if cfg.compile:
        compile_blocks(model)
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.02,
                                implementation="loop" if cfg.path == "reference" else "auto")
    return model, optimizer


def flops_per_sample(cfg: RunConfig) -> float:
    """Model FLOPs of one training step (forward + backward) per sample, counted by torch's FLOP counter on
    one eager step of `cfg`'s path without checkpointing (recomputation is not useful work)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model, _ = _build(dataclasses.replace(cfg, grad_checkpointing=False, compile=False), device)
    batch = synthetic_batch(model, cfg.batch_size, cfg.text_length, device, cfg.seed)
    counter = FlopCounterMode(display=False)
    with counter, _autocast(device, cfg.precision):
        total = model(batch, alpha=model.config.objectives.alpha).total
    with counter:
        total.backward()
    flops = counter.get_total_flops() / cfg.batch_size
    del model, batch, total
    _free(device)
    return float(flops)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Trainer:
    """One configuration's model, optimiser and synthetic batch; `step()` is one full training step."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg, self.device = cfg, torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        with _attention_kernels(cfg.path):
            self.model, self.optimizer = _build(cfg, self.device)
        self.batch = synthetic_batch(self.model, cfg.batch_size, cfg.text_length, self.device, cfg.seed)
        self.alpha = self.model.config.objectives.alpha if cfg.alpha is None else cfg.alpha

    def step(self) -> None:
        with _attention_kernels(self.cfg.path), _autocast(self.device, self.cfg.precision):
            total = self.model(self.batch, alpha=self.alpha).total
        total.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.last_total = total.detach()

    def result(self, s_per_step: float, peak: float, kind: str, lifetime: float | None,
               start_rss: float | None) -> RunResult:
        parameters = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return RunResult(config=self.cfg, samples_per_s=self.cfg.batch_size / s_per_step, s_per_step=s_per_step,
                         peak_memory_mib=peak, memory_kind=kind, peak_rss_mib=lifetime, start_rss_mib=start_rss,
                         final_loss=float(self.last_total.float().item()), parameters=parameters,
                         trainable_parameters=trainable,
                         malloc=active_allocator() if self.device.type == "cpu" else None)


def run(cfg: RunConfig) -> RunResult:
    """Build the model and optimiser for `cfg`, warm up, then time `cfg.steps` full training steps."""
    device = torch.device(cfg.device)
    _free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_rss = _start_rss_mib(device)
    sampler = RssSampler()
    with sampler if device.type == "cpu" else contextlib.nullcontext():
        trainer = _Trainer(cfg)
        for _ in range(cfg.warmup):
            trainer.step()
        _sync(device)  # the timer must not start while warm-up kernels are still queued
        start = time.perf_counter()
        for _ in range(cfg.steps):
            trainer.step()
        _sync(device)
        elapsed = time.perf_counter() - start
    result = trainer.result(elapsed / cfg.steps, *_peak_memory(device, sampler), start_rss)
    del trainer
    _free(device)
    return result


def _peak_memory(device: torch.device, sampler: RssSampler) -> tuple[float, str, float | None]:
    """(peak MiB, what it measures, process-lifetime peak RSS MiB on CPU) of the configuration just run."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / _MIB, "cuda_max_allocated", None
    return sampler.peak / _MIB, "cpu_sampled_rss", lifetime_peak_rss_mib()


def _serve(cfg: RunConfig) -> None:
    """--interleave worker: build `cfg`, print "ready", then run one timed step per "step" line on stdin and
    print its seconds; on "result", print the RunResult (median of the steps after `cfg.warmup`) as JSON."""
    device = torch.device(cfg.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start_rss = _start_rss_mib(device)
    times: list[float] = []
    sampler = RssSampler()
    with sampler if device.type == "cpu" else contextlib.nullcontext():
        trainer = _Trainer(cfg)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "step":
                break
            _sync(device)
            start = time.perf_counter()
            trainer.step()
            _sync(device)
            times.append(time.perf_counter() - start)
            print(times[-1], flush=True)
    result = trainer.result(statistics.median(times[cfg.warmup:]), *_peak_memory(device, sampler), start_rss)
    print(json.dumps(asdict(result)), flush=True)


def _start_rss_mib(device: torch.device) -> float | None:
    rss = current_rss_bytes() if device.type == "cpu" else None
    return None if rss is None else rss / _MIB


class _Worker:
    """One configuration's persistent process for --interleave: built once, then stepped on request. Its
    warnings and errors go to this process's stderr."""

    def __init__(self, cfg: RunConfig, threads: int | None) -> None:
        self.cfg = cfg
        command = [sys.executable, __file__, "--serve", json.dumps(asdict(cfg))]
        if threads is not None:
            command += ["--threads", str(threads)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=_worker_environment(cfg))
        if self._send(None) != "ready":
            raise RuntimeError(f"configuration {cfg} did not start")

    def _send(self, command: str | None) -> str:
        if command is not None:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"configuration {self.cfg} failed (its error is printed above)")
        return line.strip()

    def step(self) -> float:
        return float(self._send("step"))

    def finish(self) -> RunResult:
        payload = json.loads(self._send("result"))
        self.process.wait()
        payload["config"] = RunConfig(**payload["config"])
        return RunResult(**payload)


def _run_interleaved(baseline: RunConfig, main: RunConfig, threads: int | None
                     ) -> tuple[RunResult, RunResult, list[float], list[float]]:
    """Both configurations in their own live processes, their timed steps alternating one by one, so that a
    machine whose speed drifts affects both alike. Returns both results and every timed step's seconds."""
    workers = [_Worker(baseline, threads), _Worker(main, threads)]  # built one after the other
    try:
        for worker in workers:
            for _ in range(worker.cfg.warmup):
                worker.step()
        times: list[list[float]] = [[], []]
        for _ in range(main.steps):
            for worker, own in zip(workers, times):
                own.append(worker.step())
        base_result, main_result = (worker.finish() for worker in workers)
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()
    return base_result, main_result, times[0], times[1]


# --------------------------------------------------------------------------------------------- CLI
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time full SIMLA pretraining steps (forward with all five losses, backward, AdamW step, zero_grad) "
            "on a synthetic batch and report samples/s, seconds/step and peak memory. With --baseline, a "
            "baseline configuration runs FIRST and the ratios against it are reported."
        ),
        epilog=(
            "Peak memory is torch.cuda.max_memory_allocated on CUDA. On CPU it is the RSS sampled every 2 ms "
            "during the configuration; use --isolate to measure each configuration in a fresh process."
        ),
    )
    parser.add_argument("--model", default="simla_tiny", help="model preset (simla.list_models()); default simla_tiny")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 = torch.autocast(bfloat16) around the forward (default fp32)")
    parser.add_argument("--path", choices=("fast", "reference"), default="fast",
                        help="fast = simla's defaults; reference = the authors' execution, explicit attention and "
                             "per-tensor AdamW, eager (default fast)")
    parser.add_argument("--compile", action="store_true", help="torch.compile every ViT block and encoder layer")
    parser.add_argument("--cpu-allocator", choices=CPU_ALLOCATOR_POLICIES, default="auto",
                        help="fast path on CPU: malloc policy (simla.train.cpu_allocator). keep/release set glibc's; "
                             "tcmalloc/jemalloc/mimalloc run the configuration's process under that library "
                             "(needs --isolate or --interleave); auto = release with --grad-checkpointing, else "
                             "keep. The reference path always uses system")
    parser.add_argument("--baseline-cpu-allocator", choices=CPU_ALLOCATOR_POLICIES, default=None,
                        help="with --baseline plain: the baseline's malloc policy (default: --cpu-allocator's), e.g. "
                             "checkpointing under tcmalloc against the plain step under auto")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device (default: cuda when available, else cpu)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed warm-up steps (default 5; with --compile at least 3, the compiling steps)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute ViT blocks and encoder layers in backward (online encoders)")
    parser.add_argument("--baseline", choices=("reference", "plain"), default=None,
                        help="also run a baseline, first, and report ratios against it: reference = the reference "
                             "path in fp32 (eager, no checkpointing); plain = this configuration without "
                             "gradient checkpointing")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --isolate: run the baseline and the run this many times each, alternating, "
                             "and report each one's median (a machine whose speed drifts then affects both alike)")
    parser.add_argument("--isolate", action="store_true",
                        help="run every configuration in its own fresh process (for memory comparisons on CPU)")
    parser.add_argument("--interleave", action="store_true",
                        help="with --baseline: keep the baseline and the run alive in their own processes and "
                             "alternate their timed steps one by one; ratios are the medians' and each step "
                             "pair's (the steadiest comparison on a machine whose speed drifts)")
    parser.add_argument("--alpha", type=float, default=None,
                        help="distillation weight of every step (default: the preset's, 0.4; 0 = the first step of "
                             "a run, or no distillation: simla then skips the teacher work that only distils)")
    parser.add_argument("--text-length", type=int, default=20, help="padded caption length incl. [CLS] (default 20)")
    parser.add_argument("--queue-size", type=int, default=None, help="override the ITC queue size of the preset")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and the synthetic batch")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # --isolate: run this JSON RunConfig, print its result
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # --interleave: step this JSON RunConfig on request
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
    if args.repeats < 1 or (args.repeats > 1 and not args.isolate):
        parser.error("--repeats must be >= 1, and above 1 only with --isolate")
    if args.model not in simla.list_models():
        parser.error(f"--model {args.model!r} is not a preset; choose from {', '.join(simla.list_models())}")
    if args.interleave and (args.baseline is None or args.isolate or args.repeats > 1):
        parser.error("--interleave needs --baseline, and replaces --isolate and --repeats")
    preloaded = {args.cpu_allocator, args.baseline_cpu_allocator} & set(PRELOADED_ALLOCATORS)
    for name in sorted(preloaded - {active_allocator()}):
        if not (args.isolate or args.interleave):
            parser.error(f"--cpu-allocator {name} starts the configuration's process under {name}: add --isolate "
                         f"or --interleave (or run this script with LD_PRELOAD set)")
        if find_allocator_library(name) is None:
            parser.error(f"--cpu-allocator {name}: the {name} library is not installed here")
    if args.baseline_cpu_allocator is not None and args.baseline != "plain":
        parser.error("--baseline-cpu-allocator goes with --baseline plain")
    if args.compile and args.warmup < 3:
        parser.error("--compile needs --warmup >= 3: the first steps compile, and timing them measures the compiler")
    return args


def _describe(result: RunResult) -> str:
    c = result.config
    tag = f"{c.path} {c.precision}{' +compile' if c.compile else ''}{' +ckpt' if c.grad_checkpointing else ''}"
    line = (f"{tag:<28} {result.samples_per_s:8.3f} samples/s  {result.s_per_step * 1000:9.1f} ms/step  "
            f"peak {result.peak_memory_mib:8.1f} MiB ({result.memory_kind})")
    if result.peak_rss_mib is not None:
        line += f"  (RSS at start {result.start_rss_mib:.1f}; malloc {result.malloc})"
    return line + f"  loss {result.final_loss:.4f}"


def _worker_environment(cfg: RunConfig) -> dict[str, str]:
    """The environment of `cfg`'s worker process: this one's, plus LD_PRELOAD when `cfg` names a malloc."""
    if cfg.cpu_allocator in PRELOADED_ALLOCATORS:
        return preload_environment(cfg.cpu_allocator)
    return dict(os.environ)


def _run_isolated(cfg: RunConfig, threads: int | None) -> RunResult:
    """Run one configuration in a fresh Python process and read its result back."""
    command = [sys.executable, __file__, "--worker", json.dumps(asdict(cfg))]
    if threads is not None:
        command += ["--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=_worker_environment(cfg))
    if done.returncode != 0:
        raise RuntimeError(f"configuration {cfg} failed:\n{done.stderr[-4000:]}")
    payload = json.loads(done.stdout.strip().splitlines()[-1])
    payload["config"] = RunConfig(**payload["config"])
    return RunResult(**payload)


def _median(results: list[RunResult]) -> RunResult:
    """The repeat with the median step time (the lower middle one of an even count)."""
    ordered = sorted(results, key=lambda r: r.s_per_step)
    return ordered[(len(ordered) - 1) // 2]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.worker is not None:
        print(json.dumps(asdict(run(RunConfig(**json.loads(args.worker))))))
        return 0
    if args.serve is not None:
        _serve(RunConfig(**json.loads(args.serve)))
        return 0
    base = dict(model=args.model, batch_size=args.batch_size, device=args.device, steps=args.steps,
                text_length=args.text_length, queue_size=args.queue_size, seed=args.seed, alpha=args.alpha)
    main_config = RunConfig(precision=args.precision, grad_checkpointing=args.grad_checkpointing, path=args.path,
                            cpu_allocator="system" if args.path == "reference" else args.cpu_allocator,
                            compile=args.compile, warmup=args.warmup, **base)
    execute = (lambda c: _run_isolated(c, args.threads)) if args.isolate else run
    baseline = None
    if args.baseline == "reference":
        baseline_config = RunConfig(precision="fp32", grad_checkpointing=False, path="reference", compile=False,
                                    cpu_allocator="system",
                                    warmup=min(args.warmup, 2), **base)
    elif args.baseline == "plain":
        baseline_config = dataclasses.replace(main_config, grad_checkpointing=False,
                                              cpu_allocator=args.baseline_cpu_allocator or main_config.cpu_allocator)
    runs: dict[str, list[RunResult]] = {"baseline": [], "run": []}
    step_times: dict[str, list[float]] = {}
    if args.interleave:
        baseline_config = dataclasses.replace(baseline_config, warmup=args.warmup)
        base_result, main_result, step_times["baseline"], step_times["run"] = _run_interleaved(
            baseline_config, main_config, args.threads)
        runs = {"baseline": [base_result], "run": [main_result]}
    for _ in range(0 if args.interleave else args.repeats):
        if args.baseline is not None:
            # First, because on CPU the lifetime peak RSS would otherwise include the main run.
            runs["baseline"].append(execute(baseline_config))
        runs["run"].append(execute(main_config))
    baseline = _median(runs["baseline"]) if runs["baseline"] else None
    result = _median(runs["run"])

    report: dict[str, Any] = {
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "isolated": args.isolate or args.interleave,
        "interleaved": args.interleave,
        "repeats": args.repeats,
        "s_per_step_all": {name: [r.s_per_step for r in results] for name, results in runs.items() if results},
        "step_times": step_times,
        "result": asdict(result),
    }
    if baseline is not None:
        report["baseline"] = asdict(baseline)
        report["ratio_vs_baseline"] = {
            "samples_per_s": result.samples_per_s / baseline.samples_per_s,
            "step_time": result.s_per_step / baseline.s_per_step,
            "peak_memory": result.peak_memory_mib / baseline.peak_memory_mib,
        }
        if step_times:
            pairs = [b / m for b, m in zip(step_times["baseline"], step_times["run"])]
            report["ratio_vs_baseline"]["step_pairs"] = pairs
            report["ratio_vs_baseline"]["step_pairs_median"] = statistics.median(pairs)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.model}, batch {args.batch_size}, text length {args.text_length}, {report['device_name']}, "
          f"torch {torch.__version__}; {args.warmup} warm-up + {args.steps} timed steps; "
          f"{result.parameters / 1e6:.2f}M parameters ({result.trainable_parameters / 1e6:.2f}M trainable)"
          f"{'; each configuration in its own process' if args.isolate else ''}"
          f"{'; both in their own live processes, timed steps alternating' if args.interleave else ''}"
          f"{f'; {args.repeats} alternating repeats, medians' if args.repeats > 1 else ''}")
    if baseline is not None:
        print("baseline  " + _describe(baseline))
    print("run       " + _describe(result))
    if baseline is not None:
        r = report["ratio_vs_baseline"]
        memory = f"{r['peak_memory']:.3f}x" if r["peak_memory"] is not None else "n/a"
        print(f"ratio vs baseline: {r['samples_per_s']:.3f}x samples/s ({r['step_time']:.3f}x step time), "
              f"{memory} peak memory")
        if args.repeats > 1:  # the spread, so one lucky repeat cannot pass for the typical ratio
            pairs = zip(runs["baseline"], runs["run"])
            print("per repeat (baseline / run s/step, ratio): " + "; ".join(
                f"{b.s_per_step:.2f} / {m.s_per_step:.2f} = {b.s_per_step / m.s_per_step:.3f}x" for b, m in pairs))
        if step_times:
            print(f"step pairs (baseline / run s, ratio), median {r['step_pairs_median']:.3f}x: " + "; ".join(
                f"{b:.2f} / {m:.2f} = {b / m:.3f}x" for b, m in zip(step_times["baseline"], step_times["run"])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
