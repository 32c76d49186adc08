"""Concept tags: the vocabulary items SIMLA's PSL head predicts from an image alone.

Pretraining teaches the concept head (a linear map from the image's ITC feature to the text vocabulary) to
predict the keywords of the caption, chosen by the multimodal [CLS] attention. Reading it back gives an
image's tags with no text at all. A tag's Grad-CAM map is the ViT [CLS] attention map with respect to that
tag's logit (the paper's appendix figure).

What may be a tag (docs/concepts.md gives the reasons and the measurements):

- Only vocabulary items made of letters and digits: no special tokens, [unused] slots or punctuation.
- No English function words (:data:`STOP_WORDS`, "a", "the", "with", ...): PSL's keywords are caption
  tokens and the commonest caption tokens are these, so an untuned head ranks them first.
- At least :data:`MIN_TAG_LETTERS` characters (numbers excepted): two-letter vocabulary items are almost all
  function words, abbreviations or pieces.
- Probability (sigmoid of the concept logit) at least ``min_probability`` and at least ``min_margin`` above
  the image's background (the probability of its 30th most probable candidate word: a head that has
  learnt nothing gives its whole vocabulary about the same probability). Defaults calibrated on held-out
  images of two pretrained models. An image may have no tags; it then says so instead of showing noise.
- No "##" continuation piece on its own. A word-start piece ("rec" of "rec ##tangle") is also a
  whole-word entry of the vocabulary, so the tokenizer cannot tell it from a word. When a continuation
  passes the same bar as a word-start piece and the tokenizer splits their concatenation into exactly
  those two pieces, they are shown joined ("rectangle"). The check is weak (WordPiece splits almost any
  string that way), which is why only pieces that clear the bar are joined, only to start pieces of at
  most :data:`MAX_JOINED_START` letters, and each to the start piece of the closest probability; a start
  piece whose continuation falls below the bar is shown as it is, and words of three or more pieces are
  not rebuilt.
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
        min_probability: the probability threshold the tags passed.
        min_margin: the margin over the image's background they passed.
    """

    tags: list[tuple[str, float]]
    maps: Tensor | None
    image_size: tuple[int, int]
    min_probability: float = 0.0
    min_margin: float = 0.0

    def describe(self) -> str:
        """One line for a sheet or a terminal: "circle 0.91, red 0.72", or why there is none."""
        if self.tags:
            return ", ".join(f"{word} {p:.2f}" for word, p in self.tags)
        return (f"none with probability >= {self.min_probability:g} and >= {self.min_margin:g} above the "
                f"image's background")

    @property
    def maps_image(self) -> Tensor | None:
        return None if self.maps is None else upsample_map(self.maps, self.image_size)

    def to_dict(self, decimals: int = 5) -> dict[str, Any]:
        out: dict[str, Any] = {"tags": [[w, round(p, 6)] for w, p in self.tags], "image_size": list(self.image_size),
                               "min_probability": self.min_probability, "min_margin": self.min_margin}
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
someone something anyone anything everyone everything nobody nothing
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

#: Longest word-start piece that may be joined to a continuation: longer ones are far likelier words of
#: their own (on the demo model "circle" + "##tangle" would otherwise make "circletangle").
MAX_JOINED_START = 4

#: The default ``min_probability`` and ``min_margin`` of :func:`concepts`, chosen on held-out images of two
#: pretrained models (docs/concepts.md, "How the thresholds were chosen").
DEFAULT_MIN_PROBABILITY = 0.35
DEFAULT_MIN_MARGIN = 0.05

#: A tag must stand ``min_margin`` above the probability of the image's BACKGROUND_RANK-th most probable
#: candidate word: the level below which a head's untaught vocabulary sits for that image.
BACKGROUND_RANK = 30


def _is_tag(token: str | None) -> bool:
    # Letters and digits only (no "##" continuation, punctuation or [unused] slot); the vocabulary's lone
    # characters of other scripts are letters of an alphabet, not concepts.
    return token is not None and token.isalnum() and (len(token) > 1 or token.isascii())


def is_tag_word(word: str) -> bool:
    """Whether a (joined) word may be shown as a tag: not a function word, long enough or a number."""
    return word not in STOP_WORDS and (len(word) >= MIN_TAG_LETTERS or word.isdigit())


def whole_word_mask(tokenizer: Any, vocab_size: int) -> Tensor:
    """True for the vocabulary ids that are whole words or numbers (rule 1 of the module docstring)."""
    tokens = tokenizer.backend.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.special_token_ids)
    return torch.tensor([i not in special and _is_tag(tok) for i, tok in enumerate(tokens)])


def tag_mask(tokenizer: Any, vocab_size: int) -> Tensor:
    """True for the vocabulary ids that may be tags: whole words that are no function words, long enough."""
    tokens = tokenizer.backend.convert_ids_to_tokens(list(range(vocab_size)))
    return whole_word_mask(tokenizer, vocab_size) & torch.tensor([is_tag_word(t) for t in tokens])


