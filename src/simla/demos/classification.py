"""`simla demo nlvr` and `simla demo ve`: the demo's pretrained model on two-image reasoning and entailment.

Both build their examples from the labelled easy-VQA images (`simla.demos.statements`): training examples
from the training images, dev and test examples from two disjoint halves of the test images, which the
pretraining never saw. They run the commands' own code paths (`simla finetune nlvr-ta`, `nlvr`, `ve`):
- nlvr: a short text-assignment stage on the pretraining demo's image-caption pairs, then NLVR2
  fine-tuning from its checkpoint;
- ve: SNLI-VE fine-tuning straight from the pretrained model.
The report folder gets report.json (`accuracy` on test, dev accuracy, the majority-class baseline, per
class, the accuracy after every evaluation, the time), report.md, confusion.png and the run folders.

Settings, as measured on a 2-core CPU: NLVR2 fine-tuning keeps the ViT fixed (`freeze_vision_encoder`):
shape is what the small ViT knows least well, and fine-tuning it under a fresh classifier lost more than it
gained: test accuracy 72% after 1,000 steps with it trained, 84% after 750 with it fixed (that run also had
the text-assignment stage draw no same-caption negatives), at half the step time; at a learning rate of
1e-3 the fully trained model sat at chance. SNLI-VE fine-tunes everything at 5e-4.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..train.finetune_classification import NLVRRecipe, VERecipe, run_classification_finetune
from ..train.finetune_nlvr_text_assignment import NLVRTextAssignmentRecipe, run_nlvr_text_assignment
from ..train.recipe import load_recipe
from .common import as_overrides, checkpoint_of, finetune_overrides, pretrained_demo, write_report
from .easy_vqa import label_easy_vqa
from .plots import plot_confusion
from .statements import nlvr_examples, ve_examples


logger = logging.getLogger(__name__)


@dataclass
class ClassificationDemoSettings:
    task: str
    steps: int
    batch_size: int
    lr: float
    train_examples: int
    eval_examples: int  # each of dev and test
    ta_steps: int = 0  # nlvr: text-assignment steps before fine-tuning
    evaluations: int = 4  # dev/test accuracy this many times during the run
    num_workers: int = 1
    pretrain_quick: bool = False
    freeze_vision_encoder: bool = False


SETTINGS = {
    "nlvr": ClassificationDemoSettings("nlvr", steps=2000, batch_size=32, lr=5e-4, train_examples=20000,
                                 eval_examples=1000, ta_steps=150, freeze_vision_encoder=True),
    "ve": ClassificationDemoSettings("ve", steps=1200, batch_size=64, lr=5e-4, train_examples=20000, eval_examples=1000),
}
QUICK = {
    "nlvr": ClassificationDemoSettings("nlvr", steps=30, batch_size=16, lr=5e-4, train_examples=1000, eval_examples=100,
                                 ta_steps=10, evaluations=2, pretrain_quick=True),
    "ve": ClassificationDemoSettings("ve", steps=30, batch_size=32, lr=5e-4, train_examples=1000, eval_examples=100,
                               evaluations=2, pretrain_quick=True),
}


def write_examples(task: str, out: Path, settings: ClassificationDemoSettings, seed: int) -> dict[str, str]:
    """train/dev/test JSON files of the task; dev and test use disjoint halves of easy-VQA's test images."""
    train_items, _ = label_easy_vqa("train")
    test_items, _ = label_easy_vqa("test")
    random.Random(seed).shuffle(test_items)
    half = len(test_items) // 2
    make = nlvr_examples if task == "nlvr" else ve_examples
    files = {}
    for name, items, count, offset in (("train", train_items, settings.train_examples, 0),
                                       ("dev", test_items[:half], settings.eval_examples, 1),
                                       ("test", test_items[half:], settings.eval_examples, 2)):
        path = out / f"{task}_{name}.json"
        path.write_text(json.dumps(make(items, count, seed * 10 + offset)), encoding="utf-8")
        files[name] = str(path)
    return files


