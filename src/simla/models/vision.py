"""SIMLA's image encoder: a ViT-B/16 (DeiT-initialised) with an optional MIM mask token.

`VisionEncoder` subclasses timm's `VisionTransformer` so that its state-dict keys are exactly those of the
reference implementation (`cls_token`, `pos_embed`, `mask_token`, `patch_embed.proj.*`, `blocks.{i}.*`,
`norm.*`) and DeiT / timm checkpoints load without renaming. Attention runs through timm's
fused `scaled_dot_product_attention` path.

`resample_pos_embed` reproduces the reference's position-embedding interpolation (bicubic, no
anti-aliasing) and `load_vision_weights` imports weights from a local file, a URL or a timm model name with
a strict report of what did not match.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..errors import CheckpointError, HubError
from ..load_report import LoadReport


logger = logging.getLogger(__name__)

__all__ = ["VisionEncoder", "LoadReport", "resample_pos_embed", "load_vision_weights"]

# Keys of a classification checkpoint that an encoder without a head has no use for. They are reported as
# ignored, never loaded.
_HEAD_PREFIXES = ("head.", "fc_norm.", "head_drop")
# The only parameter a checkpoint may lack without failing a strict load: DeiT has no mask token and the
# reference leaves it at its zero initialisation.
_OPTIONAL_KEYS = frozenset({"mask_token"})
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


class VisionEncoder(VisionTransformer):
    """ViT image encoder returning the full token sequence after the final LayerNorm.

    Args:
        image_size: Input resolution (square), 256 for pretraining and 384 for fine-tuning.
        patch_size: Patch size of the Conv2d patch embedding.
        width: Token width D.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width as a multiple of `width`.
        qkv_bias: Whether the qkv projection has a bias.
        ln_eps: LayerNorm epsilon (1e-6 in the reference).
        drop_path: Stochastic-depth rate (0 in the reference); decays linearly over depth as in timm.
        use_mask_token: Create the zero-initialised `mask_token` used by masked image modelling. The reference
            enables it for pretraining and disables it for every downstream task.
    """

    def __init__(
        self,
        image_size: int = 256,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_eps: float = 1e-6,
        drop_path: float = 0.0,
        use_mask_token: bool = True,
    ) -> None:
        if image_size % patch_size != 0:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        super().__init__(
            img_size=image_size,
            patch_size=patch_size,
            in_chans=3,
            num_classes=0,  # no classification head: the state dict must hold encoder keys only
            global_pool="token",
            embed_dim=width,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            class_token=True,
            no_embed_class=False,  # pos_embed covers CLS too, as in DeiT and the reference
            pre_norm=False,
            final_norm=True,
            fc_norm=False,
            drop_rate=0.0,
            pos_drop_rate=0.0,
            proj_drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=drop_path,
            norm_layer=partial(nn.LayerNorm, eps=ln_eps),
            act_layer=nn.GELU,  # exact (erf) GELU, not the tanh approximation
        )
        self._image_size = image_size
        self._patch_size = patch_size

        # timm initialises cls_token with N(0, 1e-6); the reference uses trunc-normal(std 0.02) like pos_embed.
        # Only matters when training from scratch, since DeiT weights overwrite it otherwise.
        assert self.cls_token is not None  # class_token=True above
        nn.init.trunc_normal_(self.cls_token, std=0.02)

        self.mask_token: nn.Parameter | None
        if use_mask_token:
            # Zero, and deliberately not trunc-normal'd: DeiT has no mask token, so the reference starts MIM
            # from a zero token.
            self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        else:
            self.register_parameter("mask_token", None)

        self._ensure_fused_attention()

    def _ensure_fused_attention(self) -> None:
        """Make every block use `scaled_dot_product_attention`.

        timm decides per module at construction time (it can be switched off by the TIMM_FUSED_ATTN
        environment variable or its exportable mode); our contract is SDPA, so we switch it back on.
        """
        attns: list[Any] = [blk.attn for blk in self.blocks]
        disabled = [i for i, attn in enumerate(attns) if not getattr(attn, "fused_attn", False)]
        if disabled:
            logger.warning(
                "timm built blocks %s without fused attention; enabling scaled_dot_product_attention for them",
                disabled,
            )
            for i in disabled:
                attns[i].fused_attn = True

    @contextmanager
    def capture_attention(self, block: int) -> Iterator[list[Tensor]]:
        """Within the block, keep block `block`'s self-attention probabilities (B, h, N, N) in the yielded list.

        Only that block leaves the fused SDPA path, for the duration (Grad-CAM, visualisation); the
        probabilities are part of the autograd graph, so gradients with respect to them can be taken.
        """
        if not -len(self.blocks) <= block < len(self.blocks):
            raise ValueError(f"block {block} out of range for {len(self.blocks)} ViT blocks")
        attn: Any = self.blocks[block].attn
        captured: list[Tensor] = []
        # timm's eager path applies `attn_drop` to the softmax probabilities: its input is what we want.
        handle = attn.attn_drop.register_forward_hook(lambda _module, inputs, _out: captured.append(inputs[0]))
        attn.fused_attn = False
        try:
            yield captured
        finally:
            attn.fused_attn = True
            handle.remove()

    @property
    def image_size(self) -> int:
        """Expected input resolution (pixels per side)."""
        return self._image_size

    @property
    def patch_size(self) -> int:
        """Patch size (pixels per side)."""
        return self._patch_size

    @property
    def grid_size(self) -> int:
        """Number of patches per side of the image."""
        return self._image_size // self._patch_size

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (grid_size²); the output has one more token (CLS)."""
        return self.grid_size**2

    @property
    def width(self) -> int:
        """Token width D."""
        return self.embed_dim

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: timm's set plus the mask token."""
        return set(super().no_weight_decay()) | {"mask_token"}

    def _check_pixels(self, pixels: Tensor) -> None:
        expected = (3, self._image_size, self._image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"VisionEncoder expects pixels of shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                f"got {tuple(pixels.shape)}"
            )

    def _flatten_patch_mask(self, patch_mask: Tensor, batch: int) -> Tensor:
        """Validate `patch_mask` and return it as (B, grid², 1) for broadcasting over the width."""
        if patch_mask.dtype != torch.bool:
            raise TypeError(f"patch_mask must be a bool tensor, got dtype {patch_mask.dtype}")
        grid = self.grid_size
        if tuple(patch_mask.shape) == (batch, grid, grid):
            # Row-major flattening matches the patch order of the Conv2d patch embedding.
            patch_mask = patch_mask.reshape(batch, grid * grid)
        if tuple(patch_mask.shape) != (batch, grid * grid):
            raise ValueError(
                f"patch_mask must have shape ({batch}, {grid * grid}) or ({batch}, {grid}, {grid}), "
                f"got {tuple(patch_mask.shape)}"
            )
        return patch_mask.unsqueeze(-1)

    def forward(self, pixels: Tensor, patch_mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Encode images.

        Args:
            pixels: (B, 3, image_size, image_size) normalised images.
            patch_mask: Optional bool mask of shape (B, grid²) or (B, grid, grid) (flattened row-major);
                True marks a patch whose embedding is replaced by the mask token. Requires
                `use_mask_token=True`.

        Returns:
            (B, 1 + grid², width) token states after the final LayerNorm; index 0 is CLS.
        """
        self._check_pixels(pixels)
        x = self.patch_embed(pixels)  # (B, grid², D), patches in row-major order
        if patch_mask is not None:
            if self.mask_token is None:
                raise ValueError(
                    "a patch_mask was passed but this VisionEncoder was built with use_mask_token=False, "
                    "so it has no mask token to substitute"
                )
            m = self._flatten_patch_mask(patch_mask, x.shape[0]).to(x.dtype)
            # substitute before CLS is prepended and before pos_embed is added, so a masked patch
            # still carries its position and CLS is never masked. The arithmetic blend (rather than a select)
            # is the reference's formula; for a 0/1 mask it is the same value.
            x = x * (1.0 - m) + self.mask_token * m
        x = self._pos_embed(x)  # prepend CLS, then add pos_embed (timm's non-no_embed_class order)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)


def resample_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Resize a (1, prefix + g², D) position embedding to a new_grid × new_grid patch grid.

    Reproduces the reference: prefix rows (CLS) are kept as they are; the g×g grid is viewed as a
    (1, D, g, g) image, resized bicubically with align_corners=False and without anti-aliasing (timm's own
    resampler anti-aliases, which would give different numbers), flattened row-major and re-attached.

    Args:
        pos_embed: (1, num_prefix_tokens + g², D) position embedding.
        new_grid: Patches per side of the target grid.
        num_prefix_tokens: Leading rows that are not grid positions (1 for CLS).

    Returns:
        The resized embedding, or `pos_embed` itself when the grid already matches.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    if new_grid < 1:
        raise ValueError(f"new_grid must be positive, got {new_grid}")
    num_grid = pos_embed.shape[1] - num_prefix_tokens
    old_grid = math.isqrt(max(num_grid, 0))
    if num_grid <= 0 or old_grid * old_grid != num_grid:
        raise ValueError(
            f"pos_embed has {pos_embed.shape[1]} tokens, which is not {num_prefix_tokens} prefix token(s) "
            f"plus a square grid"
        )
    if old_grid == new_grid:
        return pos_embed

    dim = pos_embed.shape[2]
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    orig_dtype = grid.dtype
    # Bicubic interpolation of half-precision tensors is not supported on every device; resize in fp32.
    work_dtype = orig_dtype if orig_dtype in (torch.float32, torch.float64) else torch.float32
    image = grid.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).to(work_dtype)
    image = F.interpolate(
        image, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=False
    )
    grid = image.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(orig_dtype)
    return torch.cat([prefix, grid], dim=1)


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _timm_model_name(source: str) -> str | None:
    """Return the name to hand to `timm.create_model`, or None if `source` does not name a timm model.

    Accepts registry names with an optional pretrained tag (`deit_base_patch16_224.fb_in1k`), Hugging Face
    repo ids under the `timm/` organisation and explicit `hf-hub:` names.
    """
    if source.startswith("hf-hub:"):
        return source
    if source.startswith("timm/"):
        name = source[len("timm/") :]
        # `timm/<arch>.<tag>` is where timm's registry fetches `<arch>.<tag>` from anyway; going through the
        # registry avoids an extra config download. Unknown architectures go straight to the Hub.
        return name if timm.is_model(name) else f"hf-hub:{source}"
    if not any(c in source for c in ("/", "\\", ":")) and timm.is_model(source):
        return source
    return None


def _load_local_file(path: Path) -> Any:
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    if path.suffix not in _TORCH_SUFFIXES:
        logger.warning("%s has an unrecognised suffix; loading it as a torch pickle (weights_only)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # never unpickle arbitrary objects implicitly (the reference pickles its config).
        raise CheckpointError(
            f"refusing to load {path}: it contains objects that need arbitrary unpickling, which "
            f"torch.load(weights_only=True) does not allow. If you trust the file, extract its state dict "
            f"yourself (torch.load(..., weights_only=False)) and save it as .safetensors. ({exc})"
        ) from exc


def _download(source: str, timm_name: str | None) -> Any:
    """Fetch weights for a URL or a timm model name; any failure becomes an OSError that says so."""
    try:
        if timm_name is not None:
            model = timm.create_model(timm_name, pretrained=True, num_classes=0)
            return model.state_dict()
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # network stacks raise many unrelated types (URLError, httpx, hub errors)
        raise HubError(
            f"vision weights {source!r} could not be downloaded ({type(exc).__name__}: {exc}). "
            f"Pass a local file path (.safetensors, .pth, .pt or .bin) to load offline."
        ) from exc


def _read_source(source: str) -> Any:
    """Load the raw object behind `source` (a local file, an http(s) URL or a timm model name)."""
    if _is_url(source):
        return _download(source, None)
    path = Path(os.path.expanduser(source))
    if path.exists():
        if not path.is_file():
            raise IsADirectoryError(f"vision weights source {source!r} is a directory, expected a file")
        return _load_local_file(path)
    timm_name = _timm_model_name(source)
    if timm_name is not None:
        return _download(source, timm_name)
    raise FileNotFoundError(
        f"vision weights source {source!r} is not an existing file, an http(s) URL or a timm model name"
    )


def _unwrap_state_dict(obj: Any, source: str) -> dict[str, Tensor]:
    """Return the tensor mapping inside a checkpoint (DeiT stores `{"model": state_dict}`)."""
    if not isinstance(obj, Mapping):
        raise TypeError(f"{source!r} does not contain a state dict (got {type(obj).__name__})")
    for wrapper in ("model", "state_dict"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    not_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, Tensor))
    if not_tensors:
        raise TypeError(f"{source!r}: entries {not_tensors} of the state dict are not tensors")
    return dict(obj)


def load_vision_weights(encoder: VisionEncoder, source: str, *, strict: bool = True) -> LoadReport:
    """Load ViT weights (DeiT, timm, or a previously saved VisionEncoder) into `encoder`.

    Args:
        encoder: The encoder to fill in place.
        source: A local `.safetensors` / `.pth` / `.pt` / `.bin` file, an http(s) URL, or a timm model name
            (`deit_base_patch16_224`, `timm/deit_base_patch16_224.fb_in1k`, `hf-hub:...`). Only the last two
            kinds touch the network.
        strict: Raise if the source lacks an encoder key (other than `mask_token`) or has a key the encoder
            does not know (classification-head keys excepted).

    Returns:
        A `LoadReport`; it is also logged.

    Raises:
        FileNotFoundError: `source` is neither an existing file, a URL nor a timm model name.
        OSError: A URL or timm model could not be downloaded.
        RuntimeError: A tensor's shape does not match (always), or keys are missing/unexpected (strict).
        ValueError / TypeError: The file is not a plain state dict, or its pos_embed is not CLS + a square grid.

    The encoder is only modified once every check has passed.
    """
    state = _unwrap_state_dict(_read_source(source), source)
    expected = encoder.state_dict()
    report = LoadReport(source)

    kept: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(_HEAD_PREFIXES):
            report.ignored.append(key)
        elif key == "mask_token" and encoder.mask_token is None:
            # Downstream encoders have no mask token; the reference drops it on the same transfer.
            report.ignored.append(key)
        else:
            kept[key] = value

    if "pos_embed" in kept and "pos_embed" in expected:
        old = kept["pos_embed"]
        new = resample_pos_embed(old, encoder.grid_size, encoder.num_prefix_tokens)
        if new is not old:
            logger.info(
                "resampled pos_embed from %d to %d tokens for a %dx%d grid",
                old.shape[1],
                new.shape[1],
                encoder.grid_size,
                encoder.grid_size,
            )
            kept["pos_embed"] = new
            report.resampled.append("pos_embed")

    report.unexpected = sorted(k for k in kept if k not in expected)
    report.missing = sorted(k for k in expected if k not in kept)
    report.ignored.sort()
    if "mask_token" in report.missing:
        report.notes.append("mask_token keeps its zero initialisation (DeiT checkpoints have none)")

    mismatched = [
        f"{k}: source {tuple(v.shape)} vs encoder {tuple(expected[k].shape)}"
        for k, v in kept.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"shape mismatch loading vision weights from {source!r}: " + "; ".join(mismatched))
    hard_missing = [k for k in report.missing if k not in _OPTIONAL_KEYS]
    if strict and (hard_missing or report.unexpected):
        raise CheckpointError(
            f"vision weights from {source!r} do not match the encoder: missing keys {hard_missing}, "
            f"unexpected keys {report.unexpected} (pass strict=False to load anyway)"
        )

    encoder.load_state_dict({k: v for k, v in kept.items() if k in expected}, strict=False)
    logger.info("loaded vision weights from %s", report.summary())
    return report