def continuation_mask(tokenizer: Any, vocab_size: int) -> Tensor:
    """True for the "##" continuation pieces of letters and digits (what a word-start piece may join)."""
    tokens = tokenizer.backend.convert_ids_to_tokens(list(range(vocab_size)))
    return torch.tensor([t is not None and t.startswith("##") and t[2:].isalnum() and t[2:].isascii() for t in tokens])


def select_tags(tokenizer: Any, probabilities: Tensor, mask: Tensor, top: int, min_probability: float,
                min_margin: float = 0.0, pieces: Tensor | None = None) -> list[tuple[str, int, float]]:
    """An image's tags from its (V,) concept probabilities: (word, vocabulary id, probability), best first.

    mask: :func:`tag_mask`. A tag needs a probability of at least `min_probability` and at least `min_margin`
    above the image's background (the probability of its BACKGROUND_RANK-th best candidate); at most `top`.
    pieces: :func:`continuation_mask`; a continuation that passes the same bar is joined to the passing
    word-start piece (at most MAX_JOINED_START letters, not a number) that it completes ("rec" + "##tangle"
    -> "rectangle": the tokenizer splits the joined word into exactly those two pieces) and whose
    probability is closest to its own (the head sees both pieces of a caption word with the same images),
    at the lower of the two probabilities. Each piece joins once.
    """
    background = float(probabilities[mask].topk(min(BACKGROUND_RANK, int(mask.sum()))).values[-1])
    bar = max(min_probability, background + min_margin)
    passing = torch.nonzero((probabilities >= bar) & mask)[:, 0]
    passing = passing[probabilities[passing].argsort(descending=True)].tolist()
    backend = tokenizer.backend
    tags = [[word, token_id, float(probabilities[token_id]), False]
            for word, token_id in zip(backend.convert_ids_to_tokens(passing), passing)]
    if pieces is not None:
        ends = torch.nonzero((probabilities >= bar) & pieces)[:, 0]
        ends = ends[probabilities[ends].argsort(descending=True)][:len(passing)].tolist()
        for piece, piece_id in zip(backend.convert_ids_to_tokens(ends), ends):
            p = float(probabilities[piece_id])
            starts = [tag for tag in tags if not tag[3] and len(tag[0]) <= MAX_JOINED_START and not tag[0].isdigit()
                      and backend.tokenize(tag[0] + piece[2:]) == [tag[0], piece]]
            if starts:
                tag = min(starts, key=lambda tag: abs(tag[2] - p))
                tag[0], tag[2], tag[3] = tag[0] + piece[2:], min(tag[2], p), True
    tags = [(word, token_id, probability) for word, token_id, probability, _ in tags]
    return sorted(tags, key=lambda tag: -tag[2])[:top]


def concepts(model: Any, images: Any, top: int = 10, maps: bool = False, block: int | None = None,
             batch_size: int = 16, min_probability: float = DEFAULT_MIN_PROBABILITY,
             min_margin: float = DEFAULT_MIN_MARGIN) -> list[ConceptTags]:
    """Up to `top` concept tags of each image, with their probabilities (and Grad-CAM maps if `maps`).

    images: image paths, PIL images or (B, 3, R, R) normalised pixels. block: the ViT block of the maps
    (default two thirds of the depth, as Grad-CAM's itc mode). min_probability: the least probability a
    tag needs; min_margin: how far it must stand above the image's background (the probability of its
    30th most probable candidate word). With both 0 the `top` best candidates are shown whatever they
    are; otherwise an image may get fewer tags, or none. The rules are in this module's docstring.
    """
    if not has_concept_head(model):
        raise MissingConceptHead(
            f"this {type(model).__name__} has no concept head: concept tags need a pretraining checkpoint trained "
            "with the psl objective (fine-tuned checkpoints and pretraining without psl drop the head)")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    for name, value in (("min_probability", min_probability), ("min_margin", min_margin)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    pil, pixels = open_images(images)
    count = len(pil) if pil is not None else pixels.shape[0]
    vocab_size = model.concept_head.out_features
    mask = tag_mask(model.tokenizer, vocab_size)
    pieces = continuation_mask(model.tokenizer, vocab_size)
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
            chosen = [select_tags(model.tokenizer, row, mask, top, min_probability, min_margin, pieces)
                      for row in probabilities]
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
                results.append(ConceptTags([(w, p) for w, _, p in tags], row_maps, sizes[row], min_probability,
                                           min_margin))
    return results


def _tag_maps(model: Any, pixels: Tensor, ids: Tensor, block: int) -> Tensor:
    """(N, g*g): image n of `pixels` explained w.r.t. the concept logit of vocabulary id `ids[n]`."""
    wanted = ids.reshape(-1, 1)

    def tag_logit(tokens: Tensor) -> Tensor:
        return model.concept_head(model.image_features(tokens)).gather(1, wanted)[:, 0]

    return vit_cls_map(model, pixels, block, tag_logit)
