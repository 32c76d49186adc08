"""The training loop shared by every task: precision, accumulation, logging, checkpoints, exact resume.

The engine knows nothing about SIMLA's objectives: it calls a module that returns a dict of named scalar
losses, sums them, and logs each as `loss_<name>`. Task code supplies the data, the learning-rate and
extra-argument schedules, and a `prepare` hook that moves a batch to the device (and, for pretraining,
runs the visual tokenizer).

Exact resume: a checkpoint is written only at an optimizer-step boundary and holds the model (with
momentum teachers and queues), the optimizer and the step, plus, for EVERY rank, its data position, its
bad-sample counters, its interval log accumulators and its RNG states (python, torch CPU, its CUDA
device). The per-rank parts are gathered to rank 0, which writes the one file atomically, so a
checkpoint never mixes ranks' states from different steps. Data randomness is derived from (seed, epoch,
rank, batch, slot), never from worker state, so a run killed at any moment continues with the same
batches and the same losses, under torchrun as in one process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..distributed import all_gather_objects, gather_to_rank0, get_rank, get_world_size, is_distributed
from ..errors import NonFiniteError, UnusableDataError
from .optim import clip_gradients


logger = logging.getLogger(__name__)


class ResumableData(Protocol):
    """What the engine needs from a data source."""

    steps_per_epoch: int  # micro-batches per epoch on this rank

    def batches(self, epoch: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        """(batch, meta) pairs of `epoch`, from the current position on. meta["skipped"]: bad-sample counts."""

    def position(self) -> dict[str, Any]: ...

    def load_position(self, position: Mapping[str, Any]) -> None: ...

    def consumed(self, epoch: int, meta: Mapping[str, Any]) -> None:
        """Record that the batch with this meta was used (called in order)."""


@dataclass
class EngineConfig:
    output_dir: Path
    total_steps: int
    grad_accum_steps: int = 1
    precision: str = "fp32"
    grad_clip: float | None = None
    log_every: int = 50
    save_every: int = 1000
    progress: bool = True
    tensorboard: bool = False
    samples_per_micro_batch: int = 1  # per rank, for samples/s
    max_bad_fraction: float = 1.0  # stop when more than this fraction of the samples read were bad
    description: str = "train"  # the progress bar's label (the task)


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # bad samples by kind met by this rank
    images: dict[str, int] = field(default_factory=dict)  # what image decoding did, by note (load_image notes)
    samples_seen: int = 0  # samples used by this rank


def _add_counts(total: dict[str, int], counts: Mapping[str, Any]) -> None:
    """Add one batch's (or rank's) counts by kind into a running total."""
    for kind, count in counts.items():
        total[kind] = total.get(kind, 0) + int(count)


def capture_rng(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states: python, torch CPU and, on a CUDA device, that device's generator."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # written by an older version: one state per visible device
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= len(cuda):
            logger.warning("checkpoint has no CUDA RNG state for %s: its generator is not restored", device)
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


class Engine:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: ResumableData,
        config: EngineConfig,
        *,
        lr_at: Callable[[int], float],
        forward_kwargs_at: Callable[[int], dict[str, float]] = lambda step: {},
        prepare: Callable[[dict[str, Any]], dict[str, Any]] = lambda batch: batch,
        save: Callable[[Path, dict[str, Any]], None],
        device: torch.device,
        wrapped: nn.Module | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.model = model  # the bare module: its state is what checkpoints hold
        self.wrapped = wrapped or model  # what is called (DistributedDataParallel at world size > 1)
        self.optimizer = optimizer
        self.data = data
        self.config = config
        self.lr_at = lr_at
        self.forward_kwargs_at = forward_kwargs_at
        self.prepare = prepare
        self.save_fn = save
        self.device = device
        # Called with the step number after every optimizer step (and its log/checkpoint), on every rank:
        # e.g. a periodic evaluation. It must leave the model in training mode.
        self.on_step = on_step
        self.state = TrainState()
        self._interval: dict[str, Tensor] = {}
        self._interval_steps = 0
        self._writer = None
        self.rank0 = get_rank() == 0
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return Path(self.config.output_dir) / "checkpoints" / "last.pt"

    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks and must come back per rank on resume."""
        return {
            "rank": get_rank(),
            "rng": capture_rng(self.device),
            "data_position": self.data.position(),
            "skipped": dict(self.state.skipped),
            "images": dict(self.state.images),
            "samples_seen": self.state.samples_seen,
            "interval": {k: v.detach().cpu() for k, v in self._interval.items()},
            "interval_steps": self._interval_steps,
        }

    def training_state(self, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Everything but the weights. `ranks`: every rank's `rank_state()` in rank order (default: this one's).

        The optimizer state is identical on every rank (DDP averages the gradients), so it is stored once.
        """
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.state.step,
            "epoch": self.state.epoch,
            "world_size": get_world_size(),
            "ranks": ranks if ranks is not None else [self.rank_state()],
        }

    def _check_finite_weights(self) -> None:
        """Refuse to checkpoint NaN/inf weights: a resumed run would only continue the divergence."""
        finite = torch.stack([p.detach().isfinite().all() for p in self.model.parameters()]).all()
        if is_distributed():
            flag = finite.float().to(self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)  # every rank stops together
            finite = flag.bool()
        if not bool(finite):
            raise NonFiniteError(
                f"non-finite weights at step {self.state.step}: not writing {self.checkpoint_path} (the last "
                "checkpoint there is still good). Lower the learning rate, set grad_clip, or use precision=fp32.")

    def save(self) -> None:
        self._check_finite_weights()  # on every rank, before the collective gather below
        ranks = gather_to_rank0(self.rank_state())  # a collective: every rank takes part
        if self.rank0:
            self.save_fn(self.checkpoint_path, {"train_state": self.training_state(ranks)})
            logger.info("saved %s at step %d", self.checkpoint_path, self.state.step)
        if is_distributed():
            torch.distributed.barrier()  # nobody runs ahead of a checkpoint that may be resumed

    def load_training_state(self, train_state: Mapping[str, Any]) -> None:
        """Restore everything but the model weights (the caller loads those); each rank takes its own part."""
        world, rank = get_world_size(), get_rank()
        saved_world = int(train_state.get("world_size", 1))
        # Checkpoints written before per-rank states kept rank 0's state at the top level.
        ranks = train_state.get("ranks") or [train_state]
        if saved_world != world:
            logger.warning("resuming with world size %d (checkpoint: %d): the data order will differ",
                           world, saved_world)
        self.optimizer.load_state_dict(train_state["optimizer"])
        mine = ranks[rank] if rank < len(ranks) else None
        if mine is None:
            # A rank the interrupted run did not have: it continues at the same epoch and batch as rank 0,
            # with its own fresh RNG seeds and no counts of its own yet.
            logger.warning("rank %d has no saved state (the checkpoint holds %d ranks): its RNG is not restored",
                           rank, len(ranks))
            mine = {**ranks[0], "skipped": {}, "images": {}, "interval": {}, "rng": None}
        # Checkpoints written before image notes were counted have no "images": counting starts afresh.
        self.state = TrainState(step=train_state["step"], epoch=train_state["epoch"],
                                skipped=dict(mine["skipped"]), images=dict(mine.get("images", {})),
                                samples_seen=mine["samples_seen"])
        self.data.load_position(mine["data_position"])
        self._interval = {k: v.to(self.device) for k, v in mine["interval"].items()}
        self._interval_steps = mine["interval_steps"]
        if mine["rng"] is not None:
            restore_rng(mine["rng"], self.device)
        self._truncate_log()

    def _truncate_log(self) -> None:
        """Drop log lines written after the checkpoint by the interrupted run (they will be redone)."""
        path = self._log_path()
        if not self.rank0 or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= self.state.step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut short by the kill
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    # ------------------------------------------------------------------------------- logging
    def _log_path(self) -> Path:
        return Path(self.config.output_dir) / "log.jsonl"

    def _accumulate(self, losses: Mapping[str, Tensor], grad_norm: Tensor) -> None:
        # Device-side sums: no host synchronisation until a log step.
        for name, value in losses.items():
            key = f"loss_{name}"
            self._interval[key] = self._interval.get(key, torch.zeros((), device=self.device)) + value.detach().float()
        self._interval["grad_norm"] = self._interval.get("grad_norm", torch.zeros((), device=self.device)) + grad_norm.float()
        self._interval_steps += 1

    def _write_log(self, lr: float, extra: Mapping[str, float], elapsed: float, steps_timed: int) -> dict[str, Any]:
        names = sorted(self._interval)
        values = torch.stack([self._interval[n] for n in names]) / max(1, self._interval_steps)
        if is_distributed():
            torch.distributed.all_reduce(values)
            values /= get_world_size()
        record: dict[str, Any] = {"step": self.state.step, "epoch": self.state.epoch, "lr": lr, **extra}
        record.update({n: float(v) for n, v in zip(names, values.tolist())})
        rate = steps_timed * self.config.grad_accum_steps * self.config.samples_per_micro_batch * get_world_size()
        record["samples_per_s"] = rate / elapsed if elapsed > 0 else None
        seen, skipped, images = self._totals_over_ranks()
        record["samples_seen"] = seen
        record["skipped"] = skipped
        record["skipped_total"] = sum(skipped.values())
        if images:
            record["images"] = images
        self._interval, self._interval_steps = {}, 0
        if self.rank0:
            with open(self._log_path(), "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            if self._writer is not None:
                for key, value in record.items():
                    if isinstance(value, (int, float)) and key != "step":
                        self._writer.add_scalar(key, value, self.state.step)
        return record

    def _totals_over_ranks(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """Samples used, bad samples by kind and image notes, summed over every rank (each reads its own share)."""
        total_seen, total_skipped, total_images = 0, {}, {}
        mine = (self.state.samples_seen, dict(self.state.skipped), dict(self.state.images))
        for seen, skipped, images in all_gather_objects(mine):
            total_seen += seen
            _add_counts(total_skipped, skipped)
            _add_counts(total_images, images)
        return total_seen, dict(sorted(total_skipped.items())), dict(sorted(total_images.items()))

    def _open_tensorboard(self) -> None:
        if self.config.tensorboard and self.rank0:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(Path(self.config.output_dir) / "tensorboard"))

    # ---------------------------------------------------------------------------------- loop
    def _autocast(self):
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _micro_batches(self) -> Iterator[tuple[int, dict[str, Any], dict[str, Any]]]:
        while True:
            epoch, produced = self.state.epoch, 0
            start = self.data.position()
            resumed_mid_epoch = start.get("epoch") == epoch and (start.get("next_batch") or start.get("batches"))
            for batch, meta in self.data.batches(epoch):
                produced += 1
                yield epoch, batch, meta
            if produced == 0 and not resumed_mid_epoch:
                raise UnusableDataError(f"epoch {epoch} produced no batch: is every sample unreadable, or the dataset "
                                   "smaller than one batch per process?")
            self.state.epoch += 1  # the data source resets its position for a new epoch

    def _check_bad_fraction(self) -> None:
        bad = sum(self.state.skipped.values())
        read = bad + self.state.samples_seen
        if read >= 100 and bad > self.config.max_bad_fraction * read:
            raise UnusableDataError(f"{bad} of the {read} samples read so far were bad (more than "
                               f"max_bad_fraction={self.config.max_bad_fraction}): {self.state.skipped}. "
                               "Check image_root and the annotation files.")

    def fit(self) -> TrainState:
        cfg = self.config
        self._open_tensorboard()
        bar = None
        if cfg.progress and self.rank0:
            bar = tqdm(total=cfg.total_steps, initial=self.state.step, desc=cfg.description, unit="step", dynamic_ncols=True)
        params = [p for p in self.model.parameters() if p.requires_grad]
        stream = self._micro_batches()
        timer, steps_timed = time.perf_counter(), 0
        self.wrapped.train()
        while self.state.step < cfg.total_steps:
            lr = self.lr_at(self.state.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            kwargs = self.forward_kwargs_at(self.state.step)
            step_losses: dict[str, Tensor] = {}
            for micro in range(cfg.grad_accum_steps):
                epoch, batch, meta = next(stream)
                self.data.consumed(epoch, meta)
                _add_counts(self.state.skipped, meta.get("skipped", {}))
                _add_counts(self.state.images, meta.get("images", {}))
                self.state.samples_seen += int(meta.get("size", cfg.samples_per_micro_batch))
                self._check_bad_fraction()
                inputs = self.prepare(batch)
                if hasattr(self.model, "update_momentum"):
                    self.model.update_momentum = micro == 0  # teachers move once per optimizer step
                last = micro == cfg.grad_accum_steps - 1
                sync = contextlib.nullcontext() if last or not hasattr(self.wrapped, "no_sync") else self.wrapped.no_sync()
                with sync:
                    with self._autocast():
                        losses = self.wrapped(inputs, **kwargs)
                    total = sum(losses[name] for name in losses) / cfg.grad_accum_steps
                    total.backward()
                for name, value in losses.items():
                    step_losses[name] = step_losses.get(name, 0) + value.detach() / cfg.grad_accum_steps
            grad_norm = clip_gradients(params, cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            steps_timed += 1
            self._accumulate(step_losses, grad_norm)
            if bar is not None:
                bar.update(1)
            if self.state.step % cfg.log_every == 0 or self.state.step == cfg.total_steps:
                record = self._write_log(lr, kwargs, time.perf_counter() - timer, steps_timed)
                timer, steps_timed = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=sum(v for k, v in record.items() if k.startswith("loss_")),
                                    skipped=record["skipped_total"])
                if not all(math.isfinite(v) for k, v in record.items() if k.startswith("loss_")):
                    raise NonFiniteError(f"non-finite loss at step {self.state.step}: {record}. Lower the learning "
                                         "rate, set grad_clip, or use precision=fp32.")
            if self.state.step % cfg.save_every == 0 or self.state.step == cfg.total_steps:
                self.save()
            if self.on_step is not None:
                self.on_step(self.state.step)
        if bar is not None:
            bar.close()
        if self._writer is not None:
            self._writer.close()
        if hasattr(self.model, "update_momentum"):
            self.model.update_momentum = True  # outside the engine every training forward updates the teachers
        return self.state
