"""Image views for pretraining and evaluation (the reference views, with shared geometry for MIM).

Pretraining needs two views of one image: the *encoder view* (R x R, CLIP-normalised) that the ViT sees
and the *tokenizer view* (R/2 x R/2, plain [0, 1]) from which the frozen visual tokenizer computes the
MIM targets. The reference samples the two views independently, so visual token (r, c) generally depicts
another region than ViT patch (r, c). By default we share one crop, one flip and the geometric part
of RandAugment between the views; photometric ops touch the encoder view only.

All randomness comes from an explicit :class:`random.Random`, never from torch's, numpy's or Python's
global generators, so a sample's views are a pure function of (image, per-sample seed); that is what lets
a resumed run reproduce its data exactly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .pixels import (Box, ImageSource, ResizeRegion, normalize_uint8, read_source, resize_uint8, sample_crop_box,
                     to_pil, from_pil)
from .randaugment import GEOMETRIC_OPS, PHOTOMETRIC_OPS, RANDAUGMENT_OPS, Op, RandAugment

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "GEOMETRIC_OPS", "PHOTOMETRIC_OPS", "RANDAUGMENT_OPS", "EvalView", "FinetuneView",
    "ImageSource", "Op", "PretrainViewConfig", "PretrainViews", "RandAugment", "sample_crop_box", "to_tensor",
]  # fmt: skip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

def _resized_crop(img: Image.Image, box: Box, size: int) -> Image.Image:
    """Crop ``box`` and resize it to size x size, bicubic, exactly as torchvision's resized_crop on PIL."""
    top, left, h, w = box
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float (3, H, W) tensor in [0, 1] (same values as torchvision's ToTensor)."""
    # Divide (not multiply by 1/255) in float32 so values equal torchvision's bit for bit; the HWC -> CHW
    # copy is made in numpy because strided float ops on a permuted torch view are several times slower.
    array = np.divide(np.asarray(img, dtype=np.uint8), np.float32(255.0), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def _normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std."""
    mean_t = torch.tensor(mean, dtype=tensor.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=tensor.dtype).view(-1, 1, 1)
    return (tensor - mean_t) / std_t


def _check_rgb(img: object) -> None:
    """Views expect what load_image returns; anything else is a caller bug."""
    if not isinstance(img, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(img).__name__}")
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image (use simla.data.images.load_image), got mode {img.mode!r}")


def _check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise ValueError(f"mean and std need 3 entries each and std > 0, got mean={mean}, std={std}")


@dataclass
class PretrainViewConfig:
    """Settings of the two pretraining views (defaults: the paper's).

    Attributes:
        image_size: encoder-view side R.
        tokenizer_size: tokenizer-view side (the reference's R // 2).
        scale: RandomResizedCrop area range.
        ratio: RandomResizedCrop aspect-ratio (w/h) range.
        hflip_prob: probability of a horizontal flip.
        randaugment: whether to apply RandAugment.
        mean, std: encoder-view normalisation (the CLIP constants).
        shared_geometry: True (default): one crop, one flip and one set of geometric RandAugment
            ops for both views, photometric ops on the encoder view only. False: the reference's
            independent views, for ablations.
    """

    image_size: int = 256
    tokenizer_size: int = 128
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_prob: float = 0.5
    randaugment: bool = True
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    shared_geometry: bool = True

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.tokenizer_size < 1:
            raise ValueError(f"image sizes must be positive, got {self.image_size}, {self.tokenizer_size}")
        if not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"scale must satisfy 0 < low <= high, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0.0 <= self.hflip_prob <= 1.0:
            raise ValueError(f"hflip_prob must be in [0, 1], got {self.hflip_prob}")
        _check_mean_std(self.mean, self.std)


class PretrainViews:
    """Build (encoder view, tokenizer view) from one RGB image and a per-sample ``random.Random``.

    The encoder view is a float (3, image_size, image_size) tensor normalised with mean/std. The
    tokenizer view is a float (3, tokenizer_size, tokenizer_size) tensor in [0, 1], neither normalised
    nor DALL-E-mapped (0.8 x + 0.1): the visual tokenizer applies its own input mapping.
    """

    def __init__(self, config: PretrainViewConfig | None = None, randaugment: RandAugment | None = None) -> None:
        """
        Args:
            config: view settings; defaults to :class:`PretrainViewConfig()`.
            randaugment: the augmentation to use when ``config.randaugment`` is on; defaults to the
                reference configuration :class:`RandAugment()`.
        """
        self.config = config if config is not None else PretrainViewConfig()
        self.randaugment = (randaugment or RandAugment()) if self.config.randaugment else None

    def __call__(self, img: ImageSource, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(encoder_view, tokenizer_view)``; all randomness is drawn from ``rng``.

        ``img`` is a decoded RGB image or a reader (see :data:`~simla.data.pixels.ImageSource`); a reader
        lets a JPEG be decoded at the reduced scale the crop allows.
        """
        encoder, tokenizer = self.pixels(img, rng)
        return self.normalize(encoder), tokenizer.to(torch.float32) / 255.0

    def pixels(self, img: ImageSource, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views as uint8 (3, R, R) tensors, before normalisation.

        The pretraining loader batches these (a quarter of the bytes of floats to move between processes
        and onto the GPU) and normalises whole batches on the device (:meth:`normalize`).
        """
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        if self.config.shared_geometry:
            return self._shared_views(img, rng)
        # Reference order: the tokenizer view is transformed first, then the encoder view.
        img = _checked(read_source(img, None))
        tokenizer_img = self._independent_view(img, self.config.tokenizer_size, rng)
        encoder_img = self._independent_view(img, self.config.image_size, rng)
        return from_pil(encoder_img), from_pil(tokenizer_img)

    def normalize(self, encoder_pixels: torch.Tensor) -> torch.Tensor:
        """uint8 encoder view(s) (..., 3, R, R) -> float32 normalised with the config's mean and std."""
        return normalize_uint8(encoder_pixels, self.config.mean, self.config.std)

    def _shared_views(self, source: ImageSource, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """The same crop at both resolutions, so token (r, c) depicts ViT patch (r, c); uint8 (3, R, R) each.

        One resize of the crop makes the encoder view and the tokenizer view is resized from it (a
        second antialiased reduction of the same pixels, far cheaper than a second pass over the crop).
        """
        cfg = self.config
        region = ResizeRegion(cfg.image_size, (cfg.scale, cfg.ratio), rng)
        encoder = region.resize(_checked(read_source(source, region)))
        tokenizer = resize_uint8(encoder, cfg.tokenizer_size)
        if rng.random() < cfg.hflip_prob:
            encoder, tokenizer = encoder.flip(-1), tokenizer.flip(-1)
        if self.randaugment is not None:
            ops = self.randaugment.sample(rng)
            encoder = _augment(self.randaugment, encoder, ops)
            # Same geometric motion, translation rescaled to the smaller grid; no photometric ops, so
            # the MIM targets describe the un-augmented content the encoder view was derived from.
            tokenizer = _augment(self.randaugment, tokenizer, ops, photometric=False,
                                 scale=cfg.tokenizer_size / cfg.image_size)
        return encoder, tokenizer

    def _independent_view(self, img: Image.Image, size: int, rng: random.Random) -> Image.Image:
        """The reference: each view has its own crop, flip and full RandAugment (7 px at any size), in PIL."""
        cfg = self.config
        box = sample_crop_box(img.width, img.height, cfg.scale, cfg.ratio, rng)
        view = _resized_crop(img, box, size)
        if rng.random() < cfg.hflip_prob:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            view = self.randaugment(view, rng)
        return view


def _augment(randaugment: RandAugment, pixels: torch.Tensor, ops: Sequence[Op], *, photometric: bool = True,
             scale: float = 1.0) -> torch.Tensor:
    """Apply the fired ops (PIL) to a uint8 view; no round trip through PIL when none of them fires."""
    if not any(op.applied and (photometric or op.geometric) for op in ops):
        return pixels
    return from_pil(randaugment.apply(to_pil(pixels), ops, photometric=photometric, geometric=True, scale=scale))


def _checked(img: object) -> Image.Image:
    _check_rgb(img)
    return img


class EvalView:
    """The reference test transform: Resize((R, R)) bicubic (no crop), ToTensor, Normalize."""

    def __init__(
        self,
        image_size: int = 384,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        _check_mean_std(mean, std)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """Return a normalised float (3, image_size, image_size) tensor."""
        _check_rgb(img)
        resized = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return _normalize(to_tensor(resized), self.mean, self.std)


@dataclass
class FinetuneView:
    """Fine-tuning train view: RandomResizedCrop(scale 0.5-1, bicubic), flip, RandAugment, normalise.

    crop=False resizes the whole image instead (the grounding view: a crop could cut the referred object
    out); hflip=False keeps left and right (a flip contradicts "the man on the left").
    """

    image_size: int = 384
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    randaugment: bool = True
    crop: bool = True
    hflip: bool = True

    def __post_init__(self) -> None:
        self._augment = RandAugment() if self.randaugment else None

    def __call__(self, img: ImageSource, rng: random.Random) -> torch.Tensor:
        """A normalised float (3, image_size, image_size) view; ``img`` may be a reader (reduced JPEG decoding)."""
        region = ResizeRegion(self.image_size, (self.scale, self.ratio) if self.crop else None, rng)
        pixels = region.resize(_checked(read_source(img, region)))
        if self.hflip and rng.random() < 0.5:
            pixels = pixels.flip(-1)
        if self._augment is not None:
            pixels = _augment(self._augment, pixels, self._augment.sample(rng))
        return normalize_uint8(pixels, CLIP_MEAN, CLIP_STD)
