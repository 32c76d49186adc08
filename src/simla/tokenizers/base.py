"""The `VisualTokenizer` interface shared by every visual tokenizer, and helpers for reading tokenizer files.

See `simla.tokenizers.visual` for the overview; the implementations live in
`simla.tokenizers.dalle` and `simla.tokenizers.kmeans`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn


logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Safetensors metadata: the `kind` field says which tokenizer a file holds; `format_version` lets a future
# layout change be detected instead of misread.
KIND_KMEANS = "kmeans"
KIND_DALLE = "dalle"
FORMAT_VERSION = "1"


# --------------------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------------------


class VisualTokenizer(nn.Module, abc.ABC):
    """A frozen model mapping (B, 3, S, S) images in [0, 1] to (B, grid_size**2) discrete token ids.

    Attributes:
        vocab_size: number of distinct token ids; ids lie in [0, vocab_size).
        image_size: side S, in pixels, of the square input images the tokenizer expects.
        grid_size: tokens per side; the output holds grid_size**2 ids per image, row-major, so that id
            ``r * grid_size + c`` depicts the pixel block at grid row r, column c.

    Subclasses implement `_encode`; `forward` does the shared input checks and disables autograd and autocast.
    The module is always in eval mode (`train()` is overridden) and its parameters never require grad, so it
    can sit inside a model that is being trained without being updated or switched to training behaviour.
    """

    vocab_size: int
    image_size: int
    grid_size: int

    def __init__(self, vocab_size: int, image_size: int, grid_size: int) -> None:
        super().__init__()
        if vocab_size < 1 or image_size < 1 or grid_size < 1:
            raise ValueError(
                f"vocab_size, image_size and grid_size must be positive, got {vocab_size}, {image_size}, {grid_size}"
            )
        if image_size % grid_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of grid_size {grid_size}")
        self.vocab_size = int(vocab_size)
        self.image_size = int(image_size)
        self.grid_size = int(grid_size)

    @property
    def num_tokens(self) -> int:
        """Tokens per image (grid_size squared)."""
        return self.grid_size * self.grid_size

    @property
    def pixels_per_token(self) -> int:
        """Side, in input pixels, of the image block one token depicts."""
        return self.image_size // self.grid_size

    def _freeze(self) -> None:
        """Stop gradients and pin eval mode; subclasses call this at the end of `__init__`."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> VisualTokenizer:
        """Stay in eval mode whatever is asked: the targets must not depend on the training state.

        A parent model's `model.train()` recurses into every child; without this override it would put, for
        instance, normalisation or dropout layers of a loaded encoder into training behaviour.
        """
        if mode:
            logger.debug("%s ignores train(True): visual tokenizers always stay in eval mode", type(self).__name__)
        return super().train(False)

    def check_images(self, images: Tensor) -> None:
        """Raise ValueError unless `images` is a float (B, 3, image_size, image_size) tensor.

        The value range is not checked: that would need a host sync per batch.
        """
        if not isinstance(images, Tensor):
            raise TypeError(f"{type(self).__name__} expects a torch.Tensor, got {type(images).__name__}")
        expected = ("B", 3, self.image_size, self.image_size)
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"{type(self).__name__} expects images of shape {expected} (float, values in [0, 1]), "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} expects float images with values in [0, 1], got dtype {images.dtype}; "
                "convert uint8 images with images.float() / 255"
            )

    def forward(self, images: Tensor) -> Tensor:
        """Tokenize `images` (B, 3, S, S), float in [0, 1], into (B, grid_size**2) int64 ids (row-major)."""
        self.check_images(images)
        # no_grad rather than inference_mode: the ids are used as cross-entropy targets, and autograd refuses
        # to save inference-mode tensors for backward.
        with torch.no_grad(), _autocast_disabled(images.device):
            # Computed in fp32: a code assignment is an argmax/argmin, which low precision would perturb.
            ids = self._encode(images.float())
        batch = images.shape[0]
        if ids.shape[0] != batch or ids.numel() != batch * self.num_tokens:
            raise RuntimeError(
                f"{type(self).__name__}._encode returned shape {tuple(ids.shape)}, expected "
                f"({batch}, {self.grid_size}, {self.grid_size}) or ({batch}, {self.num_tokens})"
            )
        return ids.reshape(batch, self.num_tokens).long()

    @abc.abstractmethod
    def _encode(self, images: Tensor) -> Tensor:
        """Map checked fp32 images (B, 3, S, S) to ids of shape (B, grid, grid) or (B, grid**2), row-major."""

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, image_size={self.image_size}, grid_size={self.grid_size}"


@contextlib.contextmanager
def _autocast_disabled(device: torch.device) -> Iterator[None]:
    """Disable autocast for `device`'s type, so an enclosing bf16/fp16 region cannot change the ids."""
    if device.type in ("cuda", "cpu"):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        # Other backends may not support autocast at all; then there is nothing to disable.
        yield


# --------------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------------


def _check_path(path: PathLike) -> Path:
    """Return `path` as a Path, raising FileNotFoundError (naming it) if it is not an existing file."""
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"visual tokenizer file not found: {str(path)!r}")
    if not resolved.is_file():
        raise FileNotFoundError(f"visual tokenizer path is not a file: {str(path)!r}")
    return resolved


def _read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a safetensors file ({} when it has none)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


def _metadata_int(metadata: Mapping[str, str], key: str, path: Path) -> int:
    """Read a positive integer metadata field, with an error naming the file and the field."""
    if key not in metadata:
        raise ValueError(f"{path}: safetensors metadata lacks the field {key!r} (found {sorted(metadata)})")
    try:
        value = int(metadata[key])
    except ValueError:
        raise ValueError(f"{path}: metadata field {key!r} must be an integer, got {metadata[key]!r}") from None
    if value < 1:
        raise ValueError(f"{path}: metadata field {key!r} must be positive, got {value}")
    return value


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() == ".safetensors"


__all__ = [
    "FORMAT_VERSION",
    "KIND_DALLE",
    "KIND_KMEANS",
    "PathLike",
    "VisualTokenizer",
]
