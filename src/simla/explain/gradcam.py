"""Grad-CAM maps of SIMLA's image-text alignment: which image patches a caption, and each of its words, rely on.

target="itm" (the paper's figures and its grounding evaluation): the multimodal pass of the shared encoder
on (image, text) with one layer's cross-attention kept; the score is the ITM head's positive logit, and the
map of a text token is its attention to the image patches times the positive part of the score's gradient
with respect to that attention, averaged over heads. A word's map averages the rows of its wordpieces; the
whole text's map averages the rows of every real token ([CLS] included, padding never: the reference also
averages padded rows). Only the explained layer materialises attention probabilities; every other layer
keeps the fused SDPA path, and the model's training path is untouched.

target="itc" (the reference's alternative mode): the map of the image [CLS] row of one ViT block's
self-attention, with respect to the ITC similarity of the pair (one map per text, no per-word maps).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ..data.images import load_image
from ..models.simla import SimlaModel


Target = Literal["itm", "itc"]


@dataclass
class Explanation:
    """The Grad-CAM maps of one (image, text) pair.

    Attributes:
        text: the text as given.
        words: the typed (whitespace-separated) words that produced tokens, in order.
        target: "itm" or "itc".
        layer: the explained shared-encoder layer (itm) or ViT block (itc).
        score: itm: the probability that image and text match; itc: the cosine similarity of their features.
        text_map: (g, g) map of the whole text on the model's patch grid.
        word_maps: (len(words), g, g) one map per word (itm only; None for itc).
        image_size: (height, width) of the image as given, the size `*_image` maps are upsampled to.
        truncated: the text had more tokens than the model's positions; the words after the cut are absent.
        tokens: how many real tokens ([CLS], wordpieces, [SEP]) the whole-text map averages; a drawing needs it
            to put the words on the scale of the tokens' summed maps (None when not known).
    """

    text: str
    words: list[str]
    target: str
    layer: int
    score: float
    text_map: Tensor
    word_maps: Tensor | None
    image_size: tuple[int, int]
    truncated: bool = False
    tokens: int | None = None

    @property
    def text_map_image(self) -> Tensor:
        """The whole-text map upsampled to the image, (H, W)."""
        return upsample_map(self.text_map, self.image_size)

    @property
    def word_maps_image(self) -> Tensor | None:
        """The word maps upsampled to the image, (len(words), H, W)."""
        return None if self.word_maps is None else upsample_map(self.word_maps, self.image_size)

    def to_dict(self, decimals: int = 5) -> dict[str, Any]:
        """JSON-ready numbers (maps on the patch grid, row-major)."""
        def grid(t: Tensor) -> list:
            return torch.round(t.float(), decimals=decimals).tolist()

        return {"text": self.text, "words": self.words, "target": self.target, "layer": self.layer,
                "score": round(self.score, 6), "image_size": list(self.image_size), "truncated": self.truncated,
                "text_map": grid(self.text_map),
                "word_maps": None if self.word_maps is None else dict(zip(self.words, map(grid, self.word_maps)))}


def upsample_map(cam: Tensor, size: tuple[int, int]) -> Tensor:
    """(g, g) or (N, g, g) maps -> (H, W) or (N, H, W) float32, bicubic without corner alignment (the
    reference's; values may overshoot below zero)."""
    if cam.dim() not in (2, 3):
        raise ValueError(f"expected a (g, g) map or a stack of them, got shape {tuple(cam.shape)}")
    height, width = (int(v) for v in size)
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {tuple(size)}")
    squeeze = cam.dim() == 2
    batch = cam.detach()[None, None] if squeeze else cam.detach()[:, None]
    out = F.interpolate(batch.float(), size=(height, width), mode="bicubic", align_corners=False)[:, 0]
    return out[0] if squeeze else out


def peak_point(heat: Tensor) -> tuple[float, float] | None:
    """The (x, y) centre of the map's first maximal pixel; None for a flat or non-finite map."""
    if heat.dim() != 2 or heat.numel() == 0:
        raise ValueError(f"expected an (H, W) map, got shape {tuple(heat.shape)}")
    if not torch.isfinite(heat).all() or bool(heat.max() == heat.min()):
        return None
    index = int(torch.argmax(heat.flatten()))  # torch returns the first maximal index
    row, col = divmod(index, heat.shape[1])
    return col + 0.5, row + 0.5


# ------------------------------------------------------------------------------------------- inputs

def open_images(images: Any) -> tuple[list[Image.Image] | None, Tensor | None]:
    """Paths / PIL images -> RGB PIL images; a pixel tensor passes through as the second element."""
    if isinstance(images, Tensor):
        return None, images if images.dim() == 4 else images.unsqueeze(0)
    single = isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "convert")
    items = [images] if single else list(images)
    return [item.convert("RGB") if hasattr(item, "convert") else load_image(item) for item in items], None


