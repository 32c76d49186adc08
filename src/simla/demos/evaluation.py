"""Zero-shot evaluation of a pretrained model on labelled easy-VQA shapes: does it know colour AND shape?

Every held-out image is scored against the 24 class captions ("a red circle", ...) in two ways:
- ITC: cosine similarity of the contrastive features (what the accuracy curve tracks during training);
- ITM: the match probability of the single-stream multimodal encoder (the final figures).

From the (images x 24 captions) matrices come:
- image-to-text accuracy: the best-ranked caption of an image names its colour and shape;
- text-to-image accuracy: for the caption of each held-out pair, the best-ranked image has that colour and
  shape (so classes count by how often they occur, as in retrieval);
- ITM pair accuracy: each image against its own caption and two captions that differ in colour only or in
  shape only (drawn with a fixed seed); a pair is right when the match probability is on the right side of
  0.5. This is the hard part: colour alone or shape alone cannot pass it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.images import load_image
from ..data.transforms import EvalView
from ..models.simla import SimlaModel
from .easy_vqa import COLOURS, SHAPES, ShapeImage, class_of

#: The 24 classes in a fixed order, and the caption that names each.
CLASSES: tuple[str, ...] = tuple(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES)


def class_caption(name: str) -> str:
    return f"a {name}"


@dataclass
class ShapeProbe:
    """Held-out images, preprocessed once at the model's resolution, with their class indices."""

    pixels: Tensor  # (N, 3, R, R)
    labels: Tensor  # (N,) index into CLASSES
    paths: list[str]

    @classmethod
    def from_items(cls, items: Sequence[ShapeImage], image_size: int) -> "ShapeProbe":
        view = EvalView(image_size)
        pixels = torch.stack([view(load_image(item.image)) for item in items])
        labels = torch.tensor([CLASSES.index(class_of(item)) for item in items])
        return cls(pixels, labels, [item.image for item in items])

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class ShapeScores:
    """(N, 24) scores of every probe image against every class caption."""

    itc: Tensor
    itm: Tensor | None  # match probabilities; None when only ITC was computed


@torch.no_grad()
def score_classes(model: SimlaModel, probe: ShapeProbe, *, with_itm: bool = True, batch_size: int = 256) -> ShapeScores:
    """Score every probe image against the 24 class captions (the model is put in eval mode meanwhile)."""
    was_training = model.training
    model.eval()
    try:
        device = model.device
        ids, mask = model.tokenize([class_caption(c) for c in CLASSES])
        text_feat = model.text_features(model.text_encoder(ids, mask, mode="text"))
        itc, itm = [], []
        for start in range(0, len(probe), batch_size):
            tokens = model.visual_encoder(probe.pixels[start:start + batch_size].to(device))
            itc.append(model.image_features(tokens) @ text_feat.t())
            if with_itm:
                n, k = tokens.shape[0], len(CLASSES)
                # Every (image, caption) pair in one batched multimodal pass.
                logits = model.itm_logits(tokens.repeat_interleave(k, 0), ids.repeat(n, 1), mask.repeat(n, 1))
                itm.append(logits.softmax(-1)[:, 1].view(n, k))
        return ShapeScores(torch.cat(itc).cpu(), torch.cat(itm).cpu() if with_itm else None)
    finally:
        model.train(was_training)


def zero_shot_accuracy(scores: Tensor, labels: Tensor) -> dict[str, float]:
    """Image-to-text and text-to-image top-1 accuracy (percent) from (N, 24) scores."""
    image_to_text = (scores.argmax(1) == labels).float().mean().item()
    # The caption of pair i ranks all N images by column labels[i]; a hit if the top image has that class.
    best_image = scores.argmax(0)  # (24,) best image per caption
    text_to_image = (labels[best_image[labels]] == labels).float().mean().item()
    return {"image_to_text": 100 * image_to_text, "text_to_image": 100 * text_to_image}


def hard_negative_classes(labels: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """For each label, a class with another colour and the same shape, and one with the same colour and
    another shape, drawn with a fixed seed."""
    rng = random.Random(seed)
    colour_swap, shape_swap = [], []
    for label in labels.tolist():
        colour, shape = CLASSES[label].split()
        colour_swap.append(CLASSES.index(f"{rng.choice([c for c in COLOURS if c != colour])} {shape}"))
        shape_swap.append(CLASSES.index(f"{colour} {rng.choice([s for s in SHAPES if s != shape])}"))
    return torch.tensor(colour_swap), torch.tensor(shape_swap)


def itm_pair_accuracy(probabilities: Tensor, labels: Tensor, seed: int = 0) -> dict[str, float]:
    """ITM accuracy (percent) on each image's own caption and a colour-only and a shape-only negative."""
    rows = torch.arange(len(labels))
    colour_swap, shape_swap = hard_negative_classes(labels, seed)
    positive = probabilities[rows, labels] > 0.5
    colour_negative = probabilities[rows, colour_swap] < 0.5
    shape_negative = probabilities[rows, shape_swap] < 0.5
    correct = torch.stack([positive, colour_negative, shape_negative]).float()
    return {"accuracy": 100 * correct.mean().item(), "positives": 100 * correct[0].mean().item(),
            "colour_negatives": 100 * correct[1].mean().item(), "shape_negatives": 100 * correct[2].mean().item()}


def confusion_matrix(scores: Tensor, labels: Tensor) -> Tensor:
    """(24, 24) counts: row = true class, column = the class of the best-ranked caption."""
    matrix = torch.zeros(len(CLASSES), len(CLASSES), dtype=torch.long)
    matrix.index_put_((labels, scores.argmax(1)), torch.ones(len(labels), dtype=torch.long), accumulate=True)
    return matrix
