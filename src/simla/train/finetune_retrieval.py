"""`simla finetune retrieval`: fine-tune ITC + ITM on (image, caption, image_id) from a pretraining checkpoint.

The checkpoint's position embeddings are resampled to the fine-tuning resolution (256 -> 384 px), the
pretraining-only heads are left out (reported), and the momentum teachers copy the loaded weights
(not the other way round, as the reference does for some tasks). The training loop is the shared engine, so logs, checkpoints and exact resume work as in
pretraining. With a `test_file`, the run ends with a retrieval evaluation written to results.json.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from ..data.pretrain_data import AnnotationData, CaptionBatches, EpochBatchPlan, derive_seed
from ..data.retrieval import FinetuneView, RetrievalSampleBuilder, read_retrieval_eval, read_retrieval_train
from ..distributed import finish
from ..eval.metrics import format_table
from ..eval.retrieval import evaluate_retrieval
from ..tokenizers.text import get_tokenizer
from .recipe import check_model_overrides, field_
from .runner import load_task_model, start_task_run, train_task, write_run_config

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
        check_model_overrides(self.model_config)
        for name in ("batch_size", "grad_accum_steps", "epochs", "save_every", "log_every", "k_test", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def run_retrieval_finetune(recipe: RetrievalRecipe) -> dict[str, Any]:
    recipe.validate()
    run = start_task_run(recipe)
    model = load_task_model(recipe, run, "retrieval")
    tokenizer = get_tokenizer(recipe.tokenizer or model.config.text.tokenizer)
    model.tokenizer = tokenizer
    records = read_retrieval_train(recipe.train_file, recipe.image_root)
    test = read_retrieval_eval(recipe.test_file, recipe.image_root) if recipe.test_file else None
    seed = derive_seed(recipe.seed, 11)
    builder = RetrievalSampleBuilder(FinetuneView(recipe.image_size, randaugment=recipe.randaugment))
    data = AnnotationData(CaptionBatches(records, builder, tokenizer, recipe.max_text_length, seed),
                          EpochBatchPlan(len(records), recipe.batch_size, seed, run.rank, run.world), recipe.num_workers)
    write_run_config(run, recipe, model)
    engine = train_task(run, model, recipe, data)
    results: dict[str, Any] = {"step": engine.state.step}
    if test is not None:
        metrics = evaluate_retrieval(model, test, k=recipe.k_test, tokenizer=tokenizer,
                                     progress=recipe.progress and run.rank0, num_workers=recipe.num_workers)
        results.update(metrics)
        if run.rank0:
            (run.output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
            logger.info("test retrieval after fine-tuning:\n%s", format_table(metrics))
    finish()
    return results