def batch_pixels(model: SimlaModel, pil: list[Image.Image] | None, pixels: Tensor | None,
                 index: Sequence[int]) -> tuple[Tensor, list[tuple[int, int]]]:
    """The model-ready pixels of images `index` (from `open_images`) and each image's (height, width)."""
    if pil is not None:
        return model.prepare_pixels([pil[i] for i in index]), [(pil[i].height, pil[i].width) for i in index]
    batch = pixels[list(index)].to(model.device)
    return batch, [tuple(batch.shape[-2:])] * len(index)


def _pair_up(num_images: int, texts: str | Sequence[str]) -> tuple[list[int], list[str]]:
    """Image index and text of every pair: one-to-one, or one side broadcast to the other."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or num_images == 0:
        raise ValueError("gradcam needs at least one image and one text")
    if len(texts) == num_images:
        return list(range(num_images)), texts
    if num_images == 1:
        return [0] * len(texts), texts
    if len(texts) == 1:
        return list(range(num_images)), texts * num_images
    raise ValueError(f"pair images with texts one to one (or give one of either): got {num_images} images and "
                     f"{len(texts)} texts")


def tokenize_with_words(model: SimlaModel, texts: Sequence[str]) -> tuple[Tensor, Tensor, list[Any]]:
    """Padded ids and mask for `texts` (up to the model's positions) and each text's `WordPieces`."""
    limit = model.config.text.max_position_embeddings
    pieces = [model.tokenizer.tokenize_words(text, limit) for text in texts]
    width = max(len(p.ids) for p in pieces)
    pad = model.config.text.pad_token_id
    ids = torch.tensor([p.ids + [pad] * (width - len(p.ids)) for p in pieces], dtype=torch.long)
    mask = torch.tensor([[1] * len(p.ids) + [0] * (width - len(p.ids)) for p in pieces], dtype=torch.long)
    return ids.to(model.device), mask.to(model.device), pieces


@contextmanager
def inference_mode_of(model: torch.nn.Module):
    """Dropout off for the explanation; the caller's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------- the maps
def itm_token_maps(model: SimlaModel, pixels: Tensor, ids: Tensor, mask: Tensor, layer: int) -> tuple[Tensor, Tensor]:
    """Per-token Grad-CAM (B, L, g*g) of `layer`'s cross-attention w.r.t. the ITM positive logit, and the
    match probabilities (B,)."""
    with torch.no_grad():
        image_tokens = model.visual_encoder(pixels)
    # The ViT is outside the explained graph: the backward pass runs through the text side only.
    image_tokens = image_tokens.detach().requires_grad_(True)
    with torch.enable_grad(), model.text_encoder.capture_cross_attention(layer) as attention:
        logits = model.itm_head(model.fuse(image_tokens, ids, mask)[:, 0]).float()
        probs = attention.saved_probs
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), probs)
    cam = (probs.detach() * grad.clamp(min=0))[..., 1:].float().mean(1)  # drop the image [CLS] key; mean of heads
    return cam, logits.detach().softmax(-1)[:, 1]


