"""Visual tokenizers: frozen image -> discrete-code models that produce the MIM targets.

SIMLA's masked-image-modelling objective predicts, for every masked ViT patch, the id of a discrete visual
token computed from a second "tokenizer view" of the image (the same crop at R/2 pixels, so that the token
grid matches the ViT patch grid). This module gives that computation one interface,
`VisualTokenizer`, and two implementations:

- `DalleTokenizer`, the OpenAI DALL-E dVAE encoder used by the reference (needs the optional `dall-e`
  package and the released weights);
- `KMeansTokenizer`, a built-in k-means codebook over contrast-normalised pixel patches, which needs no
  download, so that MIM also works on a fresh offline install.

All tokenizers take float images in [0, 1] (no mean/std normalisation) of shape (B, 3, S, S) and return
(B, grid_size * grid_size) int64 ids, flattened row-major. They are frozen, always in eval mode, and run
without autograd and without autocast, so that a surrounding bf16 autocast region cannot change the targets.

Loading follows state dicts are read with `torch.load(weights_only=True)` or from safetensors; a
file that needs arbitrary unpickling (the original `encoder.pkl` is a pickled module) is refused unless the
caller passes `trust_pickle=True`.

The interface and shared helpers live in `simla.tokenizers.base`, the implementations in
`simla.tokenizers.dalle` and `simla.tokenizers.kmeans`; this module holds the `load_visual_tokenizer`
dispatcher and re-exports the public names, so `from simla.tokenizers.visual import ...` keeps working.
"""

from __future__ import annotations

import logging
import os

from .base import (
    FORMAT_VERSION,  # noqa: F401 (re-exported)
    KIND_DALLE,
    KIND_KMEANS,
    PathLike,  # noqa: F401 (re-exported)
    VisualTokenizer,
    _check_path,
    _is_safetensors,
    _read_safetensors_metadata,
)
from .dalle import (
    DALLE_DEFAULT_IMAGE_SIZE,  # noqa: F401 (re-exported)
    DALLE_DOWNSAMPLE,  # noqa: F401 (re-exported)
    DALLE_GROUP_COUNT,  # noqa: F401 (re-exported)
    DALLE_PIXEL_EPS,  # noqa: F401 (re-exported)
    DalleTokenizer,
    UntrustedPickleError,
)
from .kmeans import KMeansTokenizer

logger = logging.getLogger(__name__)

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
        trust_pickle: allow arbitrary unpickling of DALL-E files that are not plain state dicts.
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
