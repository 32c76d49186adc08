"""Accuracy of the NLVR2 and SNLI-VE classifiers: predictions, per-class accuracy and the confusion matrix.

Examples are split across ranks without padding and gathered (`simla.eval.sharding`), so each is counted
exactly once under torchrun. An example whose image cannot be read is counted as WRONG, never
dropped: an accuracy over a silently shrunken set would flatter the model.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..checkpoint import load_checkpoint
from ..data.classification import PairRecord, blank, image_keys, read_nlvr, read_ve
from ..data.images import BadSampleError, load_image
from ..data.transforms import EvalView
from ..distributed import evaluation_group, get_rank
from ..models.classification import SimlaClassifier
from ..tokenizers.text import get_tokenizer
from .command import Evaluation, Option, checkpoint_options, size_override
from .sharding import eval_loader, gather_in_order, this_rank_share

logger = logging.getLogger(__name__)


class _Examples(Dataset):
    def __init__(self, records: list[PairRecord], indices: list[int], view: EvalView) -> None:
        self.records, self.indices, self.view = records, indices, view

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, dict[str, torch.Tensor], str]:
        index = self.indices[i]
        record = self.records[index]
        images, problems = {}, []
        for key, path in zip(image_keys(len(record.images)), record.images):
            try:
                images[key] = self.view(load_image(path))
            except BadSampleError as err:
                images[key] = blank(self.view)
                problems.append(f"{path} ({err.kind}: {err.reason})")
        return index, images, "; ".join(problems)


@torch.no_grad()
def predict(model: SimlaClassifier, records: list[PairRecord], *, batch_size: int = 32, num_workers: int = 2,
            max_length: int = 64, progress: bool = False) -> list[dict[str, Any]]:
    """One prediction per record, in file order: index, label, prediction, probabilities, unreadable."""
    examples = _Examples(records, this_rank_share(len(records)), EvalView(model.config.vision.image_size))
    loader = eval_loader(examples, batch_size=batch_size, num_workers=num_workers, progress=progress,
                         desc=f"{model.TASK} eval")
    was_training = model.training
    model.eval()
    device = model.device
    rows = []
    for indices, images, problems in loader:
        text = model.tokenizer([records[i].sentence for i in indices.tolist()], max_length=max_length, clean=False)
        batch = {key: value.to(device) for key, value in images.items()}
        batch.update(text_ids=text.input_ids.to(device), text_mask=text.attention_mask.to(device))
        probabilities = model.logits(batch).float().softmax(-1).cpu()
        for row, index in enumerate(indices.tolist()):
            rows.append({"index": index, "label": records[index].label,
                         "prediction": int(probabilities[row].argmax()),
                         "probabilities": [round(p, 5) for p in probabilities[row].tolist()],
                         "unreadable": problems[row]})
    model.train(was_training)
    merged = gather_in_order(rows)
    for row in merged:
        if row["unreadable"]:
            logger.warning("%s: unreadable image(s) %s: counted as wrong", records[row["index"]].origin,
                           row["unreadable"])
    return merged


def classification_metrics(predictions: list[dict[str, Any]], classes: tuple[str, ...], split: str) -> dict[str, Any]:
    """Accuracy (unreadable examples count as wrong), per-class accuracy, confusion matrix (rows: true)."""
    confusion = [[0] * len(classes) for _ in classes]
    correct = unreadable = 0
    for p in predictions:
        right = p["prediction"] == p["label"] and not p["unreadable"]
        correct += right
        unreadable += bool(p["unreadable"])
        confusion[p["label"]][p["prediction"]] += 1
    per_class = {}
    for label, name in enumerate(classes):
        members = [p for p in predictions if p["label"] == label]
        hits = sum(p["prediction"] == label and not p["unreadable"] for p in members)
        per_class[name] = {"accuracy": round(100 * hits / len(members), 2) if members else None,
                           "examples": len(members)}
    majority = max((sum(p["label"] == c for p in predictions) for c in range(len(classes))), default=0)
    total = len(predictions)
    return {"split": split, "examples": total, "accuracy": round(100 * correct / total, 2) if total else None,
            "majority_class_accuracy": round(100 * majority / total, 2) if total else None,
            "unreadable_examples": unreadable, "per_class": per_class,
            "confusion": {"classes": list(classes), "matrix": confusion}}


def evaluate_classifier(model: SimlaClassifier, records: list[PairRecord], split: str,
                        output: str | Path | None = None, **kwargs: Any) -> dict[str, Any]:
    """Predict, score, and (rank 0) write OUT/results.json (predictions) and OUT/metrics.json."""
    predictions = predict(model, records, **kwargs)
    metrics = classification_metrics(predictions, model.CLASSES, split)
    if output is not None and get_rank() == 0:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        named = [{**{k: v for k, v in p.items() if k != "unreadable"}, "unreadable": bool(p["unreadable"]),
                  "label_name": model.CLASSES[p["label"]], "prediction_name": model.CLASSES[p["prediction"]]}
                 for p in predictions]
        (out / "results.json").write_text(json.dumps(named), encoding="utf-8")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def describe(metrics: dict[str, Any]) -> str:
    lines = [f"{metrics['split']}: accuracy {metrics['accuracy']}% on {metrics['examples']} examples "
             f"(majority class {metrics['majority_class_accuracy']}%, {metrics['unreadable_examples']} unreadable, "
             "counted wrong)"]
    for name, row in metrics["per_class"].items():
        lines.append(f"  {name:<14} {row['accuracy']}%  ({row['examples']} examples)")
    return "\n".join(lines)


def evaluate_classifier_checkpoint(task: str, *, checkpoint: str, data: str, output: str, image_root: str | None = None,
                                   split: str | None = None, max_text_length: int = 40, image_size: int | None = None,
                                   tokenizer: str | None = None, batch_size: int = 32, num_workers: int = 2,
                                   device: str = "auto", trust_pickle: bool = False) -> tuple[dict[str, Any], str]:
    """`simla evaluate nlvr | ve`: accuracy (per class, confusion matrix) in `output`; under torchrun the
    examples are split across the processes."""
    records = (read_nlvr if task == "nlvr" else read_ve)(data, image_root)
    with evaluation_group(device) as chosen:
        model = load_checkpoint(checkpoint, task=task, trust_pickle=trust_pickle, **size_override(image_size))
        if tokenizer:
            model.tokenizer = get_tokenizer(tokenizer)
        model.to(chosen)
        metrics = evaluate_classifier(model, records, split or Path(data).stem, output, batch_size=batch_size,
                                      num_workers=num_workers, max_length=max_text_length, progress=get_rank() == 0)
    if get_rank() != 0:
        return metrics, ""
    return metrics, f"{describe(metrics)}\nwrote {Path(output) / 'results.json'} and metrics.json"


def classifier_evaluation(task: str, help: str, form: str) -> Evaluation:
    """`simla evaluate nlvr` and `simla evaluate ve` differ only in the task and the data form."""
    return Evaluation(
        help=help,
        run=functools.partial(evaluate_classifier_checkpoint, task),
        options=(
            Option("--data", f"eval JSON: {form}", required=True),
            Option("--output", "folder for results.json (predictions) and metrics.json", required=True),
            Option("--split", "the split's name in metrics.json (default: the data file's stem)"),
            Option("--max-text-length", "sentence tokens incl. [CLS]", type=int, default=40),
            *checkpoint_options(f"a {task} checkpoint", batch_size=32, per="examples"),
        ))


NLVR_EVALUATION = classifier_evaluation("nlvr", "NLVR2 accuracy", "[{images: [left, right], sentence, label: True|False}]")
VE_EVALUATION = classifier_evaluation("ve", "SNLI-VE accuracy, per class and confusion matrix",
                                      "[{image: flickr id, sentence, label: entailment|neutral|contradiction}]")
