"""Visual tokenizers: frozen image -> discrete-code models that produce the MIM targets (SPEC §2.4).

SIMLA's masked-image-modelling objective predicts, for every masked ViT patch, the id of a discrete visual
token computed from a second "tokenizer view" of the image (the same crop at R/2 pixels, so that the token
grid matches the ViT patch grid; SPEC A2). This module gives that computation one interface,
`VisualTokenizer`, and two implementations:

- `DalleTokenizer`, the OpenAI DALL-E dVAE encoder used by the reference (needs the optional `dall-e`
  package and the released weights);
- `KMeansTokenizer`, a built-in k-means codebook over contrast-normalised pixel patches, which needs no
  download, so that MIM also works on a fresh offline install.

All tokenizers take float images in [0, 1] (no mean/std normalisation) of shape (B, 3, S, S) and return
(B, grid_size * grid_size) int64 ids, flattened row-major. They are frozen, always in eval mode, and run
without autograd and without autocast, so that a surrounding bf16 autocast region cannot change the targets.

Loading follows SPEC A4: state dicts are read with `torch.load(weights_only=True)` or from safetensors; a
file that needs arbitrary unpickling (the original `encoder.pkl` is a pickled module) is refused unless the
caller passes `trust_pickle=True`.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import pickle
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

# Safetensors metadata: the `kind` field says which tokenizer a file holds; `format_version` lets a future
# layout change be detected instead of misread.
KIND_KMEANS = "kmeans"
KIND_DALLE = "dalle"
FORMAT_VERSION = "1"

# DALL-E's logit-Laplace pixel map squeezes [0, 1] into [eps, 1 - eps]; the released encoder was trained on
# inputs mapped this way (dall_e.utils.logit_laplace_eps = 0.1), so x -> 0.8 x + 0.1.
DALLE_PIXEL_EPS = 0.1
# The dVAE encoder downsamples by three 2x max-pools.
DALLE_DOWNSAMPLE = 8
# Default tokenizer-view resolution: R/2 for R = 256, giving the 16x16 grid of the ViT-B/16 patches.
DALLE_DEFAULT_IMAGE_SIZE = 128
# The encoder architecture in the `dall-e` package has exactly four groups (it is not a constructor field).
DALLE_GROUP_COUNT = 4

# Elements of one (rows x K) distance block in nearest-centroid search: bounds the temporary to 128 MiB of
# fp32 whatever the batch size and codebook size.
_DIST_BLOCK_ELEMENTS = 1 << 25
# k-means++ seeding looks at no more than this many candidate points per centroid (see `_kmeans_plus_plus`).
_KMEANSPP_POINTS_PER_CENTROID = 32

_DALLE_INSTALL_HINT = 'the DALL-E visual tokenizer needs the optional `dall-e` package: pip install "simla[dall-e]"'


class UntrustedPickleError(pickle.UnpicklingError):
    """A checkpoint needs arbitrary unpickling and the caller did not say it trusts the file (SPEC A4)."""


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

        The value range is not checked: that would need a host sync per batch (SPEC A5).
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
    from safetensors import safe_open

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


# --------------------------------------------------------------------------------------------------------------
# DALL-E dVAE encoder
# --------------------------------------------------------------------------------------------------------------


def _import_dall_e() -> ModuleType:
    """Import the optional `dall_e.encoder` module, or raise ImportError with the install command."""
    try:
        import dall_e.encoder as dall_e_encoder
    except ImportError as exc:  # also covers a missing dependency of dall_e itself (it imports `requests`)
        raise ImportError(f"{_DALLE_INSTALL_HINT} (import failed: {exc})") from exc
    return dall_e_encoder


_GROUP_KEY = re.compile(r"^blocks\.group_(\d+)\.")
_BLOCK_KEY = re.compile(r"^blocks\.group_1\.block_(\d+)\.")


def _infer_dalle_hparams(state_dict: Mapping[str, Tensor], source: str) -> dict[str, int]:
    """Recover the `dall_e.encoder.Encoder` constructor arguments from a state dict's keys and shapes.

    The released encoder is n_hid=256, n_blk_per_group=2, vocab_size=8192, but reading them from the file
    lets smaller (test) or retrained encoders load too, and makes a mismatch fail here with a clear message
    rather than deep inside `load_state_dict`.
    """
    required = ("blocks.input.w", "blocks.output.conv.w")
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"{source}: not a DALL-E encoder state dict (missing {missing}; first keys: {list(state_dict)[:5]})"
        )
    input_w = state_dict["blocks.input.w"]
    output_w = state_dict["blocks.output.conv.w"]
    if input_w.dim() != 4 or output_w.dim() != 4:
        raise ValueError(
            f"{source}: DALL-E conv weights must be 4-d, got {tuple(input_w.shape)} and {tuple(output_w.shape)}"
        )
    n_hid, input_channels = int(input_w.shape[0]), int(input_w.shape[1])
    vocab_size = int(output_w.shape[0])
    if output_w.shape[1] != 8 * n_hid:
        raise ValueError(
            f"{source}: output conv has {output_w.shape[1]} input channels, expected 8 * n_hid = {8 * n_hid}"
        )
    groups = {int(m.group(1)) for key in state_dict if (m := _GROUP_KEY.match(key))}
    if groups != set(range(1, DALLE_GROUP_COUNT + 1)):
        raise ValueError(
            f"{source}: the dall_e Encoder has exactly {DALLE_GROUP_COUNT} groups, "
            f"the state dict has groups {sorted(groups)}"
        )
    blocks = {int(m.group(1)) for key in state_dict if (m := _BLOCK_KEY.match(key))}
    if not blocks or blocks != set(range(1, max(blocks) + 1)):
        raise ValueError(f"{source}: cannot infer n_blk_per_group from blocks {sorted(blocks)} of group_1")
    return {
        "n_hid": n_hid,
        "n_blk_per_group": max(blocks),
        "input_channels": input_channels,
        "vocab_size": vocab_size,
    }


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """Turn a loaded checkpoint object into a flat DALL-E encoder state dict.

    Accepts a plain state dict, one nested under "state_dict", and one saved from a `DalleTokenizer`
    (keys prefixed "encoder."), so that `tokenizer.state_dict()` files round-trip.
    """
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a DALL-E encoder state dict or module, got {type(obj).__name__}")
    bad = [key for key, value in obj.items() if not isinstance(key, str) or not isinstance(value, Tensor)]
    if bad:
        raise ValueError(f"{source}: state dict entries that are not str -> Tensor: {bad[:5]}")
    state_dict: dict[str, Tensor] = dict(obj)
    prefix = "encoder."
    if state_dict and all(key.startswith(prefix) for key in state_dict):
        state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


class DalleTokenizer(VisualTokenizer):
    """The OpenAI DALL-E dVAE encoder as a visual tokenizer (the reference's MIM targets, SPEC §2.4).

    Pixels are mapped x -> 0.8 x + 0.1 (the package's `map_pixels`), the encoder produces logits
    (B, vocab_size, S/8, S/8) and the ids are their argmax over the codebook. With the released weights and
    S = 128 this is a 16x16 grid over an 8192-code vocabulary.

    Precision: the `dall-e` package's convolutions run in fp16 whenever their weights are on CUDA and in fp32
    otherwise (its `use_mixed_precision` field is never consulted), so CPU works in fp32 as is and CUDA
    reproduces the reference. `fp16_on_cuda=False` switches the CUDA path to fp32.

    Build one with `from_file` (state dict, safetensors or, if trusted, the original pickled module) or
    `from_module` (an `Encoder` object, e.g. in tests).
    """

    def __init__(
        self, encoder: nn.Module, image_size: int = DALLE_DEFAULT_IMAGE_SIZE, fp16_on_cuda: bool = True
    ) -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be a torch.nn.Module, got {type(encoder).__name__}")
        if image_size % DALLE_DOWNSAMPLE != 0:
            raise ValueError(f"DALL-E image_size must be a multiple of {DALLE_DOWNSAMPLE}, got {image_size}")
        vocab_size = _dalle_vocab_size(encoder)
        super().__init__(vocab_size=vocab_size, image_size=image_size, grid_size=image_size // DALLE_DOWNSAMPLE)
        self.encoder = encoder
        self.fp16_on_cuda = bool(fp16_on_cuda)
        if not self.fp16_on_cuda:
            # The package decides per conv via `use_float16`; turning it off keeps every conv in fp32 on CUDA.
            for module in encoder.modules():
                if hasattr(module, "use_float16"):
                    setattr(module, "use_float16", False)
        self._freeze()

    @classmethod
    def from_module(
        cls, encoder: nn.Module, image_size: int = DALLE_DEFAULT_IMAGE_SIZE, fp16_on_cuda: bool = True
    ) -> DalleTokenizer:
        """Wrap an already built `dall_e.encoder.Encoder` (or compatible module with a `vocab_size`)."""
        return cls(encoder, image_size=image_size, fp16_on_cuda=fp16_on_cuda)

    @classmethod
    def from_file(
        cls,
        path: PathLike,
        image_size: int | None = None,
        trust_pickle: bool = False,
        fp16_on_cuda: bool = True,
    ) -> DalleTokenizer:
        """Load a DALL-E encoder from `path` onto the CPU (move it with `.to(device)` afterwards).

        Args:
            path: a state dict (`.pt`/`.pth`/`.bin`, read with ``weights_only=True``), a `.safetensors` file
                (e.g. written by `save`), or the original pickled `encoder.pkl` (only with `trust_pickle`).
            image_size: side of the tokenizer view in pixels. Default: the value stored by `save`, else 128
                (R/2 at R=256, giving the 16x16 grid of ViT-B/16).
            trust_pickle: allow arbitrary unpickling for files that are not plain state dicts. Unpickling can
                run any code, so pass True only for files from a trusted source (SPEC A4).
            fp16_on_cuda: keep the package's fp16 convolutions on CUDA (the reference behaviour).
        """
        dall_e_encoder = _import_dall_e()
        file = _check_path(path)
        stored_image_size: int | None = None
        if _is_safetensors(file):
            from safetensors.torch import load_file

            metadata = _read_safetensors_metadata(file)
            kind = metadata.get("kind", KIND_DALLE)
            if kind != KIND_DALLE:
                raise ValueError(f"{file}: holds a {kind!r} visual tokenizer, not a DALL-E encoder")
            if "image_size" in metadata:
                stored_image_size = _metadata_int(metadata, "image_size", file)
            loaded: Any = load_file(str(file), device="cpu")
        else:
            loaded = _torch_load(file, trust_pickle)
        if image_size is None:
            image_size = stored_image_size if stored_image_size is not None else DALLE_DEFAULT_IMAGE_SIZE

        if isinstance(loaded, nn.Module):
            encoder = loaded.float().cpu()
            logger.info("loaded pickled DALL-E encoder module %s from %s", type(encoder).__name__, file)
        else:
            state_dict = _unwrap_state_dict(loaded, str(file))
            encoder = _build_dalle_encoder(dall_e_encoder, state_dict, str(file))
        return cls(encoder, image_size=image_size, fp16_on_cuda=fp16_on_cuda)

    def save(self, path: PathLike) -> None:
        """Write the encoder weights as a `.safetensors` file (kind="dalle"), loadable without unpickling.

        Converting the released `encoder.pkl` once with ``DalleTokenizer.from_file(pkl, trust_pickle=True)
        .save("dalle_encoder.safetensors")`` lets every later run load it safely.
        """
        from safetensors.torch import save_file

        target = Path(path)
        if not _is_safetensors(target):
            raise ValueError(f"DalleTokenizer.save writes safetensors: path must end in .safetensors, not {target}")
        tensors = {key: value.detach().float().cpu().contiguous() for key, value in self.encoder.state_dict().items()}
        metadata = {
            "kind": KIND_DALLE,
            "format_version": FORMAT_VERSION,
            "vocab_size": str(self.vocab_size),
            "image_size": str(self.image_size),
        }
        save_file(tensors, str(target), metadata=metadata)
        logger.info("saved DALL-E visual tokenizer (%d tensors) to %s", len(tensors), target)

    def _encode(self, images: Tensor) -> Tensor:
        # SPEC §2.4: the encoder was trained on logit-Laplace-mapped pixels.
        mapped = (1.0 - 2.0 * DALLE_PIXEL_EPS) * images + DALLE_PIXEL_EPS
        logits = self.encoder(mapped)
        expected = (images.shape[0], self.vocab_size, self.grid_size, self.grid_size)
        if tuple(logits.shape) != expected:
            raise RuntimeError(f"DALL-E encoder returned logits of shape {tuple(logits.shape)}, expected {expected}")
        return logits.argmax(dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp16_on_cuda={self.fp16_on_cuda}"


def _dalle_vocab_size(encoder: nn.Module) -> int:
    """The codebook size of a DALL-E encoder: its `vocab_size` field, else its output conv's channel count."""
    vocab_size = getattr(encoder, "vocab_size", None)
    if isinstance(vocab_size, int) and vocab_size > 0:
        return vocab_size
    weight = encoder.state_dict().get("blocks.output.conv.w")
    if weight is None:
        raise ValueError(f"cannot tell the vocabulary size of {type(encoder).__name__}: no `vocab_size` attribute")
    return int(weight.shape[0])


def _torch_load(file: Path, trust_pickle: bool) -> Any:
    """`torch.load` with weights_only=True; fall back to full unpickling only if the caller trusts the file."""
    try:
        return torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UntrustedPickleError(
                f"{file} cannot be loaded as plain weights: it needs arbitrary unpickling (it is probably a pickled "
                "module such as the original DALL-E encoder.pkl), and unpickling can execute arbitrary code. "
                "Pass trust_pickle=True (CLI: the trust option) only if the file comes from a trusted source, "
                "then consider converting it once with DalleTokenizer.save(...) to .safetensors. "
                f"({_unpickling_reason(exc)})"
            ) from exc
    logger.warning("unpickling %s with weights_only=False because trust_pickle=True was given", file)
    try:
        return torch.load(str(file), map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        # A pickled Encoder imports dall_e while unpickling; say how to get it.
        raise ImportError(f"{file}: unpickling needs module {exc.name!r}; {_DALLE_INSTALL_HINT}") from exc


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of torch's weights_only refusal (which global it met), without its advice text."""
    lines = [line.strip() for line in str(exc).splitlines()]
    for line in lines:
        if "Unsupported global" in line or "Unsupported operand" in line:
            # torch prefixes "WeightsUnpickler error: " and appends how to allowlist the class; keep the fact.
            return line.split(" was not an allowed global")[0].removeprefix("WeightsUnpickler error: ")
    return f"torch.load(weights_only=True) raised {type(exc).__name__}"


def _build_dalle_encoder(dall_e_encoder: ModuleType, state_dict: Mapping[str, Tensor], source: str) -> nn.Module:
    """Construct a `dall_e.encoder.Encoder` with hyperparameters read from `state_dict` and load it strictly."""
    hparams = _infer_dalle_hparams(state_dict, source)
    # Build on the meta device: the package initialises every conv with normal_(), which for the released
    # 8192-code encoder costs a noticeable fraction of a second and is thrown away by the load below.
    encoder = dall_e_encoder.Encoder(
        **hparams, device=torch.device("meta"), requires_grad=False, use_mixed_precision=False
    )
    # fp32 copies: on CPU the package runs fp32 convolutions and needs fp32 weights even if the file is fp16.
    fp32_state = {key: value.float() for key, value in state_dict.items()}
    try:
        encoder.load_state_dict(fp32_state, strict=True, assign=True)
    except RuntimeError as exc:
        described = ", ".join(f"{key}={value}" for key, value in hparams.items())
        raise ValueError(f"{source}: state dict does not match a DALL-E Encoder({described}): {exc}") from exc
    # The field only sized the construction above; make it describe where the weights now are.
    encoder.device = torch.device("cpu")
    logger.info("built DALL-E encoder %s from state dict %s", hparams, source)
    return encoder


# --------------------------------------------------------------------------------------------------------------
# Built-in k-means patch tokenizer
# --------------------------------------------------------------------------------------------------------------


def _patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, S, S) -> (B, (S/p)**2, C*p*p): non-overlapping patches, row-major over the grid.

    Each patch vector is laid out channel-major (C, p, p), the same layout at fit and at tokenize time.
    """
    batch, channels, height, width = images.shape
    grid_h, grid_w = height // patch_size, width // patch_size
    patches = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    patches = patches.permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, grid_h * grid_w, channels * patch_size * patch_size)


def _normalise_patches(patches: Tensor, eps: float) -> Tensor:
    """Subtract each patch's mean and divide by (its std + eps).

    Removing the mean and scale makes the code describe local structure (edges, texture) rather than
    brightness or contrast. The additive eps is a floor, not just a guard against 0/0: a nearly flat patch
    keeps a small norm instead of having its sensor/JPEG noise blown up to unit scale, so flat regions share a
    few codes near the origin rather than scattering over random ones.
    """
    centred = patches - patches.mean(dim=-1, keepdim=True)
    std = centred.square().mean(dim=-1, keepdim=True).sqrt()
    return centred / (std + eps)


def _nearest_centroid(
    points: Tensor, centroids: Tensor, points_sq: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Index of, and squared Euclidean distance to, the nearest centroid of every point (ties -> lowest index).

    Uses ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, i.e. one matmul per block of rows, with rows processed in
    blocks so the (rows x K) temporary stays bounded for any batch or codebook size. `points_sq` (the
    ||x||^2 of every point) may be passed in by callers that search the same points many times (k-means).
    """
    num_points = points.shape[0]
    num_centroids = centroids.shape[0]
    centroid_sq = centroids.square().sum(dim=1).unsqueeze(0)
    if points_sq is None:
        points_sq = points.square().sum(dim=1)
    rows_per_block = max(1, _DIST_BLOCK_ELEMENTS // max(1, num_centroids))
    indices = torch.empty(num_points, dtype=torch.long, device=points.device)
    distances = torch.empty(num_points, dtype=points.dtype, device=points.device)
    for start in range(0, num_points, rows_per_block):
        stop = min(start + rows_per_block, num_points)
        # ||c||^2 - 2 x.c in one fused addmm; ||x||^2 does not change the argmin, so it is added afterwards.
        partial = torch.addmm(centroid_sq, points[start:stop], centroids.t(), beta=1.0, alpha=-2.0)
        best, best_index = partial.min(dim=1)
        indices[start:stop] = best_index
        distances[start:stop] = best + points_sq[start:stop]
    # Clamp: rounding in the expansion can make a true zero slightly negative.
    return indices, distances.clamp_min_(0.0)


def _iter_image_batches(images: Tensor | Iterable[Tensor], chunk: int = 1024) -> Iterator[Tensor]:
    """Yield image batches from a tensor (split into chunks to bound memory) or an iterable of tensors."""
    if isinstance(images, Tensor):
        if images.dim() == 3:
            images = images.unsqueeze(0)
        yield from images.split(chunk)
        return
    for index, batch in enumerate(images):
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"KMeansTokenizer.fit expects image tensors (N, 3, S, S); item {index} is {type(batch).__name__}"
            )
        yield batch


class KMeansTokenizer(VisualTokenizer):
    """Built-in visual tokenizer: nearest k-means centroid of each contrast-normalised pixel patch.

    The image is cut into non-overlapping patch_size x patch_size patches (grid = image_size / patch_size),
    each patch vector (3 * patch_size**2 values, channel-major) is normalised by its own mean and
    (std + eps), and its id is the nearest centroid in squared Euclidean distance. It needs no download, so
    MIM works offline; fit it once on training images with `fit` and keep it with `save`/`load`.

    The centroids are a registered buffer of shape (vocab_size, 3 * patch_size**2), so `.to(device)` moves them.
    """

    centroids: Tensor

    def __init__(self, centroids: Tensor, patch_size: int, image_size: int, eps: float = 0.1) -> None:
        if centroids.dim() != 2:
            raise ValueError(f"centroids must be 2-d (vocab_size, 3 * patch_size**2), got {tuple(centroids.shape)}")
        if patch_size < 1 or image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
        dim = 3 * patch_size * patch_size
        if centroids.shape[1] != dim:
            raise ValueError(
                f"centroids have {centroids.shape[1]} features, expected 3 * patch_size**2 = {dim} "
                f"for patch_size {patch_size}"
            )
        if not centroids.is_floating_point():
            raise ValueError(f"centroids must be floating point, got {centroids.dtype}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(vocab_size=centroids.shape[0], image_size=image_size, grid_size=image_size // patch_size)
        self.patch_size = int(patch_size)
        self.eps = float(eps)
        self.register_buffer("centroids", centroids.detach().float().clone())
        self._freeze()

    def _encode(self, images: Tensor) -> Tensor:
        patches = _normalise_patches(_patchify(images, self.patch_size), self.eps)
        batch, tokens, dim = patches.shape
        indices, _ = _nearest_centroid(patches.reshape(batch * tokens, dim), self.centroids.float())
        return indices.reshape(batch, tokens)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, patch_size={self.patch_size}, eps={self.eps}"

    # ---- fitting -------------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        images: Tensor | Iterable[Tensor],
        vocab_size: int,
        patch_size: int,
        image_size: int | None = None,
        iterations: int = 20,
        seed: int = 0,
        max_patches: int = 200_000,
        eps: float = 0.1,
        init: str = "kmeans++",
        device: str | torch.device | None = None,
        tol: float = 1e-4,
    ) -> KMeansTokenizer:
        """Fit a codebook of `vocab_size` centroids to normalised patches of `images` (Lloyd's k-means).

        Args:
            images: float images (N, 3, S, S) in [0, 1], or an iterable of such batches (read once).
            vocab_size: number of centroids K.
            patch_size: patch side p in pixels; S must be a multiple of p.
            image_size: side the tokenizer will expect; defaults to the S of the data.
            iterations: maximum Lloyd iterations (stops early once no assignment changes).
            seed: seeds the patch sample and the initialisation (a private torch.Generator).
            max_patches: patches are sampled uniformly without replacement over the whole input, up to this
                many, so memory and time are bounded however many images are given.
            eps: contrast floor of the patch normalisation (see `_normalise_patches`).
            init: "kmeans++" (D^2 sampling, seeded) or "random" (K distinct sampled patches).
            device: where to run k-means; default the device of the first batch.
            tol: stop early once at most this fraction of the patches change cluster in an iteration.
        """
        if vocab_size < 1 or patch_size < 1 or iterations < 0 or max_patches < 1:
            raise ValueError(
                f"need vocab_size, patch_size, max_patches >= 1 and iterations >= 0; got {vocab_size}, "
                f"{patch_size}, {max_patches}, {iterations}"
            )
        if init not in ("kmeans++", "random"):
            raise ValueError(f"init must be 'kmeans++' or 'random', got {init!r}")
        started = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        points, data_size, seen = _sample_patches(images, patch_size, max_patches, eps, generator, device)
        if image_size is None:
            image_size = data_size
        elif image_size != data_size:
            logger.warning(
                "k-means fitted on %d px images but the tokenizer will expect %d px: the same patch size then "
                "covers a different fraction of the scene",
                data_size,
                image_size,
            )
        if points.shape[0] < vocab_size:
            raise ValueError(f"only {points.shape[0]} patches to fit {vocab_size} centroids; give more images")
        logger.info(
            "k-means visual tokenizer: K=%d, patch %dx%d, %d of %d patches sampled, on %s",
            vocab_size,
            patch_size,
            patch_size,
            points.shape[0],
            seen,
            points.device,
        )
        if init == "kmeans++":
            centroids = _kmeans_plus_plus(points, vocab_size, generator)
        else:
            pick = torch.randperm(points.shape[0], generator=generator)[:vocab_size].to(points.device)
            centroids = points[pick].clone()
        centroids = _lloyd(points, centroids, iterations, tol)
        logger.info("k-means visual tokenizer fitted in %.2f s", time.perf_counter() - started)
        return cls(centroids.cpu(), patch_size=patch_size, image_size=image_size, eps=eps)

    # ---- persistence ---------------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Write the centroids and their metadata to a `.safetensors` file."""
        from safetensors.torch import save_file

        target = Path(path)
        if not _is_safetensors(target):
            raise ValueError(f"KMeansTokenizer.save writes safetensors: path must end in .safetensors, not {target}")
        metadata = {
            "kind": KIND_KMEANS,
            "format_version": FORMAT_VERSION,
            "vocab_size": str(self.vocab_size),
            "patch_size": str(self.patch_size),
            "image_size": str(self.image_size),
            # repr() round-trips a float exactly.
            "eps": repr(self.eps),
        }
        save_file({"centroids": self.centroids.detach().float().cpu().contiguous()}, str(target), metadata=metadata)
        logger.info("saved k-means visual tokenizer (K=%d, patch %d) to %s", self.vocab_size, self.patch_size, target)

    @classmethod
    def load(cls, path: PathLike, image_size: int | None = None) -> KMeansTokenizer:
        """Load a tokenizer written by `save`, validating its metadata and shapes.

        `image_size` overrides the stored input side (it must stay a multiple of the patch size; the grid
        then changes accordingly).
        """
        from safetensors import SafetensorError, safe_open

        file = _check_path(path)
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                names = list(handle.keys())
                centroids = handle.get_tensor("centroids") if "centroids" in names else None
        except SafetensorError as exc:
            raise ValueError(f"{file}: not a readable safetensors file: {exc}") from exc
        kind = metadata.get("kind")
        if kind != KIND_KMEANS:
            raise ValueError(
                f"{file}: metadata kind is {kind!r}, expected {KIND_KMEANS!r} (not a k-means tokenizer file)"
            )
        version = metadata.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{file}: unsupported k-means tokenizer format_version {version!r} "
                f"(this simla reads {FORMAT_VERSION!r})"
            )
        vocab_size = _metadata_int(metadata, "vocab_size", file)
        patch_size = _metadata_int(metadata, "patch_size", file)
        stored_image_size = _metadata_int(metadata, "image_size", file)
        try:
            eps = float(metadata.get("eps", "0.1"))
        except ValueError:
            raise ValueError(f"{file}: metadata field 'eps' must be a float, got {metadata['eps']!r}") from None
        if centroids is None:
            raise ValueError(f"{file}: no 'centroids' tensor (tensors: {names})")
        expected = (vocab_size, 3 * patch_size * patch_size)
        if tuple(centroids.shape) != expected:
            raise ValueError(
                f"{file}: centroids have shape {tuple(centroids.shape)}, but the metadata (vocab_size={vocab_size}, "
                f"patch_size={patch_size}) requires {expected}"
            )
        if stored_image_size % patch_size != 0:
            raise ValueError(f"{file}: image_size {stored_image_size} is not a multiple of patch_size {patch_size}")
        size = stored_image_size if image_size is None else image_size
        if size % patch_size != 0:
            raise ValueError(f"image_size {size} is not a multiple of the patch size {patch_size} stored in {file}")
        return cls(centroids, patch_size=patch_size, image_size=size, eps=eps)


def _sample_patches(
    images: Tensor | Iterable[Tensor],
    patch_size: int,
    max_patches: int,
    eps: float,
    generator: torch.Generator,
    device: str | torch.device | None,
) -> tuple[Tensor, int, int]:
    """Uniform sample (without replacement) of up to `max_patches` normalised patches from a stream of batches.

    Each patch gets a random key and the `max_patches` smallest keys are kept (a bottom-k reservoir), so the
    sample is uniform over the whole stream and memory stays bounded even for an iterable of unknown length.
    Returns (points, image side, patches seen).
    """
    kept: Tensor | None = None
    kept_keys: Tensor | None = None
    image_side: int | None = None
    seen = 0
    target: torch.device | None = torch.device(device) if device is not None else None
    for batch in _iter_image_batches(images):
        if batch.dim() != 4 or batch.shape[1] != 3 or batch.shape[2] != batch.shape[3]:
            raise ValueError(
                f"KMeansTokenizer.fit expects (N, 3, S, S) images, got a batch of shape {tuple(batch.shape)}"
            )
        if not batch.is_floating_point():
            raise ValueError(f"KMeansTokenizer.fit expects float images in [0, 1], got dtype {batch.dtype}")
        side = int(batch.shape[2])
        if image_side is None:
            if side % patch_size != 0:
                raise ValueError(f"image side {side} is not a multiple of patch_size {patch_size}")
            image_side = side
            # One check on the first batch (fitting is offline, so the host sync is harmless): mean/std
            # normalised inputs would give a codebook that mismatches the [0, 1] images seen at tokenize time.
            low, high = float(batch.min()), float(batch.max())
            if low < -0.01 or high > 1.01:
                logger.warning(
                    "KMeansTokenizer.fit: pixel values span [%.3f, %.3f]; expected float images in [0, 1] "
                    "without mean/std normalisation",
                    low,
                    high,
                )
        elif side != image_side:
            raise ValueError(f"all images must have the same size; got {side} after {image_side}")
        if target is None:
            target = batch.device
        patches = _normalise_patches(_patchify(batch.to(target, torch.float32), patch_size), eps)
        patches = patches.reshape(-1, patches.shape[-1])
        if patches.shape[0] == 0:
            continue
        seen += patches.shape[0]
        keys = torch.rand(patches.shape[0], generator=generator).to(target)
        if kept is None or kept_keys is None:
            kept, kept_keys = patches, keys
        else:
            kept, kept_keys = torch.cat([kept, patches]), torch.cat([kept_keys, keys])
        if kept.shape[0] > max_patches:
            chosen = torch.topk(kept_keys, max_patches, largest=False).indices
            kept, kept_keys = kept[chosen], kept_keys[chosen]
    if kept is None or image_side is None:
        raise ValueError("KMeansTokenizer.fit got no images")
    return kept.contiguous(), image_side, seen


def _weighted_sample(weights: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """`count` distinct indices drawn with probability proportional to `weights` (CPU, float64), seeded.

    Uses exponential keys (the smallest E_i / w_i win), which is O(N) and much cheaper than
    torch.multinomial for large N. If fewer than `count` weights are positive, the rest are uniform draws.
    """
    keys = torch.empty(weights.shape[0], dtype=torch.float64).exponential_(generator=generator)
    keys = keys / weights  # w = 0 gives +inf: never chosen while positive weights remain
    positive = int((weights > 0).sum())
    if positive >= count:
        return torch.topk(keys, count, largest=False).indices
    # Every point already coincides with a centre, so any choice duplicates one; Lloyd's empty-cluster
    # handling (and argmin's lowest-index ties) cope with duplicates.
    taken = torch.topk(keys, positive, largest=False).indices
    extra = torch.randint(weights.shape[0], (count - positive,), generator=generator)
    return torch.cat([taken, extra])


def _kmeans_plus_plus(points: Tensor, num_centroids: int, generator: torch.Generator) -> Tensor:
    """Seeded k-means++ initialisation (D^2 sampling) on a subsample, drawing a few centres per round.

    Two bounds keep it cheap on a CPU, both only affecting the starting point of Lloyd's iterations:
    - it runs on at most `_KMEANSPP_POINTS_PER_CENTROID * K` randomly chosen points;
    - exact k-means++ is K sequential passes over them; drawing ceil(K / 256) centres per round from the same
      D^2 distribution (in the spirit of k-means||) bounds the passes to about 256. For K <= 256 it is exact.
    """
    num_points = points.shape[0]
    pool_size = min(num_points, _KMEANSPP_POINTS_PER_CENTROID * num_centroids)
    if pool_size < num_points:
        pool = points[torch.randperm(num_points, generator=generator)[:pool_size].to(points.device)]
    else:
        pool = points
    pool_sq = pool.square().sum(dim=1)
    per_round = max(1, math.ceil(num_centroids / 256))
    first = int(torch.randint(pool_size, (1,), generator=generator))
    chosen = [first]
    min_dist = (pool - pool[first]).square().sum(dim=1)
    while len(chosen) < num_centroids:
        take = min(per_round, num_centroids - len(chosen))
        picks = _weighted_sample(min_dist.double().cpu(), take, generator)
        chosen.extend(int(i) for i in picks)
        _, dist_new = _nearest_centroid(pool, pool[picks.to(points.device)], pool_sq)
        min_dist = torch.minimum(min_dist, dist_new)
    return pool[torch.tensor(chosen, device=points.device)].clone()


def _lloyd(points: Tensor, centroids: Tensor, iterations: int, tol: float) -> Tensor:
    """Lloyd iterations: assign to nearest centroid, move centroids to their cluster means.

    A centroid that loses all its points is re-seeded at one of the points farthest from their own centroid
    (the worst-represented data), so no codebook entry is wasted. Stops early once at most `tol` of the
    assignments change in an iteration (and no cluster was empty).
    """
    num_points = points.shape[0]
    num_centroids, dim = centroids.shape
    points_sq = points.square().sum(dim=1)
    assignment: Tensor | None = None
    for iteration in range(1, iterations + 1):
        new_assignment, dist = _nearest_centroid(points, centroids, points_sq)
        changed = num_points if assignment is None else int((new_assignment != assignment).sum())
        assignment = new_assignment
        counts = torch.bincount(assignment, minlength=num_centroids)
        sums = torch.zeros(num_centroids, dim, dtype=points.dtype, device=points.device)
        sums.index_add_(0, assignment, points)
        non_empty = counts > 0
        centroids = centroids.clone()
        centroids[non_empty] = sums[non_empty] / counts[non_empty].unsqueeze(1).to(points.dtype)
        empty = torch.nonzero(~non_empty).flatten()
        if empty.numel() > 0:
            farthest = torch.topk(dist, min(empty.numel(), num_points)).indices
            centroids[empty[: farthest.numel()]] = points[farthest]
        logger.info(
            "k-means iteration %d/%d: mean squared distance %.4f, %d assignments changed, %d empty clusters re-seeded",
            iteration,
            iterations,
            float(dist.mean()),
            changed,
            empty.numel(),
        )
        if changed <= tol * num_points and empty.numel() == 0:
            break
    return centroids


# --------------------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------------------

_SCHEMES = (KIND_KMEANS, KIND_DALLE)


def load_visual_tokenizer(
    spec: str | os.PathLike[str], image_size: int | None = None, trust_pickle: bool = False
) -> VisualTokenizer:
    """Load a visual tokenizer from a spec string.

    Args:
        spec: "kmeans:PATH", "dalle:PATH", or a bare PATH. A bare path is dispatched by content: a
            `.safetensors` file whose metadata says kind="kmeans" is a `KMeansTokenizer`, anything else is
            loaded as a DALL-E encoder.
        image_size: the tokenizer-view side in pixels; default the value stored in the file (k-means, or a
            DALL-E safetensors written by `DalleTokenizer.save`), else 128 for DALL-E.
        trust_pickle: allow arbitrary unpickling of DALL-E files that are not plain state dicts (SPEC A4).
    """
    text = os.fspath(spec)
    scheme, sep, rest = text.partition(":")
    # Only recognised scheme names are prefixes, so Windows drive letters ("C:\\...") stay paths.
    if sep and scheme.lower() in _SCHEMES:
        kind: str | None = scheme.lower()
        path = rest
    else:
        kind, path = None, text
    if not path:
        raise ValueError(f"visual tokenizer spec {text!r} has no path")
    file = _check_path(path)
    if kind is None:
        kind = KIND_DALLE
        if _is_safetensors(file):
            try:
                if _read_safetensors_metadata(file).get("kind") == KIND_KMEANS:
                    kind = KIND_KMEANS
            except Exception as exc:  # unreadable header: let the DALL-E loader report the real problem
                logger.debug("could not read safetensors metadata of %s: %s", file, exc)
    logger.info("loading %s visual tokenizer from %s", kind, file)
    if kind == KIND_KMEANS:
        return KMeansTokenizer.load(file, image_size=image_size)
    return DalleTokenizer.from_file(file, image_size=image_size, trust_pickle=trust_pickle)


__all__ = [
    "DalleTokenizer",
    "KMeansTokenizer",
    "UntrustedPickleError",
    "VisualTokenizer",
    "load_visual_tokenizer",
]
