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

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "GEOMETRIC_OPS", "PHOTOMETRIC_OPS", "RANDAUGMENT_OPS", "EvalView", "Op",
    "PretrainViewConfig", "PretrainViews", "RandAugment", "sample_crop_box", "to_tensor",
]  # fmt: skip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The reference op list, in its order (docs/reference-behaviour.md).
RANDAUGMENT_OPS = (
    "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)  # fmt: skip
# Ops that move pixels; these must be identical in both views to keep tokens aligned with patches.
GEOMETRIC_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"})
# Ops that change values in place (Identity counts here: it is harmless to skip anywhere).
PHOTOMETRIC_OPS = frozenset({"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness"})
# Ops whose magnitude gets a random sign; Brightness/Sharpness only ever increase, as in the reference.
_SIGNED_OPS = GEOMETRIC_OPS

# Box = (top, left, height, width) in pixels of the source image, the torchvision convention.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Op:
    """One sampled RandAugment decision.

    Attributes:
        name: the op, one of :data:`RANDAUGMENT_OPS`.
        applied: whether the op fires (each fires with probability ``RandAugment.prob``).
        value: the signed parameter: enhancement factor, shear factor, degrees, or a translation in
            pixels of the view it was sampled for (the encoder view; ``scale`` in
            :meth:`RandAugment.apply` converts it for a view of another resolution).
    """

    name: str
    applied: bool
    value: float = 0.0

    @property
    def geometric(self) -> bool:
        """True for ops that move pixels (shear, translate, rotate)."""
        return self.name in GEOMETRIC_OPS


class RandAugment:
    """The reference RandAugment (2 ops with replacement, p=0.5, magnitude 7), split into sampling and application.

    ``num_ops`` ops are drawn *with replacement* from ``ops``; each fires with probability ``prob``.
    At magnitude m of ``max_magnitude`` M the parameters are: enhancement factor ``0.1 + 1.8 m/M``
    (1.36 at 7/10, increase only); shear ``max_shear m/M`` (0.21); translation ``max_translate m/M``
    pixels (7); rotation ``max_rotate m/M`` degrees (21); geometric ops get a random sign and fill
    uncovered pixels with ``fill``. Ops run in PIL with bilinear resampling (the reference used OpenCV's
    default, also bilinear); shear is about the top-left corner and rotation about the centre, both in
    continuous coordinates, so one parameter set means the same motion at any resolution.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 7.0,
        *,
        max_magnitude: float = 10.0,
        prob: float = 0.5,
        ops: Sequence[str] = RANDAUGMENT_OPS,
        max_shear: float = 0.3,
        max_translate: float = 10.0,
        max_rotate: float = 30.0,
        fill: tuple[int, int, int] = (128, 128, 128),
    ) -> None:
        unknown = sorted(set(ops) - set(RANDAUGMENT_OPS))
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {RANDAUGMENT_OPS}, got unknown {unknown}")
        if num_ops < 0 or not 0.0 <= prob <= 1.0 or max_magnitude <= 0 or not 0 <= magnitude <= max_magnitude:
            raise ValueError(
                f"need num_ops >= 0, 0 <= prob <= 1, 0 <= magnitude <= max_magnitude; got "
                f"num_ops={num_ops}, prob={prob}, magnitude={magnitude}, max_magnitude={max_magnitude}"
            )
        self.num_ops = int(num_ops)
        self.prob = float(prob)
        self.ops = tuple(ops)
        self.fill = tuple(int(c) for c in fill)
        level = magnitude / max_magnitude
        # Unsigned magnitudes per op; sample() adds the sign where the reference does.
        self.values: dict[str, float] = {
            "Identity": 0.0,
            "AutoContrast": 0.0,
            "Equalize": 0.0,
            "Brightness": 0.1 + 1.8 * level,
            "Sharpness": 0.1 + 1.8 * level,
            "ShearX": max_shear * level,
            "ShearY": max_shear * level,
            "TranslateX": max_translate * level,
            "TranslateY": max_translate * level,
            "Rotate": max_rotate * level,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_ops={self.num_ops}, prob={self.prob}, ops={self.ops}, values={self.values})"

    def sample(self, rng: random.Random) -> list[Op]:
        """Draw the random decisions: which ops, whether each fires, and the signs.

        Exactly three numbers are drawn per op whatever the outcome, so the rng's later state does not
        depend on which ops were chosen (keeps downstream draws stable when the op list is edited).
        """
        sampled = []
        for _ in range(self.num_ops):
            name = self.ops[int(rng.random() * len(self.ops))]
            applied = rng.random() < self.prob
            negative = rng.random() < 0.5
            value = self.values[name]
            if name in _SIGNED_OPS and negative:
                value = -value
            sampled.append(Op(name, applied, value))
        return sampled

    def apply(
        self,
        img: Image.Image,
        ops: Sequence[Op],
        *,
        photometric: bool = True,
        geometric: bool = True,
        scale: float = 1.0,
    ) -> Image.Image:
        """Apply the fired ops in order, restricted to the requested kinds.

        Args:
            img: an RGB image.
            ops: decisions from :meth:`sample`.
            photometric: run the value-changing ops.
            geometric: run shear/translate/rotate.
            scale: multiplies translations (given in pixels at the reference resolution) for a view of
                another resolution, e.g. 0.5 for the 128-px tokenizer view of a 256-px encoder view.
        """
        for op in ops:
            if not op.applied or (op.geometric and not geometric) or (not op.geometric and not photometric):
                continue
            img = self._apply_one(img, op, scale)
        return img

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        """Sample and apply everything: the reference behaviour for a single view."""
        return self.apply(img, self.sample(rng))

    def _apply_one(self, img: Image.Image, op: Op, scale: float) -> Image.Image:
        """Run one op on a PIL image."""
        name, value = op.name, op.value
        if name == "Identity":
            return img
        if name == "AutoContrast":
            return ImageOps.autocontrast(img)  # per channel, no cutoff
        if name == "Equalize":
            return ImageOps.equalize(img)  # per-channel histogram equalisation
        if name == "Brightness":
            return ImageEnhance.Brightness(img).enhance(value)  # multiplies values, clipped at 255
        if name == "Sharpness":
            return ImageEnhance.Sharpness(img).enhance(value)  # blend with the 3x3 smoothed image
        # PIL's affine data maps each *output* position (x, y) to the input position (a x + b y + c,
        # d x + e y + f); the sign convention is irrelevant because every geometric op has a random sign.
        if name == "ShearX":
            return self._affine(img, (1.0, value, 0.0, 0.0, 1.0, 0.0))
        if name == "ShearY":
            return self._affine(img, (1.0, 0.0, 0.0, value, 1.0, 0.0))
        if name == "TranslateX":
            return self._affine(img, (1.0, 0.0, value * scale, 0.0, 1.0, 0.0))
        if name == "TranslateY":
            return self._affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, value * scale))
        if name == "Rotate":
            return img.rotate(value, resample=Image.Resampling.BILINEAR, fillcolor=self.fill)
        raise AssertionError(f"unhandled op {name!r}")  # unreachable: ops are validated in __init__

    def _affine(self, img: Image.Image, data: tuple[float, ...]) -> Image.Image:
        return img.transform(
            img.size, Image.Transform.AFFINE, data, resample=Image.Resampling.BILINEAR, fillcolor=self.fill
        )


def sample_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
) -> Box:
    """Sample a RandomResizedCrop box the way torchvision does, but from ``rng``.

    Up to 10 attempts draw an area fraction uniformly from ``scale`` and an aspect ratio (w/h)
    log-uniformly from ``ratio``; the first box that fits is placed uniformly. If none fits, fall back
    to the largest central crop whose aspect ratio is clamped into ``ratio``.

    Returns:
        (top, left, height, width) in pixels.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return top, left, h, w
    return _central_box(width, height, ratio)


def _central_box(width: int, height: int, ratio: tuple[float, float]) -> Box:
    """The fallback crop: the whole image, trimmed to the nearest allowed aspect ratio, centred."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


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

    def __call__(self, img: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(encoder_view, tokenizer_view)``; all randomness is drawn from ``rng``."""
        _check_rgb(img)
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
        if self.config.shared_geometry:
            encoder_img, tokenizer_img = self._shared_views(img, rng)
        else:
            # Reference order: the tokenizer view is transformed first, then the encoder view.
            tokenizer_img = self._independent_view(img, self.config.tokenizer_size, rng)
            encoder_img = self._independent_view(img, self.config.image_size, rng)
        encoder = _normalize(to_tensor(encoder_img), self.config.mean, self.config.std)
        return encoder, to_tensor(tokenizer_img)

    def _crop_and_flip(self, img: Image.Image, sizes: Sequence[int], rng: random.Random) -> list[Image.Image]:
        """One crop box and one flip decision, rendered at each of ``sizes``."""
        cfg = self.config
        box = sample_crop_box(img.width, img.height, cfg.scale, cfg.ratio, rng)
        flip = rng.random() < cfg.hflip_prob
        views = [_resized_crop(img, box, size) for size in sizes]
        if flip:
            views = [view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for view in views]
        return views

    def _shared_views(self, img: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image]:
        """The same crop at both resolutions, so token (r, c) depicts ViT patch (r, c)."""
        cfg = self.config
        encoder_img, tokenizer_img = self._crop_and_flip(img, (cfg.image_size, cfg.tokenizer_size), rng)
        if self.randaugment is not None:
            ops = self.randaugment.sample(rng)
            encoder_img = self.randaugment.apply(encoder_img, ops)
            # Same geometric motion, translation rescaled to the smaller grid; no photometric ops, so
            # the MIM targets describe the un-augmented content the encoder view was derived from.
            tokenizer_img = self.randaugment.apply(
                tokenizer_img, ops, photometric=False, geometric=True, scale=cfg.tokenizer_size / cfg.image_size
            )
        return encoder_img, tokenizer_img

    def _independent_view(self, img: Image.Image, size: int, rng: random.Random) -> Image.Image:
        """The reference: each view has its own crop, flip and full RandAugment (7 px at any size)."""
        (view,) = self._crop_and_flip(img, (size,), rng)
        if self.randaugment is not None:
            view = self.randaugment(view, rng)
        return view


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

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        if self.crop:
            box = sample_crop_box(img.width, img.height, self.scale, self.ratio, rng)
            img = _resized_crop(img, box, self.image_size)
        else:
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if self._augment is not None:
            img = self._augment(img, rng)
        return _normalize(to_tensor(img), CLIP_MEAN, CLIP_STD)
