"""Concept tags: the vocabulary items SIMLA's PSL head predicts from an image alone.

Pretraining teaches the concept head (a linear map from the image's ITC feature to the text vocabulary) to
predict the keywords of the caption, chosen by the multimodal [CLS] attention. Reading it back gives an
image's tags with no text at all. Only whole words are offered: special tokens, [unused] slots,
punctuation and wordpiece continuations ("##s") are excluded. A tag's Grad-CAM map is the ViT [CLS]
attention map with respect to that tag's logit (the paper's appendix figure).
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
        tags: (word, probability) pairs, most probable first (sigmoid of the concept logits).
        maps: (len(tags), g, g) Grad-CAM map of each tag, or None when not asked for.
        image_size: (height, width) of the image as given.
    """

    tags: list[tuple[str, float]]
    maps: Tensor | None
    image_size: tuple[int, int]

    @property
    def maps_image(self) -> Tensor | None:
        return None if self.maps is None else upsample_map(self.maps, self.image_size)

    def to_dict(self, decimals: int = 5) -> dict[str, Any]:
        out: dict[str, Any] = {"tags": [[w, round(p, 6)] for w, p in self.tags], "image_size": list(self.image_size)}
        if self.maps is not None:
            out["maps"] = {w: torch.round(m, decimals=decimals).tolist() for (w, _), m in zip(self.tags, self.maps)}
        return out


def has_concept_head(model: Any) -> bool:
    return getattr(model, "concept_head", None) is not None


def _is_tag(token: str | None) -> bool:
    # Letters and digits only (no "##" continuation, punctuation or [unused] slot); the vocabulary's lone
    # characters of other scripts are letters of an alphabet, not concepts.
    return token is not None and token.isalnum() and (len(token) > 1 or token.isascii())


def whole_word_mask(tokenizer: Any, vocab_size: int) -> Tensor:
    """True for the vocabulary ids that are whole words or numbers (what a tag may be)."""
    tokens = tokenizer.backend.convert_ids_to_tokens(list(range(vocab_size)))
    special = set(tokenizer.special_token_ids)
    return torch.tensor([i not in special and _is_tag(tok) for i, tok in enumerate(tokens)])


def concepts(model: Any, images: Any, top: int = 10, maps: bool = False, block: int | None = None,
             batch_size: int = 16) -> list[ConceptTags]:
    """The `top` concept tags of each image, with their probabilities (and Grad-CAM maps if `maps`).

    images: image paths, PIL images or (B, 3, R, R) normalised pixels. block: the ViT block of the maps
    (default two thirds of the depth, as Grad-CAM's itc mode).
    """
    if not has_concept_head(model):
        raise MissingConceptHead(
            f"this {type(model).__name__} has no concept head: concept tags need a pretraining checkpoint trained "
            "with the psl objective (fine-tuned checkpoints and pretraining without psl drop the head)")
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    pil, pixels = open_images(images)
    count = len(pil) if pil is not None else pixels.shape[0]
    allowed = whole_word_mask(model.tokenizer, model.concept_head.out_features).to(model.device)
    top = min(top, int(allowed.sum()))
    block = (2 * model.config.vision.depth) // 3 if block is None else block
    grid = model.config.grid_size
    results: list[ConceptTags] = []
    with inference_mode_of(model):
        for start in range(0, count, batch_size):
            index = list(range(start, min(start + batch_size, count)))
            batch, sizes = batch_pixels(model, pil, pixels, index)
            with torch.no_grad():
                logits = model.concept_head(model.image_features(model.visual_encoder(batch))).float()
            probs, ids = logits.masked_fill(~allowed, float("-inf")).sigmoid().topk(top, dim=1)
            tag_maps = _tag_maps(model, batch, ids, block).view(len(index), top, grid, grid).cpu() if maps else None
            for row, (p, i) in enumerate(zip(probs.tolist(), ids.tolist())):
                words = model.tokenizer.backend.convert_ids_to_tokens(i)
                results.append(ConceptTags(list(zip(words, p)), None if tag_maps is None else tag_maps[row],
                                           sizes[row]))
    return results


def _tag_maps(model: Any, pixels: Tensor, ids: Tensor, block: int) -> Tensor:
    """(B * top, g*g): each image repeated once per tag, each copy explained w.r.t. its tag's logit."""
    top = ids.shape[1]
    repeated = pixels.repeat_interleave(top, dim=0)
    wanted = ids.reshape(-1, 1)

    def tag_logit(tokens: Tensor) -> Tensor:
        return model.concept_head(model.image_features(tokens)).gather(1, wanted)[:, 0]

    return vit_cls_map(model, repeated, block, tag_logit)
