"""`simla finetune vqa`: fine-tune the answer decoder (and everything below it) on VQA questions.

From a pretraining checkpoint the decoder is initialised from the encoder's top layers (see
`simla.models.vqa`); the training loop is the shared engine (run folder, log.jsonl, atomic checkpoints,
exact resume, torchrun). With `test_file` and `answer_list` the run ends with an evaluation written to
results.json (EvalAI form) and metrics.json (official accuracy when the file has answers).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..data.pretrain_data import AnnotationData, CaptionBatches, EpochBatchPlan
from ..data.vqa import (VQARecord, VQASampleBuilder, check_overlap, collate_vqa, read_answer_list, read_vqa_eval,
                        read_vqa_train)
from ..distributed import finish
from ..eval.vqa import describe, evaluate_vqa
from .recipe import field_
from .runner import load_task_model, start_task_run, train_task, write_run_config
from .task_recipe import FinetuneRecipe

logger = logging.getLogger(__name__)


@dataclass
class VQARecipe(FinetuneRecipe):
    checkpoint: str = field_("", "pretraining (or VQA) checkpoint: ours, an export directory or a reference .pth")
    model_config: dict = field_({}, "model config overrides, e.g. model_config.decoder_layers=6 or model_config.k_test=128")
    train_file: str | list[str] = field_("", "train JSON(s): [{image, question, answer: [..] | str, dataset: vqa|vg}]")
    test_file: str | None = field_(None, "eval JSON [{image, question, question_id[, answer]}] answered at the end")
    image_root: str | None = field_(None, "directory that relative VQA image paths are joined to")
    vg_image_root: str | None = field_(None, "directory for records tagged dataset: vg (default: image_root)")
    answer_list: str | None = field_(None, "JSON list of candidate answers (needed with test_file)")
    allow_overlap: bool = field_(False, "evaluate even when test questions also occur in train_file")
    max_question_length: int = field_(25, "question tokens incl. [CLS] (the reference truncates at 25)")
    batch_size: int = field_(32, "questions per process per step")
    epochs: int = field_(8, "epochs (paper: 8)")
    warmup_steps: int = field_(400, "warm-up steps (reference: 4 'epochs' of 100 iterations)")
    eval_batch_size: int = field_(16, "questions per forward at evaluation")
    output_dir: str = field_("runs/vqa", "run folder")

    TASK: ClassVar[str] = "vqa"
    SEED_STREAM: ClassVar[int] = 12
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("max_question_length",)

    def validate(self) -> None:
        super().validate()
        if self.test_file and not self.answer_list:
            raise ValueError("answer_list: required with test_file (the candidates answers are ranked from)")


def read_training_questions(recipe: VQARecipe) -> list[VQARecord]:
    return read_vqa_train(recipe.train_file, recipe.image_root, recipe.vg_image_root or recipe.image_root)


def run_vqa_finetune(recipe: VQARecipe, on_step: Callable[[Any, int], None] | None = None) -> dict[str, Any]:
    """Fine-tune (and evaluate, with test_file); `on_step(model, step)` runs after every optimizer step."""
    recipe.validate()
    # Read and check every file before any model is built.
    records = read_training_questions(recipe)
    test = read_vqa_eval(recipe.test_file, recipe.image_root) if recipe.test_file else None
    answers = read_answer_list(recipe.answer_list) if recipe.answer_list else None
    if test is not None:
        check_overlap(test, records, recipe.allow_overlap)
    run = start_task_run(recipe)
    model = load_task_model(recipe, run)
    seed = run.data_seed
    collate = functools.partial(collate_vqa, sep_token_id=model.config.text.sep_token_id)
    batches = CaptionBatches(records, VQASampleBuilder(recipe.train_view()), model.tokenizer,
                             recipe.max_question_length, seed, collate_fn=collate)
    data = AnnotationData(batches, EpochBatchPlan(len(records), recipe.batch_size, seed, run.rank, run.world),
                          recipe.num_workers)
    write_run_config(run, recipe, model)
    engine = train_task(run, model, recipe, data,
                        (lambda step: on_step(model, step)) if on_step is not None else None)
    results: dict[str, Any] = {"step": engine.state.step}
    if test is not None and answers is not None:
        metrics = evaluate_vqa(model, test, answers, Path(recipe.output_dir), batch_size=recipe.eval_batch_size,
                               num_workers=recipe.num_workers, progress=recipe.progress and run.rank0)
        results["metrics"] = metrics
        if run.rank0:
            logger.info("VQA after fine-tuning:\n%s", describe(metrics))
    finish()
    return results
