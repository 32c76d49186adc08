"""Wiring shared by every training command: a recipe's optimisation fields -> optimizer, schedule, engine;
and the steps every fine-tuning task takes (`start_task_run`, `load_task_model`, `write_run_config`,
`train_task`).

Every recipe (pretraining, retrieval, VQA, ...) carries the same optimisation and run fields (lr, warm-up,
schedule kind, weight decay, precision, accumulation, checkpointing, logging cadence), so the engine is
built from any of them in one place.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import model_from_checkpoint, read_checkpoint, save_checkpoint
from ..distributed import get_rank, get_world_size, init_from_env, is_distributed
from ..models.simla import SimlaBackbone
from ..data.pretrain_data import derive_seed
from ..tokenizers.text import get_tokenizer
from .engine import Engine, EngineConfig, ResumableData
from .compile import compile_blocks
from .optim import build_optimizer
from .recipe import TrainingRecipe
from .task_recipe import FinetuneRecipe
from .schedule import LRSchedule, alpha_at


def build_engine(model: SimlaBackbone, recipe: TrainingRecipe, data: ResumableData, output_dir: Path, device: torch.device,
                 prepare: Callable[[dict[str, Any]], dict[str, Any]],
                 on_step: Callable[[int], None] | None = None) -> Engine:
    """Move the model, build AdamW, the LR and alpha schedules, DDP when distributed, and the engine."""
    model.to(device)
    if recipe.freeze_vision_encoder:
        model.visual_encoder.requires_grad_(False)  # left out of the optimizer; its teacher stays equal to it
    if recipe.grad_checkpointing:
        model.visual_encoder.set_grad_checkpointing(True)
        model.text_encoder.set_grad_checkpointing(True)
    if recipe.compile:
        compile_blocks(model)
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
            find_unused_parameters=model.has_unused_parameters)
    config = EngineConfig(
        output_dir=output_dir, total_steps=total_steps, grad_accum_steps=recipe.grad_accum_steps,
        precision=recipe.precision, grad_clip=recipe.grad_clip, log_every=recipe.log_every,
        save_every=recipe.save_every, progress=recipe.progress, tensorboard=recipe.tensorboard,
        samples_per_micro_batch=recipe.batch_size, max_bad_fraction=recipe.max_bad_fraction,
        description=recipe.TASK)
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


# ------------------------------------------------------------------------------ fine-tuning tasks
@dataclass
class TaskRun:
    """Where and how a fine-tuning run happens: device, rank, run folder, and the checkpoint to resume."""

    device: torch.device
    rank: int
    world: int
    output_dir: Path
    resume: Path | None
    data_seed: int = 0  # the seed of the training data's order (the recipe's seed in its task's stream)

    @property
    def rank0(self) -> bool:
        return self.rank == 0


def start_task_run(recipe: FinetuneRecipe) -> TaskRun:
    """Join torchrun's group (if any), make the run folder, seed this rank, find the checkpoint to resume."""
    device = init_from_env(recipe.device)
    rank, world = get_rank(), get_world_size()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(recipe.seed + rank)
    torch.manual_seed(recipe.seed + rank)
    resume = None
    if recipe.resume is not None:
        resume = out / "checkpoints" / "last.pt" if recipe.resume == "auto" else Path(recipe.resume)
        resume = resume if resume.is_file() else None
    return TaskRun(device, rank, world, out, resume, derive_seed(recipe.seed, recipe.SEED_STREAM))


def load_task_model(recipe: FinetuneRecipe, run: TaskRun) -> SimlaBackbone:
    """The model of the recipe's task at the recipe's resolution, from the run's checkpoint (resume) or
    `recipe.checkpoint`.

    The source may be a pretraining checkpoint, one of the task's own, an export directory or a reference
    .pth; position embeddings are resampled, the task model derives what it initialises from the source
    (e.g. the VQA decoder), everything else loads strictly with a report. A fresh run's momentum teachers
    then copy the loaded weights (never the other way round, as the reference does for some tasks). Its
    tokenizer is the recipe's, or the checkpoint's own.
    """
    source = str(run.resume or recipe.checkpoint)
    data = read_checkpoint(source, trust_pickle=recipe.trust_pickle)
    model = model_from_checkpoint(data, source=source, task=recipe.TASK, image_size=recipe.image_size,
                                  **recipe.model_config)
    if run.resume is None:
        model.copy_params_to_momentum()
    model.tokenizer = get_tokenizer(recipe.tokenizer or model.config.text.tokenizer)
    return model


def write_run_config(run: TaskRun, recipe: TrainingRecipe, model: SimlaBackbone) -> None:
    """config.yaml in the run folder: the recipe and the resolved model config."""
    if run.rank0:
        (run.output_dir / "config.yaml").write_text(
            yaml.safe_dump({"recipe": recipe.to_dict(), "model": model.config.to_dict()}, sort_keys=False),
            encoding="utf-8")


def train_task(run: TaskRun, model: SimlaBackbone, recipe: FinetuneRecipe, data: ResumableData,
               on_step: Callable[[int], None] | None = None) -> Engine:
    """Train with the shared engine (logs, checkpoints, exact resume); batches are moved to the device."""
    device = run.device
    engine = build_engine(model, recipe, data, run.output_dir, device, on_step=on_step,
                          prepare=lambda batch: {k: v.to(device, non_blocking=True) for k, v in batch.items()})
    if run.resume is not None:
        engine.load_training_state(read_checkpoint(run.resume)["train_state"])
    engine.fit()
    return engine
