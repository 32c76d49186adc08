"""`simla finetune nlvr | ve`: fine-tune a classifier on the multimodal [CLS] and pick the best epoch by dev accuracy.

Both tasks run through the shared engine (run folder, log.jsonl, atomic checkpoints, exact resume,
torchrun). At the end of every epoch (or every `eval_every` steps, and at the end of the run) each
evaluation split is scored; the accuracies go to `eval.jsonl` and the log under the split's name, and
`checkpoints/best.pt` is rewritten whenever the first split (dev / val) improves, so the reported best
epoch is the one that really was best. The last evaluation of each split is written as results.json +
metrics.json under `OUT/<split>/`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..checkpoint import read_checkpoint, save_checkpoint
from ..data.classification import PairRecord, PairSampleBuilder, read_nlvr, read_ve
from ..data.pretrain_data import AnnotationData, CaptionBatches, EpochBatchPlan
from ..distributed import finish
from ..eval.classification import describe, evaluate_classifier
from .recipe import field_
from .runner import TaskRun, load_task_model, start_task_run, train_task, write_run_config
from .task_recipe import FinetuneRecipe


logger = logging.getLogger(__name__)


@dataclass
class ClassificationRecipe(FinetuneRecipe):
    eval_files: dict = field_({}, "evaluation splits scored every epoch, name -> file; the first picks best.pt")
    max_text_length: int = field_(40, "sentence tokens incl. [CLS] (sentences are cleaned to 30 words first)")
    eval_every: int | None = field_(None, "score the eval splits every N steps (null: every epoch; always at the end)")

    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("max_text_length",)
    SEED_STREAM: ClassVar[int] = 13
    READER: ClassVar[Callable[..., list[PairRecord]]]

    def validate(self) -> None:
        super().validate()
        if self.eval_every is not None and self.eval_every < 1:
            raise ValueError("eval_every: must be >= 1 or null")
        for name, path in self.eval_files.items():
            if not isinstance(path, str) or not path:
                raise ValueError(f"eval_files.{name}: expected a file path, got {path!r}")


@dataclass
class NLVRRecipe(ClassificationRecipe):
    checkpoint: str = field_("", "text-assignment checkpoint (simla finetune nlvr-ta), or a pretraining one")
    train_file: str | list[str] = field_("", "train JSON: [{images: [left, right], sentence, label: True|False}]")
    eval_files: dict = field_({}, "splits scored every epoch, e.g. {dev: dev.json, test: test.json}; dev picks best.pt")
    batch_size: int = field_(8, "image pairs per process per step (reference: 8 per GPU)")
    epochs: int = field_(10, "epochs (paper: 10)")
    output_dir: str = field_("runs/nlvr", "run folder")

    TASK: ClassVar[str] = "nlvr"
    READER: ClassVar[Callable[..., list[PairRecord]]] = staticmethod(read_nlvr)


@dataclass
class VERecipe(ClassificationRecipe):
    checkpoint: str = field_("", "pretraining (or SNLI-VE) checkpoint")
    train_file: str | list[str] = field_("", "train JSON: [{image: flickr id, sentence, label}]")
    eval_files: dict = field_({}, "splits scored every epoch, e.g. {val: val.json, test: test.json}; val picks best.pt")
    batch_size: int = field_(32, "pairs per process per step")
    warmup_steps: int = field_(1, "warm-up steps (reference: 1)")
    alpha_warmup: bool = field_(False, "alpha is constant from step 0 (reference warm_up: false)")
    output_dir: str = field_("runs/ve", "run folder")

    TASK: ClassVar[str] = "ve"
    READER: ClassVar[Callable[..., list[PairRecord]]] = staticmethod(read_ve)


@dataclass
class _BestTracker:
    """Evaluates the splits, appends eval.jsonl and keeps best.pt for the first split (resume-safe)."""

    run: TaskRun
    recipe: ClassificationRecipe
    splits: dict[str, list[PairRecord]]
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return self.run.output_dir / "eval.jsonl"

    def restore(self, step: int) -> None:
        """After a resume: keep the evaluations up to `step` and the best accuracy among them."""
        if not self.path.is_file():
            return
        kept = [r for r in map(json.loads, self.path.read_text().splitlines()) if r["step"] <= step]
        self.history = kept
        first = next(iter(self.splits), None)
        self.best = max((r["accuracy"] for r in kept if r["split"] == first), default=-1.0)
        if self.run.rank0:
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")

    def __call__(self, model, step: int, epoch: int) -> None:
        for index, (split, records) in enumerate(self.splits.items()):
            metrics = evaluate_classifier(model, records, split, self.run.output_dir / split,
                                          batch_size=self.recipe.eval_batch_size, num_workers=self.recipe.num_workers,
                                          max_length=self.recipe.max_text_length)
            row = {"step": step, "epoch": epoch, "split": split, "accuracy": metrics["accuracy"],
                   "majority_class_accuracy": metrics["majority_class_accuracy"],
                   "unreadable_examples": metrics["unreadable_examples"]}
            self.history.append(row)
            if self.run.rank0:
                with open(self.path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                logger.info("step %d epoch %d %s", step, epoch, describe(metrics))
            if index == 0 and epoch >= 1 and metrics["accuracy"] is not None and \
                    metrics["accuracy"] <= metrics["majority_class_accuracy"] + 1.0:
                # Say so rather than train on at chance (NLVR2 runs are known to sit there silently).
                logger.warning("%s accuracy %.2f%% after %d epoch(s) is no better than always answering the "
                               "majority class (%.2f%%): check the labels, the images (unreadable: %d) and the "
                               "learning rate", split, metrics["accuracy"], epoch + 1, metrics["majority_class_accuracy"],
                               metrics["unreadable_examples"])
            if index == 0 and metrics["accuracy"] is not None and metrics["accuracy"] > self.best:
                self.best = metrics["accuracy"]
                if self.run.rank0:
                    save_checkpoint(model, self.run.output_dir / "checkpoints" / "best.pt", step=step, epoch=epoch,
                                    split=split, accuracy=metrics["accuracy"], recipe=self.recipe.to_dict())


def run_classification_finetune(recipe: ClassificationRecipe,
                                on_step: Callable[[Any, int], None] | None = None) -> dict[str, Any]:
    """Fine-tune NLVR2 or SNLI-VE (the recipe's class says which); returns the evaluation history and best.

    `on_step(model, step)` runs after every optimizer step (after that step's evaluation, if any)."""
    recipe.validate()
    reader = type(recipe).READER
    # Read and check every file before any model is built.
    records = [r for path in _files(recipe.train_file) for r in reader(path, recipe.image_root)]
    splits = {name: reader(path, recipe.image_root) for name, path in recipe.eval_files.items()}
    run = start_task_run(recipe)
    model = load_task_model(recipe, run)
    seed = run.data_seed
    batches = CaptionBatches(records, PairSampleBuilder(recipe.train_view()), model.tokenizer, recipe.max_text_length,
                             seed)
    plan = EpochBatchPlan(len(records), recipe.batch_size, seed, run.rank, run.world)
    data = AnnotationData(batches, plan, recipe.num_workers)
    write_run_config(run, recipe, model)
    tracker = _BestTracker(run, recipe, splits)
    steps_per_epoch = max(1, plan.steps_per_epoch // recipe.grad_accum_steps)
    total = recipe.max_steps or recipe.epochs * steps_per_epoch
    if run.resume is not None:
        tracker.restore(int(read_checkpoint(run.resume)["train_state"]["step"]))

    every = recipe.eval_every or steps_per_epoch

    def after_step(step: int) -> None:
        if splits and (step % every == 0 or step == total):
            tracker(model, step, (step - 1) // steps_per_epoch)
        if on_step is not None:
            on_step(model, step)

    engine = train_task(run, model, recipe, data, after_step)
    finish()
    first = next(iter(splits), None)
    best = max((r for r in tracker.history if r["split"] == first), key=lambda r: r["accuracy"], default=None)
    return {"step": engine.state.step, "evaluations": tracker.history, "best": best}


def _files(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)
