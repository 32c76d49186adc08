"""VQA evaluation: rank the candidate answers of every question, write the EvalAI result file and, when the
questions carry ground truth, the official VQA accuracy.

Questions are split across ranks without padding and gathered (`simla.eval.sharding`), so every question
appears exactly once in results.json under torchrun too. A question whose image cannot be read is still answered, from a blank image,
and counted in metrics.json: the result file is always complete and no accuracy is computed over a
silently shrunken set.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.transforms import EvalView
from ..checkpoint import model_from_checkpoint, read_checkpoint
from ..data.vqa import VQAEvalSet, check_overlap, load_eval_image, read_answer_list, read_vqa_eval, read_vqa_train
from ..distributed import all_gather_objects, evaluation_group, get_rank
from ..models.vqa import AnswerCandidates, SimlaForVQA
from ..tokenizers.text import get_tokenizer
from .command import Evaluation, Option, checkpoint_options, size_override
from .sharding import eval_loader, gather_in_order, this_rank_share
from .vqa_accuracy import VQAGroundTruth, format_vqa_table, vqa_accuracy

logger = logging.getLogger(__name__)


class _Questions(Dataset):
    def __init__(self, data: VQAEvalSet, indices: list[int], view: EvalView) -> None:
        self.data, self.indices, self.view = data, indices, view

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        index = self.indices[i]
        pixels, problem = load_eval_image(self.data.images[index], self.view)
        return index, pixels, problem or ""


@torch.no_grad()
def predict_answers(model: SimlaForVQA, data: VQAEvalSet, candidates: AnswerCandidates, *, k: int | None = None,
                    batch_size: int = 32, num_workers: int = 2, progress: bool = False,
                    top: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one prediction per question in file order, run facts). A prediction holds question_id, answer,
    probability and, with top > 1, the `top` best answers with their probabilities."""
    questions = _Questions(data, this_rank_share(len(data)), EvalView(model.config.vision.image_size))
    loader = eval_loader(questions, batch_size=batch_size, num_workers=num_workers, progress=progress,
                         desc="questions")
    was_training = model.training
    model.eval()
    device = model.device
    candidates = candidates.to(device)
    max_length = model.config.objectives.max_text_length
    predictions, unreadable = [], []
    started = time.perf_counter()
    for indices, pixels, problems in loader:
        questions = model.tokenizer([data.questions[i] for i in indices.tolist()], max_length=max_length, clean=False)
        q_ids, q_mask = questions.input_ids.to(device), questions.attention_mask.to(device)
        states = model.encode_question(pixels.to(device), q_ids, q_mask)
        ranked, scores = model.rank_answers(states, q_mask, candidates, k=k)
        probabilities = scores.softmax(-1)
        for row, index in enumerate(indices.tolist()):
            best = ranked[row, :top].tolist()
            prediction = {"index": index, "question_id": data.question_ids[index],
                          "answer": candidates.answers[best[0]], "probability": float(probabilities[row, 0])}
            if top > 1:
                prediction["top"] = [[candidates.answers[a], float(p)] for a, p in zip(best, probabilities[row, :top].tolist())]
            predictions.append(prediction)
            if problems[row]:
                unreadable.append({"image": data.images[index], "question_id": data.question_ids[index],
                                   "problem": problems[row]})
    seconds = time.perf_counter() - started
    model.train(was_training)
    merged = gather_in_order(predictions)
    bad = [u for part in all_gather_objects(unreadable) for u in part]
    for item in bad:
        logger.warning("unreadable image %s (question %s, %s): answered from a blank image",
                       item["image"], item["question_id"], item["problem"])
    slowest = max(all_gather_objects(seconds))
    facts = {"questions": len(merged), "unreadable_images": len(bad), "unreadable": bad[:20],
             "seconds": round(slowest, 2), "questions_per_second": round(len(merged) / slowest, 1) if slowest else None}
    return [{k: v for k, v in p.items() if k != "index"} for p in merged], facts


