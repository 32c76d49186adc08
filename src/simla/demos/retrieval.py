"""`simla demo` (task `retrieval`): pretrain a small SIMLA offline on easy-VQA shapes, then show what it learned.

Everything it needs ships with simla and the `easy-vqa` package: the images, captioned from the dataset's
own questions and answers ("a red circle"), and the bundled WordPiece vocabulary. The report folder gets:
- report.json / report.md: zero-shot accuracy in both directions (ITC and ITM ranking), ITM accuracy
  against captions that differ in colour only or shape only, the reference retrieval recalls, timings;
- accuracy_curve.png (zero-shot accuracy every few steps on a held-out slice), confusion.png,
  examples.png (test images with their best captions and match probabilities), loss_curves.png;
- pretrain/: the pretraining run folder (config.yaml, log.jsonl, checkpoint).
`--ablation` pretrains the paper's four ablation rows (ITC+ITM; +MLM; +MIM; +PSL) at the same scale and adds
their table.

Why the demo model is set up as it is (DEMO_MODEL below; measured on a 2-core CPU):
- The 8x8 patch grid of simla_tiny (64 px, 8 px patches) barely learns SHAPE: even a supervised 24-class
  probe of that ViT reaches only ~70% after 300 steps, while colour is learned at once; a 12x12 grid reaches
  ~84% and 16x16 ~90%. The demo model sees 48 px images in 4 px patches (12x12).
- Every easy-VQA caption names one of only 24 classes, so a batch of 32 holds many pairs with the same
  caption and the queue holds ~40 copies of each. Treated as negatives (the reference rule), they teach ITM
  that matching pairs do not match (its loss stays near that of a constant guess) and make ITC push an
  image away from its own caption. The demo captions each image once ("a red circle") and sets
  `duplicate_captions: positives`: identical captions are positives of each other in ITC, in the batch and
  in the queue, and are never drawn as ITM negatives. Treating the queued copies as positives too (on top
  of the in-batch ones) took image-to-text accuracy (ITC) from 33% to 93% at 600 steps.
- The run is a few hundred steps long: momentum 0.98 instead of the paper's 0.995 (whose ~200-step memory
  spans the whole run), no dropout (the model underfits; dropout also cost ~10% of the step time) and a
  learning rate of 1e-3.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import LOSS_NAMES
from ..data.retrieval import read_retrieval_eval
from ..eval.metrics import format_table
from ..eval.retrieval import evaluate_retrieval
from ..train.pretrain import run_pretraining
from ..train.recipe import load_recipe
from .easy_vqa import CAPTION_TEMPLATES, ShapeImage, label_easy_vqa, write_pretraining_json, write_retrieval_json
from .evaluation import CLASSES, ShapeProbe, confusion_matrix, itm_pair_accuracy, score_classes, zero_shot_accuracy
from .plots import plot_accuracy_curve, plot_confusion, plot_examples, plot_losses
from .reference import add_quick_notice


logger = logging.getLogger(__name__)

#: simla_tiny with the demo's changes (see the module docstring for why).
DEMO_MODEL: dict[str, Any] = {
    "vision.image_size": 48, "vision.patch_size": 4,
    "mim_num_masked": 42, "mim_min_block": 9,  # the paper's 29% of the grid, blocks of >= 6% of it
    "queue_size": 1024, "momentum": 0.98, "duplicate_captions": "positives",
    "text.hidden_dropout": 0.0, "text.attention_dropout": 0.0,
}

#: The paper's ablation rows (its Table: ITC+ITM; +MLM; +MIM; +PSL).
ABLATION_ROWS: tuple[tuple[str, list[str]], ...] = (
    ("ITC+ITM", ["itc", "itm"]),
    ("+MLM", ["itc", "itm", "mlm"]),
    ("+MIM", ["itc", "itm", "mlm", "mim"]),
    ("+PSL", ["itc", "itm", "mlm", "mim", "psl"]),
)


@dataclass
class DemoSettings:
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    train_images: int | None = None  # None = all labelled training images
    test_images: int | None = None  # None = all labelled test images
    curve_images: int = 200  # held-out slice for the accuracy curve
    curve_points: int = 12
    retrieval_k: int = 32
    kmeans_fit_images: int = 1000
    num_workers: int = 1
    model: dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL))


FULL = DemoSettings()
QUICK = DemoSettings(steps=60, train_images=1000, test_images=200, curve_images=100, curve_points=3,
                     retrieval_k=16, kmeans_fit_images=300)


def _recipe(settings: DemoSettings, train_json: Path, run_dir: Path, seed: int, losses: list[str] | None):
    model = dict(settings.model)
    if losses is not None:
        model["losses"] = losses
    overrides = {
        "model": "simla_tiny", "text_encoder": None, "vision_encoder": None, "tokenizer": "bert-base-uncased",
        "train_file": str(train_json), "output_dir": str(run_dir), "max_steps": settings.steps,
        "batch_size": settings.batch_size, "lr": settings.lr, "warmup_lr": 1e-5, "min_lr": 1e-5,
        "warmup_steps": max(1, settings.steps // 10), "log_every": max(1, settings.steps // 30),
        "save_every": settings.steps, "num_workers": settings.num_workers,
        # Shapes and colours are the whole content, and some shapes are a few pixels wide near an edge:
        # no crop (flips only) and colours untouched, so a caption never names a shape cut out of view.
        "crop_scale_min": 1.0, "randaugment": False, "kmeans_fit_images": settings.kmeans_fit_images,
        "seed": seed, "device": "cpu", "progress": True,
    }
    overrides.update({f"model_config.{k}": v for k, v in model.items()})
    return load_recipe(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def _pretrain(settings: DemoSettings, train_json: Path, run_dir: Path, seed: int, curve_probe: ShapeProbe | None,
              losses: list[str] | None = None):
    """Pretrain; with a probe, record ITC zero-shot accuracy every steps/curve_points steps."""
    curve: list[dict[str, float]] = []
    every = max(1, settings.steps // max(1, settings.curve_points))

    def track(model, step: int) -> None:
        if curve_probe is not None and (step % every == 0 or step == settings.steps):
            scores = score_classes(model, curve_probe, with_itm=False)
            curve.append({"step": step, **zero_shot_accuracy(scores.itc, curve_probe.labels)})

    started = time.perf_counter()
    result = run_pretraining(_recipe(settings, train_json, run_dir, seed, losses), on_step=track)
    return result.model, curve, time.perf_counter() - started


def _evaluate(model, probe: ShapeProbe, test_json: Path, k: int) -> dict[str, Any]:
    scores = score_classes(model, probe)
    metrics = evaluate_retrieval(model, read_retrieval_eval(test_json), k=k, num_workers=0)
    return {
        "zero_shot_accuracy_itm": zero_shot_accuracy(scores.itm, probe.labels),
        "zero_shot_accuracy_itc": zero_shot_accuracy(scores.itc, probe.labels),
        "itm_pair_accuracy": itm_pair_accuracy(scores.itm, probe.labels),
        "retrieval": metrics,
        "_scores": scores,
    }


def _split(seed: int, settings: DemoSettings) -> tuple[list[ShapeImage], list[ShapeImage], dict[str, Any]]:
    train, train_counts = label_easy_vqa("train")
    test, test_counts = label_easy_vqa("test")
    rng = random.Random(seed)
    if settings.train_images:
        train = rng.sample(train, min(len(train), settings.train_images))
    if settings.test_images:
        test = rng.sample(test, min(len(test), settings.test_images))
    return train, test, {"train": train_counts, "test": test_counts}


def run_retrieval_demo(output: str | Path = "runs/demo", *, quick: bool = False, steps: int | None = None,
                       ablation: bool = False, seed: int = 0) -> dict[str, Any]:
    """Pretrain, evaluate, draw and write the report; returns the report dict (with a printable summary)."""
    settings = QUICK if quick else FULL
    if steps is not None:
        settings = DemoSettings(**{**settings.__dict__, "steps": steps, "model": dict(settings.model)})
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    train, test, labelling = _split(seed, settings)
    # One caption per image: with 24 classes, varied wordings of one class would be false ITM negatives.
    train_json = write_pretraining_json(train, out / "train.json", captions_per_image=1, seed=seed,
                                        templates=CAPTION_TEMPLATES[:1])
    test_json = write_retrieval_json(test, out / "test.json", seed=seed)
    image_size = int(settings.model["vision.image_size"])
    probe = ShapeProbe.from_items(test, image_size)
    curve_probe = ShapeProbe.from_items(test[:settings.curve_images], image_size)

    model, curve, pretrain_seconds = _pretrain(settings, train_json, out / "pretrain", seed, curve_probe)
    evaluation_started = time.perf_counter()
    results = _evaluate(model, probe, test_json, settings.retrieval_k)
    scores = results.pop("_scores")
    evaluation_seconds = time.perf_counter() - evaluation_started

    plot_losses(out / "pretrain" / "log.jsonl", out / "loss_curves.png", "SIMLA pretraining on easy-VQA shapes")
    plot_accuracy_curve(curve, out / "accuracy_curve.png", chance=100 / len(CLASSES))
    plot_confusion(confusion_matrix(scores.itm, probe.labels), CLASSES, out / "confusion.png")
    shown = list(range(min(8, len(probe))))
    plot_examples([probe.paths[i] for i in shown], scores.itm[shown], probe.labels[shown], CLASSES,
                  out / "examples.png")

    log = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "steps": settings.steps,
        "train_images": len(train),
        "test_images": len(test),
        "labelling": labelling,
        "model": settings.model,
        **results,
        "accuracy_curve": curve,
        "first_losses": {k: v for k, v in log[0].items() if k.startswith("loss_")},
        "final_losses": {k: v for k, v in log[-1].items() if k.startswith("loss_")},
        "seconds": {"pretraining": round(pretrain_seconds, 1), "evaluation": round(evaluation_seconds, 1)},
    }
    if ablation:
        full_row = {"seconds": round(pretrain_seconds, 1), **results}
        report["ablation"] = _ablation(settings, train_json, test_json, probe, out, seed, full_row)
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)
    report["summary"] = _summary(report)
    add_quick_notice(report, "retrieval")
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(_markdown(report), encoding="utf-8")
    return report


def _ablation(settings: DemoSettings, train_json: Path, test_json: Path, probe: ShapeProbe, out: Path,
              seed: int, full_row: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's ablation rows at demo scale; the last row (all five objectives) is the main run itself."""
    rows = []
    for name, losses in ABLATION_ROWS:
        if set(losses) == set(settings.model.get("losses", LOSS_NAMES)):
            rows.append({"row": name, "losses": losses, **full_row})
            continue
        logger.info("ablation row %s: %s", name, losses)
        model, _, seconds = _pretrain(settings, train_json, out / "ablation" / name.strip("+").lower(), seed,
                                      None, losses=losses)
        results = _evaluate(model, probe, test_json, settings.retrieval_k)
        results.pop("_scores")
        rows.append({"row": name, "losses": losses, "seconds": round(seconds, 1), **results})
    return rows


