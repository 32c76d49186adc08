"""The fast path of the training views: a crop chosen before decoding, uint8 tensor resizing, PIL round trips.

Measured on photographs of 500-1000 px (``benchmarks/input_pipeline.py``), a training view used to spend
most of its time in two places: decoding every pixel of the JPEG, and PIL's bicubic resize of the crop
(a scalar C loop). Here the crop box is drawn as soon as the image's header gives its size, so that
:func:`~simla.data.images.load_image` can decode a JPEG at the reduced scale the crop allows (libjpeg's
DCT scaling), and the crop is resized by torch's vectorised antialiased bicubic kernel on uint8 pixels.
Both compute the same kind of view as before (an antialiased bicubic reduction of the same random crop);
pixel values differ from PIL's by rounding, not by content.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Union

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["Box", "ImageSource", "ResizeRegion", "from_pil", "normalize_uint8", "read_source", "resize_uint8",
           "sample_crop_box", "to_pil"]

# Box = (top, left, height, width) in pixels of the source image, the torchvision convention.
Box = tuple[int, int, int, int]

# A decoded RGB image, or a reader called as ``reader(decode_size=...)`` with load_image's hook, so that the view
# can ask for a reduced-scale decode: ``functools.partial(load_image, path)`` is one.
ImageSource = Union[Image.Image, Callable[[Callable[[tuple[int, int]], "tuple[int, int] | None"] | None], Image.Image]]

# A view never asks for a reduced decode that would leave its crop smaller than this many times its output:
# below 2 there is no libjpeg scale to use anyway.
_MIN_REDUCTION = 2.0


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


class ResizeRegion:
    """The part of an image one view resizes, chosen when the image's (upright) size becomes known.

    Passed to ``load_image`` as ``decode_size``: called with the image's size, it draws the crop box
    (torchvision's RandomResizedCrop sampling, from ``rng``) or takes the whole image when ``crop`` is
    None, and returns the smallest decode size that keeps the box at least ``out_size`` pixels on each
    side. :meth:`resize` then maps the box onto whatever size was decoded and resizes it.
    """

    def __init__(self, out_size: int, crop: tuple[tuple[float, float], tuple[float, float]] | None = None,
                 rng: random.Random | None = None) -> None:
        """
        Args:
            out_size: the side of the square view.
            crop: (scale, ratio) of a RandomResizedCrop, or None to resize the whole image.
            rng: draws the crop (needed with ``crop``).
        """
        if crop is not None and rng is None:
            raise ValueError("a random crop needs an rng")
        self.out_size, self.crop, self.rng = int(out_size), crop, rng
        self.full_size: tuple[int, int] | None = None
        self.box: tuple[int, int, int, int] | None = None  # (top, left, height, width) at full size

    def __call__(self, size: tuple[int, int]) -> tuple[int, int] | None:
        width, height = int(size[0]), int(size[1])
        self.full_size = (width, height)
        if self.crop is None:
            self.box = (0, 0, height, width)
        else:
            scale, ratio = self.crop
            self.box = sample_crop_box(width, height, scale, ratio, self.rng)
        reduction = min(self.box[2], self.box[3]) / self.out_size
        if reduction < _MIN_REDUCTION:
            return None
        return math.ceil(width / reduction), math.ceil(height / reduction)

    def resize(self, img: Image.Image) -> torch.Tensor:
        """The box of ``img`` (decoded at full or reduced size) resized to (3, out, out) uint8."""
        if self.box is None:
            self(img.size)  # a decoded image was given directly: draw the box now
        full_width, full_height = self.full_size
        sx, sy = img.width / full_width, img.height / full_height
        top, left, h, w = self.box
        # Integer bounds on the decoded grid; at full size this is the box itself.
        y0, x0 = int(math.floor(top * sy)), int(math.floor(left * sx))
        y1 = min(img.height, max(y0 + 1, int(round((top + h) * sy))))
        x1 = min(img.width, max(x0 + 1, int(round((left + w) * sx))))
        # PIL copies just the box out (a fraction of the photo) before the one conversion to a tensor.
        return resize_uint8(from_pil(img.crop((x0, y0, x1, y1))), self.out_size)


def read_source(source: ImageSource, decode_size: Callable | None) -> Image.Image:
    """The decoded image of ``source``: a reader is called with ``decode_size``; a decoded image is returned as
    it is (a :class:`ResizeRegion` then draws its box from that image's size when it resizes it)."""
    if isinstance(source, Image.Image):
        return source
    if not callable(source):
        raise TypeError(f"expected a PIL image or an image reader, got {type(source).__name__}")
    return source(decode_size=decode_size)


def from_pil(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8 tensor (a view of one copy of the pixels)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """(3, H, W) uint8 tensor -> RGB PIL image."""
    return Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def resize_uint8(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8, antialiased bicubic (torch's vectorised uint8 kernel)."""
    return TF.resize(pixels, [size, size], interpolation=InterpolationMode.BICUBIC, antialias=True)


def normalize_uint8(pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 (x / 255 - mean) / std, in one pass over a batch or one view."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return pixels.to(torch.float32).mul_(scale).sub_(shift)