def evaluate_vqa(model: SimlaForVQA, data: VQAEvalSet, answer_list: list[str], output: str | Path | None = None, *,
                 k: int | None = None, batch_size: int = 32, num_workers: int = 2, progress: bool = False,
                 split: str | None = None) -> dict[str, Any]:
    """Answer every question; write OUT/results.json (EvalAI form) and OUT/metrics.json on rank 0.

    Returns the metrics: the run facts, and the official accuracy overall and per answer/question type
    when every question has ground-truth answers.
    """
    candidates = model.answer_candidates(answer_list)
    predictions, facts = predict_answers(model, data, candidates, k=k, batch_size=batch_size,
                                         num_workers=num_workers, progress=progress)
    metrics: dict[str, Any] = {"split": split or Path(data.source).stem, **facts,
                               "k_test": min(k or model.config.vqa.k_test, len(answer_list)),
                               "answer_scoring": model.config.vqa.answer_scoring}
    if data.has_answers:
        truth = [VQAGroundTruth(q, a, t, qt) for q, a, t, qt in
                 zip(data.question_ids, data.answers, data.answer_types, data.question_types)]
        metrics.update(vqa_accuracy({p["question_id"]: p["answer"] for p in predictions}, truth))
    if output is not None and get_rank() == 0:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        results = [{"question_id": p["question_id"], "answer": p["answer"]} for p in predictions]
        (out / "results.json").write_text(json.dumps(results), encoding="utf-8")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def describe(metrics: dict[str, Any]) -> str:
    """A printable summary: the accuracy table when there is ground truth, and the run facts."""
    lines = []
    if "accuracy" in metrics:
        lines.append(format_vqa_table(metrics))
    lines.append(f"{metrics['questions']} questions answered ({metrics['unreadable_images']} from unreadable "
                 f"images), {metrics['questions_per_second']} questions/s, k_test {metrics['k_test']}")
    return "\n".join(lines)


def evaluate_vqa_checkpoint(*, checkpoint: str, data: str, answers: str, output: str,
                            image_root: str | None = None, k: int | None = None, answer_scoring: str | None = None,
                            image_size: int | None = None, tokenizer: str | None = None, batch_size: int = 32,
                            num_workers: int = 2, device: str = "auto", trust_pickle: bool = False,
                            train_file: list[str] | None = None, allow_overlap: bool = False) -> tuple[dict, str]:
    """`simla evaluate vqa`: every file is checked before the model is built; returns (metrics, summary text).
    Under torchrun the questions are split across the processes."""
    questions = read_vqa_eval(data, image_root)
    candidates = read_answer_list(answers)
    stored = read_checkpoint(checkpoint, trust_pickle=trust_pickle)
    train_files = train_file
    if not train_files and stored.get("task") == "vqa":
        train_files = _recipe_train_files(stored.get("recipe"))
    if train_files:
        check_overlap(questions, read_vqa_train(train_files), allow_overlap)
    with evaluation_group(device) as chosen:
        overrides = size_override(image_size)
        if answer_scoring:
            overrides["answer_scoring"] = answer_scoring
        model = model_from_checkpoint(stored, source=checkpoint, task="vqa", **overrides)
        if tokenizer:
            model.tokenizer = get_tokenizer(tokenizer)
        model.to(chosen)
        rank0 = get_rank() == 0
        metrics = evaluate_vqa(model, questions, candidates, output, k=k, batch_size=batch_size, num_workers=num_workers,
                               progress=rank0)
    text = f"{describe(metrics)}\nwrote {Path(output) / 'results.json'} and metrics.json" if rank0 else ""
    return metrics, text


def _recipe_train_files(recipe: dict[str, Any] | None) -> list[str]:
    """The training files a fine-tuned checkpoint names, where they still exist (for the overlap check)."""
    if not recipe or not recipe.get("train_file"):
        return []
    files = recipe["train_file"] if isinstance(recipe["train_file"], list) else [recipe["train_file"]]
    present = [f for f in files if Path(f).is_file()]
    if len(present) < len(files):
        logger.warning("cannot check question overlap against missing training file(s) %s",
                       sorted(set(files) - set(present)))
    return present


VQA_EVALUATION = Evaluation(
    help="answer questions by ranking an answer list; EvalAI results.json and, with ground truth, the official "
         "VQA accuracy",
    run=evaluate_vqa_checkpoint,
    options=(
        Option("--data", "eval JSON: [{image, question, question_id[, answer: [...]]}]", required=True),
        Option("--answers", "JSON list of candidate answers (answer_list.json)", required=True),
        Option("--output", "folder for results.json and metrics.json", required=True),
        Option("--k", "candidates re-scored with the whole answer (default: the model's vqa.k_test, paper 128)",
               type=int),
        Option("--answer-scoring", "'reference' counts the first token's log-probability twice, as the authors' "
               "code (default: the model's, 'simla')", choices=("simla", "reference")),
        Option("--train-file", "training JSON to check for question overlap (default: the checkpoint's recipe)",
               repeatable=True),
        Option("--allow-overlap", "evaluate even when questions of --data were trained on", switch=True),
        *checkpoint_options("a VQA checkpoint", batch_size=32, per="questions"),
    ))
