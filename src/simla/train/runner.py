"""Wiring shared by every training command: a recipe's optimisation fields -> optimizer, schedule, engine.

Both `PretrainRecipe` and `RetrievalRecipe` carry the same optimisation and run fields (lr, warm-up,
schedule kind, weight decay, precision, accumulation, checkpointing, logging cadence), so the engine is
built from either in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import save_checkpoint
from ..distributed import is_distributed
from ..models.simla import SimlaModel
from .engine import Engine, EngineConfig, ResumableData
from .optim import build_optimizer
from .schedule import LRSchedule, alpha_at


def build_engine(model: SimlaModel, recipe: Any, data: ResumableData, output_dir: Path, device: torch.device,
                 prepare: Callable[[dict[str, Any]], dict[str, Any]],
                 on_step: Callable[[int], None] | None = None) -> Engine:
    """Move the model, build AdamW, the LR and alpha schedules, DDP when distributed, and the engine."""
    model.to(device)
    if recipe.grad_checkpointing:
        model.visual_encoder.set_grad_checkpointing(True)
        model.text_encoder.set_grad_checkpointing(True)
    optimizer = build_optimizer(model, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = max(1, data.steps_per_epoch // recipe.grad_accum_steps)
    total_steps = recipe.max_steps or recipe.epochs * steps_per_epoch
    # The reference staircase counts warm-up in whole hundreds and may outlast a short run; the cosine
    # schedule needs its warm-up to fit inside the run.
    warmup = recipe.warmup_steps if recipe.lr_schedule == "reference" else min(recipe.warmup_steps, total_steps)
    schedule = LRSchedule(lr=recipe.lr, warmup_lr=recipe.warmup_lr, min_lr=recipe.min_lr, warmup_steps=warmup,
                          total_steps=total_steps, steps_per_epoch=steps_per_epoch, kind=recipe.lr_schedule)
    alpha = model.config.objectives.alpha
    wrapped: torch.nn.Module = model
    if is_distributed():
        # Queues are written identically on every rank from all-gathered features: no buffer broadcast.
        # A model that leaves some trained parameter without gradient in a step (an ablation without ITC or
        # ITM) says so; DDP then looks for unused parameters instead of waiting for their gradients.
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False,
            find_unused_parameters=bool(getattr(model, "has_unused_parameters", False)))
    config = EngineConfig(
        output_dir=output_dir, total_steps=total_steps, grad_accum_steps=recipe.grad_accum_steps,
        precision=recipe.precision, grad_clip=recipe.grad_clip, log_every=recipe.log_every,
        save_every=recipe.save_every, progress=recipe.progress, tensorboard=recipe.tensorboard,
        samples_per_micro_batch=recipe.batch_size, max_bad_fraction=getattr(recipe, "max_bad_fraction", 1.0))
    return Engine(
        model, optimizer, data, config,
        lr_at=schedule,
        forward_kwargs_at=lambda step: {"alpha": alpha_at(step, steps_per_epoch, alpha, recipe.alpha_warmup)},
        prepare=prepare,
        save=lambda path, extra: save_checkpoint(model, path, recipe=recipe.to_dict(), **extra),
        device=device,
        wrapped=wrapped,
        on_step=on_step,
    )
