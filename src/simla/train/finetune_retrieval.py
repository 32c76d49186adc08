"""`simla finetune retrieval`: fine-tune ITC + ITM on (image, caption, image_id) from a pretraining checkpoint.

The checkpoint's position embeddings are resampled to the fine-tuning resolution (256 -> 384 px), the
pretraining-only heads are left out (reported), and the momentum teachers copy the loaded weights
(not the other way round, as the reference does for some tasks). The training loop is the shared engine, so logs, checkpoints and exact resume work as in
pretraining. With a `test_file`, the run ends with a retrieval evaluation written to results.json.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from ..checkpoint import load_state_into, read_checkpoint
from ..config import SimlaConfig, apply_overrides
from ..data.pretrain_data import AnnotationData, CaptionBatches, EpochBatchPlan, derive_seed
from ..data.retrieval import FinetuneView, RetrievalSampleBuilder, read_retrieval_eval, read_retrieval_train
from ..distributed import finish, get_rank, get_world_size, init_from_env
from ..eval.metrics import format_table
from ..eval.retrieval import evaluate_retrieval
from ..factory import build_model
from ..models.retrieval import SimlaForRetrieval
from ..tokenizers.text import get_tokenizer
from .recipe import field_
from .runner import build_engine

logger = logging.getLogger(__name__)


@dataclass
class RetrievalRecipe:
    checkpoint: str = field_("", "pretraining (or retrieval) checkpoint: ours, an export directory or a reference .pth")
    trust_pickle: bool = field_(False, "allow unpickling reference checkpoints (trusted files only)")
    model_config: dict = field_({}, "model config overrides, e.g. model_config.queue_size=57600")
    image_size: int = field_(384, "fine-tuning resolution (position embeddings are resampled)")
    tokenizer: str | None = field_(None, "text tokenizer (dir or hub name); default: the checkpoint's")
    train_file: str = field_("", "train JSON: [{image, caption, image_id}]")
    test_file: str | None = field_(None, "eval JSON [{image, caption: [...]}] evaluated at the end (results.json)")
    image_root: str | None = field_(None, "directory that relative image paths are joined to")
    max_text_length: int = field_(30, "caption tokens incl. [CLS] (the reference's max_length 30, truncated)")
    num_workers: int = field_(4, "dataloader worker processes")
    randaugment: bool = field_(True, "RandAugment on the training view")
    batch_size: int = field_(32, "pairs per process per step")
    grad_accum_steps: int = field_(1, "micro-batches accumulated per optimizer step")
    epochs: int = field_(5, "epochs (COCO 5, Flickr30K 10)")
    max_steps: int | None = field_(None, "stop after this many optimizer steps")
    lr: float = field_(1e-5, "peak learning rate")
    warmup_lr: float = field_(1e-5, "learning rate at step 0")
    min_lr: float = field_(1e-6, "final learning rate")
    warmup_steps: int = field_(100, "warm-up steps (reference: 1 'epoch' of 100 iterations)")
    lr_schedule: Literal["cosine", "reference"] = field_("cosine", "'cosine' per step, or the reference staircase")
    weight_decay: float = field_(0.02, "AdamW weight decay")
    grad_clip: float | None = field_(None, "gradient-norm clipping (null: none)")
    alpha_warmup: bool = field_(True, "ramp distillation alpha over the first epoch")
    precision: Literal["fp32", "bf16"] = field_("fp32", "fp32 or bf16 autocast")
    grad_checkpointing: bool = field_(False, "recompute activations to save memory")
    k_test: int = field_(256, "ITC candidates re-scored by ITM at evaluation (COCO 256, Flickr 128)")
    output_dir: str = field_("runs/retrieval", "run folder")
    save_every: int = field_(500, "checkpoint every N steps (and at the end)")
    log_every: int = field_(50, "log every N steps")
    seed: int = field_(42, "random seed")
    resume: str | None = field_(None, "'auto' or a checkpoint path to continue an interrupted run")
    tensorboard: bool = field_(False, "also write TensorBoard events")
    device: str = field_("auto", "'auto', 'cpu' or 'cuda'")
    progress: bool = field_(True, "progress bars")

    def validate(self) -> None:
        if not self.checkpoint and self.resume is None:
            raise ValueError("checkpoint: required (the pretraining checkpoint to fine-tune)")
        if not self.train_file:
            raise ValueError("train_file: required")
        for name in ("batch_size", "grad_accum_steps", "epochs", "save_every", "log_every", "k_test", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def build_retrieval_model(recipe: RetrievalRecipe, source: str) -> SimlaForRetrieval:
    """The retrieval model at the fine-tuning resolution, loaded from `source` with a full report."""
    data = read_checkpoint(source, trust_pickle=recipe.trust_pickle)
    if data.get("format") == "simla":
        config = SimlaConfig.from_dict(data["config"])
    else:
        from ..checkpoint import infer_reference_config

        config = infer_reference_config(data["model"])
    apply_overrides(config, {"vision.image_size": recipe.image_size, "vision.use_mask_token": False,
                             **recipe.model_config})
    config.validate()
    model = build_model(config, "retrieval")
    state = {k: v for k, v in data["model"].items()
             if not (k in ("image_queue", "text_queue") and v.shape[1] != config.objectives.queue_size)}
    load_state_into(model, state, source=str(source))
    return model


def run_retrieval_finetune(recipe: RetrievalRecipe) -> dict[str, Any]:
    recipe.validate()
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
    model = build_retrieval_model(recipe, str(resume or recipe.checkpoint))
    if resume is None:
        model.copy_params_to_momentum()  # teachers start from the loaded weights, not from fresh ones
    tokenizer = get_tokenizer(recipe.tokenizer or model.config.text.tokenizer)
    model.tokenizer = tokenizer
    records = read_retrieval_train(recipe.train_file, recipe.image_root)
    test = read_retrieval_eval(recipe.test_file, recipe.image_root) if recipe.test_file else None
    seed = derive_seed(recipe.seed, 11)
    builder = RetrievalSampleBuilder(FinetuneView(recipe.image_size, randaugment=recipe.randaugment))
    data = AnnotationData(CaptionBatches(records, builder, tokenizer, recipe.max_text_length, seed),
                          EpochBatchPlan(len(records), recipe.batch_size, seed, rank, world), recipe.num_workers)
    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump({"recipe": recipe.to_dict(), "model": model.config.to_dict()},
                                                         sort_keys=False), encoding="utf-8")
    engine = build_engine(model, recipe, data, out, device,
                          prepare=lambda batch: {k: v.to(device, non_blocking=True) for k, v in batch.items()})
    if resume is not None:
        engine.load_training_state(read_checkpoint(resume)["train_state"])
    engine.fit()
    results: dict[str, Any] = {"step": engine.state.step}
    if test is not None:
        metrics = evaluate_retrieval(model, test, k=recipe.k_test, tokenizer=tokenizer,
                                     progress=recipe.progress and rank == 0, num_workers=recipe.num_workers)
        results.update(metrics)
        if rank == 0:
            (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
            logger.info("test retrieval after fine-tuning:\n%s", format_table(metrics))
    finish()
    return results
