"""The demo's pictures: loss curves, the zero-shot accuracy curve, a confusion matrix and example captions."""

from __future__ import annotations

import itertools
import json
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..data.images import load_image


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


#: Each logged loss: what it is and its unit (the y-axis label of its panel). All are mean cross-entropies in nats.
LOSS_AXES = {
    "itc": "contrastive CE, nats\n(mean of image→text, text→image)",
    "itm": "match CE, nats per pair",
    "mlm": "CE, nats per masked token",
    "mim": "CE, nats per masked patch",
    "psl": "binary CE, nats per concept",
}


def loss_figure(records: Sequence[Mapping[str, Any]], title: str):
    """The figure of :func:`plot_losses`: one panel per `loss_*` key of the log records, y-axis labelled."""
    plt = _pyplot()
    names = [k for k in records[0] if k.startswith("loss_")]
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        short = name.removeprefix("loss_")
        ax.plot([r["step"] for r in records], [r[name] for r in records], color="tab:blue")
        ax.set_title(short.upper())
        ax.set_xlabel("step")
        ax.set_ylabel(LOSS_AXES.get(short, "loss, nats"), fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_losses(log_path: Path, png_path: Path, title: str) -> Path:
    """One panel per logged loss, against the optimizer step."""
    plt = _pyplot()
    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    fig = loss_figure(records, title)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_accuracy_curve(curve: Sequence[Mapping[str, float]], png_path: Path, chance: float) -> Path:
    """Zero-shot accuracy in both directions against the step, with the chance level."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    steps = [point["step"] for point in curve]
    ax.plot(steps, [point["image_to_text"] for point in curve], marker="o", label="image → text")
    ax.plot(steps, [point["text_to_image"] for point in curve], marker="s", label="text → image")
    ax.axhline(chance, color="gray", linestyle="--", label=f"chance ({chance:.1f}%)")
    ax.set_ylim(0, 100)
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("zero-shot accuracy on held-out images (ITC)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _overlapping(labels, renderer) -> bool:
    """Whether neighbouring tick labels (left to right) overlap once drawn."""
    boxes = [label.get_window_extent(renderer) for label in labels if label.get_text()]
    return any(a.x1 > b.x0 for a, b in itertools.pairwise(boxes))


def confusion_figure(matrix: Tensor, classes: Sequence[str], *,
                     title: str = "image → text confusion on held-out images (ITM)",
                     xlabel: str = "best-ranked caption", ylabel: str = "true colour and shape"):
    """The figure of :func:`plot_confusion`.

    Cell colour: the fraction of the row (true class); the number in each cell: the count of examples (zeros
    in grey, others dark on light cells and white on dark ones). Column labels are horizontal, one word per
    line; they are turned upright only when even then neighbours would overlap (many classes with long
    words). The figure grows with the number of classes so that 24 classes (the retrieval demo) still fit.
    """
    plt = _pyplot()
    counts = matrix.float()
    rates = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    cell = min(1.6, max(0.55, 8.0 / max(n, 1)))  # inches
    tick_size, number_size = (7, 7) if n > 16 else (8, 8) if n > 8 else (10, 12)
    fig, ax = plt.subplots(figsize=(n * cell + 3.2, n * cell + 1.8))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), [name.replace(" ", "\n") for name in classes], fontsize=tick_size)
    ax.set_yticks(range(n), classes, fontsize=tick_size)
    for row in range(n):
        for column in range(n):
            value, rate = float(counts[row, column]), float(rates[row, column])
            colour = "0.6" if value == 0 else "white" if rate > 0.5 else "black"
            ax.text(column, row, f"{value:g}", ha="center", va="center", fontsize=number_size, color=colour)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="colour: fraction of the row; numbers: counts")
    fig.tight_layout()
    fig.canvas.draw()
    if _overlapping(ax.get_xticklabels(), fig.canvas.get_renderer()):
        ax.tick_params(axis="x", labelrotation=90)
        fig.tight_layout()
    return fig


def plot_confusion(matrix: Tensor, classes: Sequence[str], png_path: Path, *,
                   title: str = "image → text confusion on held-out images (ITM)",
                   xlabel: str = "best-ranked caption", ylabel: str = "true colour and shape") -> Path:
    """Confusion matrix: true class (rows) against the prediction (columns); colour = fraction of the row,
    number = count (see :func:`confusion_figure`)."""
    plt = _pyplot()
    fig = confusion_figure(matrix, classes, title=title, xlabel=xlabel, ylabel=ylabel)
    fig.savefig(png_path, dpi=110, bbox_inches="tight", pad_inches=0.15)  # long class names: nothing clipped
    plt.close(fig)
    return png_path


def plot_examples(paths: Sequence[str], probabilities: Tensor, labels: Tensor, classes: Sequence[str],
                  png_path: Path, top: int = 3) -> Path:
    """Each image with its `top` best captions and their ITM match probabilities (green = right class)."""
    plt = _pyplot()
    columns = min(4, len(paths))
    rows = (len(paths) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, path, probs, label in zip(axes.flat, paths, probabilities, labels.tolist()):
        with Image.open(path) as img:
            ax.imshow(img.convert("RGB"))
        values, order = torch.topk(probs, top)
        lines = [f"{'✓' if int(i) == label else '✗'} a {classes[int(i)]}: {float(v):.2f}" for v, i in zip(values, order)]
        ax.set_title("\n".join(lines), fontsize=8, loc="left",
                     color="darkgreen" if int(order[0]) == label else "darkred")
    fig.suptitle("held-out images: best captions and match probabilities")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_recall_curve(curve: Sequence[Mapping[str, float]], chance: Mapping[str, float], png_path: Path) -> Path:
    """Zero-shot R@1/5/10 (text -> image, ITC) on the held-out set against the step, with chance levels."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.8, 3.6))
    steps = [point["step"] for point in curve]
    for k, colour in ((1, "tab:blue"), (5, "tab:orange"), (10, "tab:green")):
        ax.plot(steps, [point[f"img_r{k}"] for point in curve], marker="o", color=colour, label=f"R@{k}")
        ax.axhline(chance[f"img_r{k}"], color=colour, linestyle=":", linewidth=1)
    ax.set_ylim(0, max(10.0, max((p["img_r10"] for p in curve), default=0) * 1.2))
    ax.set_xlabel("pretraining step")
    ax.set_ylabel("recall (%)")
    ax.set_title("zero-shot text → image on held-out stamps (ITC); dotted: chance")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices spread evenly over range(total), first and last included (sets are sorted by folder)."""
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(min(count, total))})


def plot_retrieval_examples(data: Any, i2t: Tensor, png_path: Path, count: int = 8, top: int = 3) -> Path:
    """`count` images spread evenly over a retrieval set, each with its `top` best captions (green: its own)."""
    plt = _pyplot()
    shown = spread_indices(len(data.images), count)
    columns = min(4, len(shown))
    rows = (len(shown) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, shown):
        ax.imshow(load_image(data.images[i]))  # transparency on white, as the model saw it
        order = torch.topk(i2t[i], min(top, i2t.shape[1])).indices.tolist()
        own = set(data.img2txt[i])
        lines = [f"{'✓' if t in own else '✗'} {textwrap.shorten(data.texts[t], 34)}" for t in order]
        if not own & set(order):
            lines.append(f"(its own: {textwrap.shorten(data.texts[min(own)], 30)})")
        ax.set_title("\n".join(lines), fontsize=8, loc="left", color="darkgreen" if order[0] in own else "darkred")
    fig.suptitle(f"held-out pictures: the best {top} of all {len(data.texts)} held-out captions (ITC); ✓ = its own")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