def vit_cls_map(model: SimlaModel, pixels: Tensor, block: int, score_of_tokens) -> Tensor:
    """Grad-CAM (B, g*g) of ViT block `block`'s [CLS]->patch attention w.r.t. `score_of_tokens(tokens) -> (B,)`."""
    pixels = pixels.detach().requires_grad_(True)  # so that the attention is in a graph even if weights are frozen
    with torch.enable_grad(), model.visual_encoder.capture_attention(block) as captured:
        score = score_of_tokens(model.visual_encoder(pixels))
        (probs,) = captured
        (grad,) = torch.autograd.grad(score.sum(), probs)
    return (probs.detach()[:, :, 0, 1:] * grad[:, :, 0, 1:].clamp(min=0)).float().mean(1)


def _word_average(cam: Tensor, pieces: Sequence[Any]) -> list[Tensor]:
    """(B, L, P) token maps -> per text a (num_words, P) tensor: the mean over each word's wordpieces."""
    out = []
    for row, piece in zip(cam, pieces):
        owner = torch.tensor(piece.word_of_token, device=cam.device)
        words = torch.arange(len(piece.words), device=cam.device)
        assign = (owner[None, :] == words[:, None]).float()  # (W, len(ids))
        out.append(assign @ row[: len(piece.ids)] / assign.sum(1, keepdim=True))
    return out


def _check_model(model: Any) -> SimlaModel:
    if not isinstance(model, SimlaModel):
        raise TypeError(f"Grad-CAM needs a model with ITC and ITM heads (pretraining, retrieval or grounding); "
                        f"got {type(model).__name__}")
    return model


def gradcam(model: SimlaModel, images: Any, texts: str | Sequence[str], layer: int | None = None,
            target: Target = "itm", batch_size: int = 16) -> list[Explanation]:
    """Grad-CAM maps of each (image, text) pair.

    images: image paths, PIL images, or (B, 3, R, R) normalised pixels. texts: one per image (or one text
    for every image, or one image for every text). layer: the shared-encoder layer (itm; default
    `config.gradcam_layer`, the reference's 8 of 12) or the ViT block (itc; default two thirds of the ViT
    depth). Texts may be as long as the model's position embeddings (longer ones are cut and flagged).
    """
    model = _check_model(model)
    if target not in ("itm", "itc"):
        raise ValueError(f"target must be 'itm' or 'itc', got {target!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pil, pixels = open_images(images)
    count = len(pil) if pil is not None else pixels.shape[0]
    image_of, texts = _pair_up(count, texts)
    if layer is None:
        layer = model.config.gradcam_layer if target == "itm" else (2 * model.config.vision.depth) // 3
    results: list[Explanation] = []
    with inference_mode_of(model):
        for start in range(0, len(texts), batch_size):
            chunk = range(start, min(start + batch_size, len(texts)))
            images, sizes = batch_pixels(model, pil, pixels, [image_of[i] for i in chunk])
            results.extend(_explain_batch(model, images, [texts[i] for i in chunk], sizes, layer, target))
    return results


def _explain_batch(model: SimlaModel, pixels: Tensor, texts: list[str], sizes: list[tuple[int, int]], layer: int,
                   target: str) -> list[Explanation]:
    grid = model.config.grid_size
    ids, mask, pieces = tokenize_with_words(model, texts)
    if target == "itm":
        cam, scores = itm_token_maps(model, pixels, ids, mask, layer)
        real = mask.float()
        text_maps = (cam * real[..., None]).sum(1) / real.sum(1, keepdim=True)
        word_maps = [w.view(-1, grid, grid) for w in _word_average(cam, pieces)]
    else:
        with torch.no_grad():
            text_feat = model.text_features(model.text_encoder(ids, mask, mode="text"))

        def similarity(tokens: Tensor) -> Tensor:
            return (model.image_features(tokens) * text_feat).sum(-1) / model.temp

        text_maps = vit_cls_map(model, pixels, layer, similarity)
        with torch.no_grad():
            scores = similarity(model.visual_encoder(pixels)) * model.temp  # the cosine similarity
        word_maps = [None] * len(texts)
    return [Explanation(text=t, words=p.words, target=target, layer=layer, score=float(s),
                        text_map=m.view(grid, grid).cpu(), word_maps=None if w is None else w.cpu(),
                        image_size=size, truncated=p.truncated, tokens=len(p.ids))
            for t, p, s, m, w, size in zip(texts, pieces, scores.tolist(), text_maps, word_maps, sizes)]
