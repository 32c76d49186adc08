"""The OpenAI DALL-E dVAE encoder as a visual tokenizer (the reference's MIM targets).

Needs the optional `dall-e` package and the released weights. Loading follows state dicts are read
with `torch.load(weights_only=True)` or from safetensors; a file that needs arbitrary unpickling (the
original `encoder.pkl` is a pickled module) is refused unless the caller passes `trust_pickle=True`.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import MissingExtraError, SimlaError
from .base import (FORMAT_VERSION, KIND_DALLE, PathLike, VisualTokenizer, _check_path, _is_safetensors, _metadata_int,
                   _read_safetensors_metadata)


logger = logging.getLogger(__name__)

# DALL-E's logit-Laplace pixel map squeezes [0, 1] into [eps, 1 - eps]; the released encoder was trained on
# inputs mapped this way (dall_e.utils.logit_laplace_eps = 0.1), so x -> 0.8 x + 0.1.
DALLE_PIXEL_EPS = 0.1
# The dVAE encoder downsamples by three 2x max-pools.
DALLE_DOWNSAMPLE = 8
# Default tokenizer-view resolution: R/2 for R = 256, giving the 16x16 grid of the ViT-B/16 patches.
DALLE_DEFAULT_IMAGE_SIZE = 128
# The encoder architecture in the `dall-e` package has exactly four groups (it is not a constructor field).
DALLE_GROUP_COUNT = 4

_DALLE_INSTALL_HINT = 'the DALL-E visual tokenizer needs the optional `dall-e` package: pip install "simla[dall-e]"'


class UntrustedPickleError(SimlaError, pickle.UnpicklingError):
    """A checkpoint needs arbitrary unpickling and the caller did not say it trusts the file."""


# --------------------------------------------------------------------------------------------------------------
# DALL-E dVAE encoder
# --------------------------------------------------------------------------------------------------------------


def _import_dall_e() -> ModuleType:
    """Import the optional `dall_e.encoder` module, or raise ImportError with the install command."""
    try:
        import dall_e.encoder as dall_e_encoder
    except ImportError as exc:  # also covers a missing dependency of dall_e itself (it imports `requests`)
        raise MissingExtraError(f"{_DALLE_INSTALL_HINT} (import failed: {exc})") from exc
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
    """The OpenAI DALL-E dVAE encoder as a visual tokenizer (the reference's MIM targets).

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
                run any code, so pass True only for files from a trusted source.
            fp16_on_cuda: keep the package's fp16 convolutions on CUDA (the reference behaviour).
        """
        dall_e_encoder = _import_dall_e()
        file = _check_path(path)
        stored_image_size: int | None = None
        if _is_safetensors(file):
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
        # the encoder was trained on logit-Laplace-mapped pixels.
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
        raise MissingExtraError(f"{file}: unpickling needs module {exc.name!r}; {_DALLE_INSTALL_HINT}") from exc


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


__all__ = [
    "DALLE_DEFAULT_IMAGE_SIZE",
    "DALLE_DOWNSAMPLE",
    "DALLE_GROUP_COUNT",
    "DALLE_PIXEL_EPS",
    "DalleTokenizer",
    "UntrustedPickleError",
]
