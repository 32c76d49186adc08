"""What the task demos (`simla demo vqa | nlvr | ve`) share: the pretrained demo model and the recipe settings.

Each task demo fine-tunes the model that `simla demo` pretrains on the easy-VQA images: taken from a
finished demo folder (`--from DIR`), or pretrained first (the quick demo when the task demo is quick).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..checkpoint_files import NotACheckpointError, read_checkpoint
from .reference import add_quick_notice
from .retrieval import run_retrieval_demo


logger = logging.getLogger(__name__)


def require_finished_demo(source: str | Path) -> Path:
    """`source` as a finished `simla demo` folder (its pretrain/checkpoints/last.pt exists), else a one-line
    FileNotFoundError. `simla.tasks.run_demo` calls it before a demo writes anything."""
    folder = Path(source)
    last = folder / "pretrain" / "checkpoints" / "last.pt"
    if last.is_file():
        return folder
    if not folder.exists():
        why = "no such folder"
    elif folder.is_file():
        why = "it is a file, not a folder" + ("; give the demo folder that holds pretrain/checkpoints/last.pt"
                                             if folder.name.endswith(".pt") else "")
    else:
        why = f"{last} is missing (run `simla demo --output {folder}` first, or let it finish)"
    raise FileNotFoundError(f"--from {source}: not a finished `simla demo` folder: {why}")


def pretrained_demo(source: str | Path | None, out: Path, quick: bool, seed: int) -> Path:
    """The folder of a finished `simla demo` (its pretrain/ checkpoint and train.json), made now if not given."""
    if source is not None:
        return require_finished_demo(source)
    logger.info("no --from folder: pretraining the demo model first (simla demo%s)", " --quick" if quick else "")
    run_retrieval_demo(out / "pretrained", quick=quick, seed=seed)
    return out / "pretrained"


def checkpoint_of(demo: Path) -> Path:
    return demo / "pretrain" / "checkpoints" / "last.pt"


def finetune_overrides(checkpoint: Path, output_dir: Path, *, steps: int, batch_size: int, lr: float,
                       num_workers: int, seed: int) -> dict[str, Any]:
    """Recipe settings every task demo uses (see each demo for its own)."""
    # Read like any checkpoint: never trusted (a demo folder may come from anywhere), so a pickled payload
    # is refused in one line, as is a damaged file.
    stored = read_checkpoint(checkpoint).get("config")
    if not isinstance(stored, dict) or not isinstance(stored.get("vision"), dict) \
            or "image_size" not in stored["vision"]:
        raise NotACheckpointError(f"{checkpoint}: field 'config' should hold the demo model's config (with "
                                  "vision.image_size), as `simla demo` writes it; it does not")
    return {
        "checkpoint": str(checkpoint), "output_dir": str(output_dir),
        # The demo model's own resolution (48 px): its patches were chosen so that shapes are visible.
        "image_size": stored["vision"]["image_size"],
        "max_steps": steps, "batch_size": batch_size, "lr": lr, "warmup_lr": 1e-5, "min_lr": 1e-5,
        "warmup_steps": max(1, steps // 10), "log_every": max(1, steps // 30), "save_every": steps,
        "num_workers": num_workers,
        # As in the pretraining demo: shapes near an edge must not be cropped away, colours must stay.
        "crop_scale_min": 1.0, "randaugment": False,
        # A short run: the momentum teacher of the paper (0.995) would lag behind the whole run.
        "model_config.alpha": 0.0, "seed": seed, "device": "cpu",
    }


def as_overrides(settings: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def write_report(out: Path, report: dict[str, Any], title: str, body: str) -> None:
    """report.json, and report.md: the title, the printable summary, then `body` (pictures, tables, links).

    The title is "simla demo NAME"; a quick run's summary gets NAME's full-run figures (`reference`).
    """
    add_quick_notice(report, title.split()[-1])
    (out / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out / "report.md").write_text(f"# {title}\n\n```\n{report['summary']}\n```\n\n{body}\n", encoding="utf-8")