def _summary(report: dict[str, Any]) -> str:
    itm, itc, pairs = report["zero_shot_accuracy_itm"], report["zero_shot_accuracy_itc"], report["itm_pair_accuracy"]
    lines = [
        f"simla demo ({report['mode']}): {report['steps']} pretraining steps on {report['train_images']} easy-VQA "
        f"images; zero-shot evaluation on {report['test_images']} held-out images (24 classes, chance 4.2%)",
        f"zero-shot accuracy, ITM ranking: image->text {itm['image_to_text']:.1f}%, "
        f"text->image {itm['text_to_image']:.1f}%",
        f"zero-shot accuracy, ITC ranking: image->text {itc['image_to_text']:.1f}%, "
        f"text->image {itc['text_to_image']:.1f}%",
        f"ITM accuracy vs colour-only / shape-only negatives: {pairs['accuracy']:.1f}% "
        f"(positives {pairs['positives']:.1f}%, colour negatives {pairs['colour_negatives']:.1f}%, "
        f"shape negatives {pairs['shape_negatives']:.1f}%)",
        "reference retrieval recalls (exact image; ~37 test images share each caption, so these stay low):",
        format_table(report["retrieval"]),
    ]
    if "ablation" in report:
        lines.append(_ablation_table(report["ablation"]))
    seconds = report["seconds"]
    lines.append(f"time: {seconds['total']} s (pretraining {seconds['pretraining']} s, "
                 f"evaluation {seconds['evaluation']} s)")
    return "\n".join(lines)


def _ablation_table(rows: list[dict[str, Any]]) -> str:
    header = "| objectives | i->t acc | t->i acc | ITM pair acc | txt_r1 | img_r1 | r_mean | time (s) |"
    lines = ["ablation (same data, steps and seed):", header, "|" + "---|" * 8]
    for row in rows:
        itm, retrieval = row["zero_shot_accuracy_itm"], row["retrieval"]
        lines.append(f"| {row['row']} | {itm['image_to_text']:.1f} | {itm['text_to_image']:.1f} | "
                     f"{row['itm_pair_accuracy']['accuracy']:.1f} | {retrieval['txt_r1']:.1f} | "
                     f"{retrieval['img_r1']:.1f} | {retrieval['r_mean']:.1f} | {row['seconds']} |")
    return "\n".join(lines)


def _markdown(report: dict[str, Any]) -> str:
    return (f"# simla demo\n\n```\n{report['summary']}\n```\n\n"
            "![zero-shot accuracy during pretraining](accuracy_curve.png)\n\n"
            "![held-out examples](examples.png)\n\n![confusion matrix](confusion.png)\n\n"
            "![loss curves](loss_curves.png)\n")
