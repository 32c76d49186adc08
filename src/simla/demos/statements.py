"""NLVR2-style and SNLI-VE-style examples built from the labelled easy-VQA images (shape and colour known).

NLVR2: a statement about a PAIR of images ("the left image shows a red shape and the right image a circle"),
true or false from the two images' labels; half of the examples are true. Templates mention the left
image, the right image, or both, so the model must read both images and know which is which.

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
    """`count` examples {images: [left, right], sentence, label: "True"|"False"}, half of them true.

    Every template is as often true as false (a template that is usually false, such as "both shapes are
    red", would otherwise be answerable from its words alone): for each example the truth value is fixed
    first, then image pairs and slot values are drawn until the statement has it.
    """
    rng = random.Random(seed)
    items = list(items)
    examples = []
    while len(examples) < count:
        template = PAIR_TEMPLATES[len(examples) % len(PAIR_TEMPLATES)]
        wanted = (len(examples) // len(PAIR_TEMPLATES)) % 2 == 0
        for _ in range(1000):
            left, right = rng.sample(items, 2)
            slots = _slots(rng.choice((left, right, None)), rng)
            if template.holds(left, right, slots) == wanted:
                examples.append({"images": [left.image, right.image], "sentence": template.text.format(**slots),
                                 "label": "True" if wanted else "False"})
                break
        else:
            raise RuntimeError(f"could not make {template.text!r} {wanted} from these images")
    rng.shuffle(examples)
    return examples


def ve_examples(items: Sequence[ShapeImage], count: int, seed: int) -> list[dict]:
    """`count` examples {image, sentence, label}, a third each entailment, neutral and contradiction.

    Entailed and contradicted statements use the same templates equally often (a contradiction changes an
    attribute its template names), so only the image tells them apart; neutral statements name the image's
    true colour and shape and add something no picture can decide.
    """
    rng = random.Random(seed)
    items = list(items)
    examples = []
    for i in range(count):
        item = rng.choice(items)
        label = ("entailment", "neutral", "contradiction")[i % 3]
        slots = {"colour": item.colour, "shape": item.shape}
        if label == "neutral":
            template = NEUTRAL[(i // 3) % len(NEUTRAL)]
        else:
            template = ENTAILED[(i // 3) % len(ENTAILED)]
        if label == "contradiction":
            named = [a for a in ("colour", "shape") if "{" + a + "}" in template]
            changed = rng.choice(named)
            choices = COLOURS if changed == "colour" else SHAPES
            slots[changed] = rng.choice([v for v in choices if v != slots[changed]])
        examples.append({"image": item.image, "sentence": template.format(**slots), "label": label})
    rng.shuffle(examples)
    return examples
