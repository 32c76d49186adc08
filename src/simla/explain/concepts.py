"""Concept tags: the vocabulary items SIMLA's PSL head predicts from an image alone.

Pretraining teaches the concept head (a linear map from the image's ITC feature to the text vocabulary) to
predict the keywords of the caption, chosen by the multimodal [CLS] attention. Reading it back gives an
image's tags with no text at all. A tag's Grad-CAM map is the ViT [CLS] attention map with respect to that
tag's logit (the paper's appendix figure).

What may be a tag (docs/concepts.md gives the reasons and the measurements):

- Only vocabulary items made of letters and digits: no special tokens, [unused] slots or punctuation.
- No English function words (:data:`STOP_WORDS`, "a", "the", "with", ...): PSL's keywords are caption
  tokens and the commonest caption tokens are these, so an untuned head ranks them first.
- No "##" continuation pieces. A word-start piece ("rec" of "rec ##tangle") is also a whole-word entry of
  the vocabulary and cannot be told from a word by the tokenizer; the probability threshold is what
  keeps such pieces out (they are predicted, with their continuation, only as strongly as the word).
- At least :data:`MIN_TAG_LETTERS` characters (numbers excepted): two-letter vocabulary items are almost all
  function words, abbreviations or pieces.
- Probability (sigmoid of the concept logit) at least ``min_probability``, by default
  :data:`DEFAULT_MIN_PROBABILITY`, calibrated on held-out images of two trained models. An image may
  therefore have no tags: that says the head is not sure of anything, which beats showing noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .gradcam import batch_pixels, inference_mode_of, open_images, upsample_map, vit_cls_map


class MissingConceptHead(ValueError):
    """The model has no PSL concept head (fine-tuned models and pretraining without PSL drop it)."""


@dataclass
class ConceptTags:
    """An image's top concept tags.

    Attributes:
        tags: (word, probability) pairs, most probable first (sigmoid of the concept logits); may be empty.
        maps: (len(tags), g, g) Grad-CAM map of each tag (of a joined word's first piece), or None when
            not asked for.
        image_size: (height, width) of the image as given.
        min_probability: the threshold the tags passed.
    """

    tags: list[tuple[str, float]]
    maps: Tensor | None
    image_size: tuple[int, int]
    min_probability: float = 0.0

    def describe(self) -> str:
        """One line for a sheet or a terminal: "circle 0.91, red 0.72", or why there is none."""
        if self.tags:
            return ", ".join(f"{word} {p:.2f}" for word, p in self.tags)
        return f"none with probability >= {self.min_probability:g}"

    @property
    def maps_image(self) -> Tensor | None:
        return None if self.maps is None else upsample_map(self.maps, self.image_size)

    def to_dict(self, decimals: int = 5) -> dict[str, Any]:
        out: dict[str, Any] = {"tags": [[w, round(p, 6)] for w, p in self.tags], "image_size": list(self.image_size),
                               "min_probability": self.min_probability}
        if self.maps is not None:
            out["maps"] = {w: torch.round(m, decimals=decimals).tolist() for (w, _), m in zip(self.tags, self.maps)}
        return out


def has_concept_head(model: Any) -> bool:
    return getattr(model, "concept_head", None) is not None


#: English function words that are never tags (articles, pronouns, prepositions, conjunctions, auxiliary
#: and modal verbs, and a few quantifiers and adverbs). Written for simla; lower case, as the uncased
#: vocabulary. Content words such as colours, numbers and nouns are deliberately absent.
STOP_WORDS = frozenset("""
a an the this that these those there here
i me my mine we us our ours you your yours he him his she her hers it its they them their theirs
one ones someone something anyone anything everyone everything nobody nothing
who whom whose which what when where why how whoever whatever
am is are was were be been being do does did doing done have has had having
can could may might must shall should will would ought
of in on at by for to from with without into onto upon over under above below between among through
across along around about against before after during until till since toward towards within beside
besides behind beyond near off out up down via per than like unlike
and or but nor so yet if then else because while whereas although though unless whether either neither
not no yes very too also just only even still already again ever never always often quite rather
all any both each every few many more most much other others another some such same own several
as etc
""".split())

#: Shortest tag, in characters (a number may be shorter).
MIN_TAG_LETTERS = 3

#: The default ``min_probability`` of :func:`concepts`. Chosen on held-out images of two trained models
#: (docs/concepts.md, "How the threshold was chosen").
DEFAULT_MIN_PROBABILITY = 0.5


def _is_tag(token: str | None) -> bool:
    # Letters and digits only (no "##" continuation, punctuation or [unused] slot); the vocabulary's lone
    # characters of other scripts are letters of an alphabet, not concepts.
    return token is not None and token.isalnum() and (len(token) > 1 or token.isascii())


def is_tag_word(word: str) -> bool:
    """Whether a (joined) word may be shown as a tag: not a function word, long enough or a number."""
    return word not in STOP_WORDS and (len(word) >= MIN_TAG_LETTERS or word.isdigit())


def whole_word_mask(tokenizer: Any, vocab_size: int) -> Tensor:
    """True for the vocabulary ids that are whole words or numbers (what a tag may be)."""
    tokens = tokenizer.backend.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.special_token_ids)
    return torch.tensor([i not in special and _is_tag(tok) for i, tok in enumerate(tokens)])


def select_tags(tokenizer: Any, probabilities: Tensor, allowed: Tensor, top: int,
                min_probability: float) -> list[tuple[str, int, float]]:
    """An image's tags from its (V,) concept probabilities: (word, vocabulary id, probability), best first.

    allowed: the mask of :func:`whole_word_mask`. Function words and too-short tokens are dropped after the
    threshold, so an image can have fewer than `top` tags, or none.
    """
    passing = torch.nonzero((probabilities >= min_probability) & allowed)[:, 0]
    passing = passing[probabilities[passing].argsort(descending=True)].tolist()
    tags = []
    for token_id, word in zip(passing, tokenizer.backend.convert_ids_to_tokens(passing)):
        if is_tag_word(word):
            tags.append((word, token_id, float(probabilities[token_id])))
            if len(tags) == top:
                break
    return tags


def concepts(model: Any, images: Any, top: int = 10, maps: bool = False, block: int | None = None,
             batch_size: int = 16, min_probability: float = DEFAULT_MIN_PROBABILITY) -> list[ConceptTags]:
    """Up to `top` concept tags of each image, with their probabilities (and Grad-CAM maps if `maps`).

    images: image paths, PIL images or (B, 3, R, R) normalised pixels. block: the ViT block of the maps
    (default two thirds of the depth, as Grad-CAM's itc mode). min_probability: the least probability a
    tag needs (0 shows the `top` best candidates whatever they are); an image may get fewer tags, or none.
    The rules for what may be a tag are in this module's docstring.
    """
    if not has_concept_head(model):
        raise MissingConceptHead(
            f"this {type(model).__name__} has no concept head: concept tags need a pretraining checkpoint trained "
            "with the psl objective (fine-tuned checkpoints and pretraining without psl drop the head)")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    if not 0 <= min_probability <= 1:
        raise ValueError(f"min_probability must lie in [0, 1], got {min_probability}")
    pil, pixels = open_images(images)
    count = len(pil) if pil is not None else pixels.shape[0]
    vocab_size = model.concept_head.out_features
    allowed = whole_word_mask(model.tokenizer, vocab_size)
    # Without a threshold every vocabulary item passes: look only at the best few candidates.
    candidates = min(vocab_size, 8 * top + 64)
    block = (2 * model.config.vision.depth) // 3 if block is None else block
    grid = model.config.grid_size
    results: list[ConceptTags] = []
    with inference_mode_of(model):
        for start in range(0, count, batch_size):
            index = list(range(start, min(start + batch_size, count)))
            batch, sizes = batch_pixels(model, pil, pixels, index)
            with torch.no_grad():
                logits = model.concept_head(model.image_features(model.visual_encoder(batch))).float()
            probabilities = logits.sigmoid().cpu()
            chosen = []
            for row in probabilities:
                floor = max(min_probability, float(row.masked_fill(~allowed, 0).topk(candidates).values[-1]))
                chosen.append(select_tags(model.tokenizer, row, allowed, top, floor))
            tag_maps = None
            if maps and any(chosen):
                ids = torch.tensor([tag_id for tags in chosen for _, tag_id, _ in tags], device=batch.device)
                owner = torch.tensor([row for row, tags in enumerate(chosen) for _ in tags], device=batch.device)
                flat = _tag_maps(model, batch[owner], ids.view(-1, 1), block).view(-1, grid, grid).cpu()
                tag_maps = flat.split([len(tags) for tags in chosen])
            for row, tags in enumerate(chosen):
                row_maps = None
                if maps:
                    row_maps = tag_maps[row] if tag_maps is not None else torch.zeros(0, grid, grid)
                results.append(ConceptTags([(w, p) for w, _, p in tags], row_maps, sizes[row], min_probability))
    return results


def _tag_maps(model: Any, pixels: Tensor, ids: Tensor, block: int) -> Tensor:
    """(N, g*g): image n of `pixels` explained w.r.t. the concept logit of vocabulary id `ids[n]`."""
    wanted = ids.reshape(-1, 1)

    def tag_logit(tokens: Tensor) -> Tensor:
        return model.concept_head(model.image_features(tokens)).gather(1, wanted)[:, 0]

    return vit_cls_map(model, pixels, block, tag_logit)
