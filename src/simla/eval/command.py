"""How an evaluation is described to the command line: its options and the function that runs it.

Each task's evaluation module declares one `Evaluation` (what `simla evaluate TASK` accepts and calls);
the `simla` command builds its parser from these descriptions, so the options are written once, beside
the code that uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Option:
    """One command-line option; its value reaches the evaluation as the keyword `dest`."""

    flag: str
    help: str
    type: Callable[[str], Any] | None = str
    default: Any = None
    required: bool = False
    choices: tuple[str, ...] | None = None
    switch: bool = False  # a flag without a value (store_true)
    repeatable: bool = False  # may be given several times (a list)
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Evaluation:
    """`simla evaluate TASK`: `run(**options)` evaluates and returns (metrics, text to print)."""

    help: str
    run: Callable[..., tuple[dict[str, Any], str]]
    options: tuple[Option, ...]


def checkpoint_options(what: str, *, batch_size: int, per: str, tokenizer: bool = True,
                       image_size: str = "evaluation resolution (default: the checkpoint's)") -> tuple[Option, ...]:
    """The options every evaluation takes: the checkpoint, where images and results are, and how to run."""
    options = [
        Option("--checkpoint", f"{what} (ours, an export dir or a reference .pth)", required=True),
        Option("--image-root", "directory that relative image paths are joined to"),
        Option("--image-size", image_size, type=int),
    ]
    if tokenizer:
        options.append(Option("--tokenizer", "text tokenizer dir or hub name (default: the checkpoint's)"))
    return (*options,
            Option("--batch-size", f"{per} per forward", type=int, default=batch_size),
            Option("--num-workers", "image loading workers", type=int, default=2),
            Option("--device", "auto, cpu or cuda", default="auto"),
            Option("--trust-pickle", "allow unpickling reference checkpoints", switch=True))


def size_override(image_size: int | None) -> dict[str, Any]:
    """The config override of an evaluation at `image_size` (none: the checkpoint's own resolution)."""
    return {"image_size": image_size} if image_size else {}
