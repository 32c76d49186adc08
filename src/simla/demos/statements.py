"""NLVR2-style and SNLI-VE-style examples built from the labelled easy-VQA images (shape and colour known).

NLVR2: a statement about a PAIR of images ("the left image shows a red shape and the right image a circle"),
true or false from the two images' labels; half of the examples are true. Templates mention the left
image, the right image, both, or either, so the model must read both images and know which is which.

SNLI-VE: a statement about one image. It is entailed when it says what the image shows ("there is a red
circle"), contradicted when it names another colour or shape, and neutral when it adds something the
image cannot decide (what the shape is made of, who drew it); a third of the examples each.

Every example is written in the reference JSON form, so the demos run the same commands a user runs on the
real corpora.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .easy_vqa import COLOURS, SHAPES, ShapeImage

Slots = dict[str, str]


@dataclass(frozen=True)
class PairTemplate:
    text: str
    holds: Callable[[ShapeImage, ShapeImage, Slots], bool]  # is the statement true of (left, right)?


PAIR_TEMPLATES: tuple[PairTemplate, ...] = (
    PairTemplate("the left image shows a {colour} shape and the right image a {shape}",
                 lambda a, b, s: a.colour == s["colour"] and b.shape == s["shape"]),
    PairTemplate("the left image shows a {shape} and the right image a {colour} shape",
                 lambda a, b, s: a.shape == s["shape"] and b.colour == s["colour"]),
    PairTemplate("the left shape is {colour}", lambda a, b, s: a.colour == s["colour"]),
    PairTemplate("the right shape is a {shape}", lambda a, b, s: b.shape == s["shape"]),
    PairTemplate("both images show a {shape}", lambda a, b, s: a.shape == b.shape == s["shape"]),
    PairTemplate("both shapes are {colour}", lambda a, b, s: a.colour == b.colour == s["colour"]),
    PairTemplate("one of the images shows a {colour} {shape}",
                 lambda a, b, s: any(x.colour == s["colour"] and x.shape == s["shape"] for x in (a, b))),
    PairTemplate("the two shapes have the same colour", lambda a, b, s: a.colour == b.colour),
    PairTemplate("the two images show different shapes", lambda a, b, s: a.shape != b.shape),
)

ENTAILED = ("there is a {colour} {shape}", "the image shows a {shape}", "the shape is {colour}",
            "a {colour} {shape} on a light background")
NEUTRAL = ("the {colour} {shape} is made of wood", "the {shape} was drawn by a child",
           "the {colour} shape is made of glass", "someone painted the {shape} yesterday")


def _slots(item: ShapeImage | None, rng: random.Random) -> Slots:
    if item is None:
        return {"colour": rng.choice(COLOURS), "shape": rng.choice(SHAPES)}
    return {"colour": item.colour, "shape": item.shape}


def nlvr_examples(items: Sequence[ShapeImage], count: int, seed: int) -> list[dict]:
    """`count` examples {images: [left, right], sentence, label: "True"|"False"}, half of them true."""
    rng = random.Random(seed)
    examples = []
    while len(examples) < count:
        left, right = rng.sample(list(items), 2)
        template = rng.choice(PAIR_TEMPLATES)
        wanted = len(examples) % 2 == 0  # alternate true and false statements
        # Slots from the images often make a statement true, random ones usually false: try a few of each.
        for _ in range(20):
            slots = _slots(rng.choice((left, right, None)), rng)
            if template.holds(left, right, slots) == wanted:
                examples.append({"images": [left.image, right.image], "sentence": template.text.format(**slots),
                                 "label": "True" if wanted else "False"})
                break
    rng.shuffle(examples)
    return examples


def ve_examples(items: Sequence[ShapeImage], count: int, seed: int) -> list[dict]:
    """`count` examples {image, sentence, label}, a third each entailment, neutral and contradiction."""
    rng = random.Random(seed)
    examples = []
    labels = ("entailment", "neutral", "contradiction")
    for i in range(count):
        item = rng.choice(list(items))
        label = labels[i % 3]
        slots = {"colour": item.colour, "shape": item.shape}
        if label == "contradiction":  # one attribute that the image contradicts
            if rng.random() < 0.5:
                slots["colour"] = rng.choice([c for c in COLOURS if c != item.colour])
            else:
                slots["shape"] = rng.choice([s for s in SHAPES if s != item.shape])
        template = rng.choice(NEUTRAL if label == "neutral" else ENTAILED)
        if label == "contradiction":
            template = rng.choice([t for t in ENTAILED if _names_changed(t, slots, item)])
        examples.append({"image": item.image, "sentence": template.format(**slots), "label": label})
    rng.shuffle(examples)
    return examples


def _names_changed(template: str, slots: Slots, item: ShapeImage) -> bool:
    """Whether the template mentions the attribute that was changed (else it would still be entailed)."""
    changed = "{colour}" if slots["colour"] != item.colour else "{shape}"
    return changed in template
