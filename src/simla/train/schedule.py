"""Learning-rate and alpha schedules as pure functions of the global step.

There are no scheduler objects with hidden state: the training loop asks for the value at its global
step every iteration, so resuming only needs the step counter and nothing can drift out of sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = ["LRSchedule", "alpha_at", "set_lr"]

ScheduleKind = Literal["cosine", "reference"]
_KINDS = ("cosine", "reference")


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `warmup_steps=True` is a bug, not a count.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"LRSchedule.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"LRSchedule.{name} must be >= {minimum}, got {value}")


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        # Accept numpy/torch integer scalars, reject floats (a fractional step is a caller bug).
        if hasattr(step, "__index__"):
            step = step.__index__()
        else:
            raise ValueError(f"step must be an int, got {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return step


@dataclass(frozen=True, kw_only=True)
class LRSchedule:
    """Learning rate at a global optimiser step (0-based: step 0 is the first optimiser update).

    Fields:
        lr: peak learning rate (1e-4 in pretraining).
        warmup_lr: learning rate at step 0, the start of the warm-up (1e-5).
        min_lr: final learning rate of the cosine decay (1e-5).
        warmup_steps: warm-up length in optimiser steps (2000 = the reference's ``warmup: 20``).
        total_steps: steps in the whole run (epochs × steps_per_epoch).
        steps_per_epoch: optimiser steps per epoch (per-rank batches, as the reference's ``len(loader)``).
        kind: ``"cosine"`` (default) or ``"reference"``, see below.
        reference_step_size: the reference's warm-up update interval, 100 iterations;
            ``"reference"`` only.

    ``kind="cosine"`` (ours, the default) is smooth and per step:
        step < warmup_steps:  warmup_lr + (lr − warmup_lr) · step / warmup_steps    (step 0 → warmup_lr)
        otherwise:            min_lr + ½(lr − min_lr)(1 + cos(π · p)),
                              p = min(1, (step − warmup_steps) / (total_steps − warmup_steps))
        so the peak lr is reached at step ``warmup_steps`` and ``min_lr`` at step ``total_steps`` (the last
        update, step total_steps − 1, is a hair above it) and stays there beyond.

    ``kind="reference"`` reproduces the reference's staircase exactly. Write S = reference_step_size, T = warmup_steps / S
    (timm's ``warmup_t``, the config's ``warmup``), E = total_steps / steps_per_epoch (epochs) and
    v(k) = warmup_lr + k·(lr − warmup_lr)/T for k < T, v(T) = lr (the cosine at its start). The timm
    scheduler sets warmup_lr when it is built, and in epoch 0 the loop calls ``step(i // S)`` AFTER the
    optimiser step of iteration i whenever i % S == 0 and i ≤ warmup_steps. So the rate USED at iteration i
    is the value set after the last such update before it:
        epoch 0, i = 0:            v(0) = warmup_lr   (the value set at construction)
        epoch 0, 1 ≤ i:            v(min((i − 1) // S, T))
        epoch e ≥ 1 (constant):    min_lr + ½(lr − min_lr)(1 + cos(π · e / E)),  min_lr once e ≥ E
    Example, S = 100, warmup_steps = 300 (T = 3), 1000 steps per epoch, d = (lr − warmup_lr)/3:
        iterations 0..100 → warmup_lr; 101..200 → warmup_lr + d; 201..300 → warmup_lr + 2d;
        301..999 → lr; 1000..1999 → cosine(1/E); 2000..2999 → cosine(2/E); ...
    Note the one-iteration lag (iteration 100 still uses warmup_lr) and that the warm-up staircase lives in
    epoch 0 only: if epoch 0 is shorter than ``warmup_steps`` the warm-up never completes and the rate jumps
    from a partial warm-up value to cosine(1/E), near the peak, at the start of epoch 1. With
    ``warmup_steps = 0`` timm never sets warmup_lr, so all of epoch 0 runs at ``lr``.
    """

    lr: float = 1e-4
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_steps: int = 2000
    total_steps: int
    steps_per_epoch: int
    kind: ScheduleKind = "cosine"
    reference_step_size: int = 100

    def __post_init__(self) -> None:
        for name in ("lr", "warmup_lr", "min_lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"LRSchedule.{name} must be a finite number, got {value!r}")
            if value < 0:
                raise ValueError(f"LRSchedule.{name} must be >= 0, got {value}")
        if self.min_lr > self.lr:
            raise ValueError(f"LRSchedule.min_lr ({self.min_lr}) must not exceed LRSchedule.lr ({self.lr})")
        _check_int("warmup_steps", self.warmup_steps, 0)
        _check_int("total_steps", self.total_steps, 1)
        _check_int("steps_per_epoch", self.steps_per_epoch, 1)
        _check_int("reference_step_size", self.reference_step_size, 1)
        if self.kind not in _KINDS:
            raise ValueError(f"LRSchedule.kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "cosine" and self.warmup_steps > self.total_steps:
            raise ValueError(
                f"LRSchedule.warmup_steps ({self.warmup_steps}) must not exceed LRSchedule.total_steps "
                f"({self.total_steps})"
            )
        if self.kind == "reference" and self.warmup_steps % self.reference_step_size:
            # The reference counts warm-up in whole hundreds of iterations (its `warmup` config value).
            raise ValueError(
                f"LRSchedule.warmup_steps ({self.warmup_steps}) must be a multiple of "
                f"LRSchedule.reference_step_size ({self.reference_step_size}) for kind='reference'"
            )

    @property
    def epochs(self) -> float:
        """Run length in epochs, total_steps / steps_per_epoch (the reference's cosine period)."""
        return self.total_steps / self.steps_per_epoch

    def __call__(self, step: int) -> float:
        """The learning rate to use for the optimiser update at global step `step` (0-based)."""
        step = _check_step(step)
        if self.kind == "cosine":
            return self._cosine(step)
        return self._reference(step)

    def _cosine_between(self, fraction: float) -> float:
        fraction = min(max(fraction, 0.0), 1.0)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * fraction))

    def _cosine(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        return self._cosine_between((step - self.warmup_steps) / (self.total_steps - self.warmup_steps))

    def _reference(self, step: int) -> float:
        epoch, _ = divmod(step, self.steps_per_epoch)
        if epoch >= 1:
            # timm with cycle_limit=1 returns min_lr once the cycle (E epochs) is over.
            return self.min_lr if epoch >= self.epochs else self._cosine_between(epoch / self.epochs)
        warmup_t = self.warmup_steps // self.reference_step_size
        # The update after iteration j (j % S == 0, j <= warmup_steps) is first used at iteration j + 1.
        k = min(max(step - 1, 0) // self.reference_step_size, warmup_t)
        if k >= warmup_t:
            return self.lr  # cos(0) = 1: the cosine's start, exactly the peak
        return self.warmup_lr + k * (self.lr - self.warmup_lr) / warmup_t


def alpha_at(step: int, steps_per_epoch: int, alpha: float, warm_up: bool = True) -> float:
    """Distillation weight α at global step `step`.

    With `warm_up`, α ramps linearly over epoch 0, ``alpha · min(1, step / steps_per_epoch)`` (0 at the first
    step), and is `alpha` from epoch 1 on; without it, `alpha` throughout.
    """
    step = _check_step(step)
    if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be an int >= 1, got {steps_per_epoch!r}")
    if not warm_up or step >= steps_per_epoch:
        return float(alpha)
    return float(alpha) * step / steps_per_epoch


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to `lr` (times the group's optional ``lr_scale``).

    ``lr_scale`` lets a caller give some groups a fixed multiple of the schedule (e.g. a larger rate on
    new heads when fine-tuning) without a second schedule. A tensor-valued lr (capturable/fused optimisers)
    is updated in place so that a captured graph keeps seeing the same storage.
    """
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value