def _text_assignment(settings: ClassificationDemoSettings, demo: Path, out: Path, seed: int) -> Path:
    overrides = finetune_overrides(checkpoint_of(demo), out / "nlvr_ta", steps=settings.ta_steps,
                                   batch_size=settings.batch_size, lr=settings.lr, num_workers=settings.num_workers,
                                   seed=seed)
    overrides["train_file"] = str(demo / "train.json")  # the pretraining demo's image-caption pairs
    run_nlvr_text_assignment(load_recipe(None, as_overrides(overrides), cls=NLVRTextAssignmentRecipe))
    return out / "nlvr_ta" / "checkpoints" / "last.pt"


def run_classification_demo(task: str, output: str | Path, *, quick: bool = False, steps: int | None = None,
                      source: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    settings = (QUICK if quick else SETTINGS)[task]
    if steps is not None:
        settings = replace(settings, steps=steps)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    files = write_examples(task, out, settings, seed)
    demo = pretrained_demo(source, out, settings.pretrain_quick, seed)
    seconds: dict[str, float] = {"pretrained_model": round(time.perf_counter() - started, 1)}
    checkpoint = checkpoint_of(demo)
    if settings.ta_steps:
        stage = time.perf_counter()
        checkpoint = _text_assignment(settings, demo, out, seed)
        seconds["text_assignment"] = round(time.perf_counter() - stage, 1)

    stage = time.perf_counter()
    overrides = finetune_overrides(checkpoint, out / task, steps=settings.steps, batch_size=settings.batch_size,
                                   lr=settings.lr, num_workers=settings.num_workers, seed=seed)
    overrides.update(train_file=files["train"], eval_files={"dev": files["dev"], "test": files["test"]},
                     eval_every=max(1, settings.steps // settings.evaluations),
                     freeze_vision_encoder=settings.freeze_vision_encoder)
    recipe = load_recipe(None, as_overrides(overrides), cls=NLVRRecipe if task == "nlvr" else VERecipe)
    result = run_classification_finetune(recipe)
    seconds["fine_tuning"] = round(time.perf_counter() - stage, 1)

    metrics = {split: json.loads((out / task / split / "metrics.json").read_text()) for split in ("dev", "test")}
    test = metrics["test"]
    plot_confusion(torch.tensor(test["confusion"]["matrix"]), test["confusion"]["classes"], out / "confusion.png",
                   title=f"{task} test examples: prediction", xlabel="predicted", ylabel="true label")
    log = [json.loads(line) for line in (out / task / "log.jsonl").read_text().splitlines()]
    seconds["total"] = round(time.perf_counter() - started, 1)
    report: dict[str, Any] = {
        "task": task, "mode": "quick" if quick else "full", "steps": settings.steps,
        "text_assignment_steps": settings.ta_steps, "batch_size": settings.batch_size,
        "examples": {"train": settings.train_examples, "dev": settings.eval_examples, "test": settings.eval_examples},
        "accuracy": test["accuracy"], "dev_accuracy": metrics["dev"]["accuracy"],
        "majority_class_accuracy": test["majority_class_accuracy"], "per_class": test["per_class"],
        "evaluations": result["evaluations"], "best": result["best"],
        "first_loss": log[0]["loss_cls"], "final_loss": log[-1]["loss_cls"],
        "seconds": seconds, "pretrained_checkpoint": str(checkpoint_of(demo)),
    }
    report["summary"] = _summary(report)
    write_report(out, report, f"simla demo {task}", "![test confusion matrix](confusion.png)")
    return report


def _summary(report: dict[str, Any]) -> str:
    name = {"nlvr": "NLVR2-style statements about two images", "ve": "entailment of statements by an image"}
    lines = [f"simla demo {report['task']} ({report['mode']}): {name[report['task']]}; "
             f"{report['steps']} fine-tuning steps of {report['batch_size']}"
             + (f" after {report['text_assignment_steps']} text-assignment steps" if report["text_assignment_steps"] else ""),
             f"test accuracy {report['accuracy']}% (dev {report['dev_accuracy']}%; majority class "
             f"{report['majority_class_accuracy']}%), loss {report['first_loss']:.3f} -> {report['final_loss']:.3f}"]
    for cls, row in report["per_class"].items():
        lines.append(f"  {cls:<14} {row['accuracy']}%  ({row['examples']} examples)")
    lines.append("time: " + ", ".join(f"{k.replace('_', ' ')} {v} s" for k, v in report["seconds"].items()))
    return "\n".join(lines)
