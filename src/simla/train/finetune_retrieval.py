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
from typing import Any, ClassVar

from ..data.pretrain_data import AnnotationData, CaptionBatches, EpochBatchPlan
from ..data.retrieval import (RetrievalRecord, RetrievalSampleBuilder, read_retrieval_eval,
                              read_retrieval_train)
from ..distributed import finish
from ..errors import DataError
from ..eval.metrics import format_table
from ..eval.retrieval import evaluate_retrieval
from .recipe import field_
from .runner import load_task_model, start_task_run, train_task, write_run_config
from .task_recipe import FinetuneRecipe

logger = logging.getLogger(__name__)


@dataclass
class RetrievalRecipe(FinetuneRecipe):
    checkpoint: str = field_("", "pretraining (or retrieval) checkpoint: ours, an export directory or a reference .pth")
    model_config: dict = field_({}, "model config overrides, e.g. model_config.queue_size=57600")
    train_file: str = field_("", "train JSON: [{image, caption, image_id}]")
    test_file: str | None = field_(None, "eval JSON [{image, caption: [...]}] evaluated at the end (results.json)")
    max_text_length: int = field_(30, "caption tokens incl. [CLS] (the reference's max_length 30, truncated)")
    batch_size: int = field_(32, "pairs per process per step")
    epochs: int = field_(5, "epochs (COCO 5, Flickr30K 10)")
    lr: float = field_(1e-5, "peak learning rate")
    k_test: int = field_(256, "ITC candidates re-scored by ITM at evaluation (COCO 256, Flickr 128)")
    output_dir: str = field_("runs/retrieval", "run folder")
    save_every: int = field_(500, "checkpoint every N steps (and at the end)")

    TASK: ClassVar[str] = "retrieval"
    SEED_STREAM: ClassVar[int] = 11
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("k_test", "max_text_length")

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 2:
            raise ValueError(f"batch_size: must be >= 2, got {self.batch_size}: ITM draws each pair's negative from "
                             "the other pairs of its batch, so a batch needs at least two")


def run_retrieval_finetune(recipe: RetrievalRecipe) -> dict[str, Any]:
    recipe.validate()
    records = read_retrieval_train(recipe.train_file, recipe.image_root)
    test = read_retrieval_eval(recipe.test_file, recipe.image_root) if recipe.test_file else None
    run, model, engine = train_image_text(recipe, records)
    results: dict[str, Any] = {"step": engine.state.step}
    if test is not None:
        metrics = evaluate_retrieval(model, test, k=recipe.k_test, tokenizer=model.tokenizer,
                                     batch_size=recipe.eval_batch_size, progress=recipe.progress and run.rank0,
                                     num_workers=recipe.num_workers)
        results.update(metrics)
        if run.rank0:
            (run.output_dir / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
            logger.info("test retrieval after fine-tuning:\n%s", format_table(metrics))
    finish()
    return results


def check_distinct_images(path: str, records: list[RetrievalRecord]) -> None:
    """ITM needs, for every pair, a negative image of another id in its batch: refuse a file of one image
    now, before the model is loaded or the run folder made, instead of failing at the first batch."""
    images = {record.image_id for record in records}
    if len(images) < 2:
        raise DataError(f"{path}: all {len(records)} records show the same image ({records[0].image if records else '-'}); "
                        "expected at least 2 distinct images, as ITM draws each pair's negative image from the "
                        "other images of its batch")


def train_image_text(recipe: RetrievalRecipe, records: list[RetrievalRecord]):
    """Fine-tune ITC + ITM on (image, text, image id) records through the shared engine: (run, model, engine).

    Retrieval and grounding differ only in their records and their training view (`recipe.train_view()`).
    """
    check_distinct_images(recipe.train_file, records)
    run = start_task_run(recipe)
    model = load_task_model(recipe, run)
    seed = run.data_seed
    batches = CaptionBatches(records, RetrievalSampleBuilder(recipe.train_view()), model.tokenizer,
                             recipe.max_text_length, seed)
    data = AnnotationData(batches, EpochBatchPlan(len(records), recipe.batch_size, seed, run.rank, run.world),
                          recipe.num_workers)
    write_run_config(run, recipe, model)
    return run, model, train_task(run, model, recipe, data)
