"""Drawing explanations: a PNG sheet per (image, text) pair.

The sheet shows the image, the whole-text map, one map per word (the word as its title) and, when the
model has a concept head, the image's top concept tags. How a map is turned into an overlay:

1. upsampled to the image bicubically (as the grounding evaluation does), negatives from the bicubic
   overshoot clipped to 0;
2. smoothed with a Gaussian of half a patch (sigma in image pixels), so the patch grid does not show as
   blocks on large photos;
3. normalised per panel by its maximum, so every word uses the full colour range, except that a word is
   never scaled up by more than ten times the whole-text map's scale (a word whose map is near zero would
   otherwise show its noise at full strength); each word's title gives its peak relative to the
   whole-text map's peak;
4. drawn with the "jet" colour map, its opacity growing with the heat (at most 0.6), so cold regions show
   the photo unchanged.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from .concepts import ConceptTags
from .gradcam import Explanation, upsample_map


MAX_OPACITY = 0.6
COLUMNS = 6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


WORD_SCALE_FLOOR = 0.1  # a word's map is divided by at least this share of the whole-text map's peak


def smoothed_heat(grid_map: Tensor, size: tuple[int, int], patch_pixels: float) -> Tensor:
    """A (g, g) map -> the (H, W) heat to draw, before normalisation (steps 1-2 of the module doc)."""
    heat = upsample_map(grid_map, size).clamp(min=0)
    sigma = max(patch_pixels / 2, 0.5)
    kernel = 2 * math.ceil(2 * sigma) + 1
    # Reflection padding must stay inside the image: a long thin picture (a 126 x 20 banner) gets a shorter
    # kernel across its narrow side. torchvision takes the sizes as (width, height).
    height, width = heat.shape
    sizes = [min(kernel, 2 * side - 1) for side in (width, height)]
    return gaussian_blur(heat[None, None], sizes, [sigma, sigma])[0, 0]


def normalised(heat: Tensor, floor: float = 0.0) -> Tensor:
    """Step 3: divided by its peak, or by `floor` when the peak is smaller; in [0, 1]."""
    scale = max(float(heat.max()), floor)
    return heat / scale if scale > 0 else heat


def _draw(ax, image: np.ndarray, heat: Tensor | None, title: str, cmap) -> None:
    ax.imshow(image)
    if heat is not None:
        colours = cmap(heat.numpy())
        colours[..., 3] = MAX_OPACITY * heat.numpy()
        ax.imshow(colours)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


def render_sheet(image: Image.Image, explanation: Explanation, path: str | Path,
                 tags: ConceptTags | None = None) -> Path:
    """Write the PNG sheet of one explained pair (and the image's concept tags, if given); returns its path."""
    plt = _pyplot()
    from matplotlib import colormaps

    cmap = colormaps["jet"]
    size = (image.height, image.width)
    grid = explanation.text_map.shape[-1]
    patch_pixels = max(size) / grid  # one patch, in image pixels
    pixels = np.asarray(image.convert("RGB"))
    text_heat = smoothed_heat(explanation.text_map, size, patch_pixels)
    text_peak = float(text_heat.max())
    panels: list[tuple[Tensor | None, str]] = [(None, "image"), (normalised(text_heat), "whole text")]
    if explanation.word_maps is not None:
        for word, grid_map in zip(explanation.words, explanation.word_maps):
            heat = smoothed_heat(grid_map, size, patch_pixels)
            relative = float(heat.max()) / text_peak if text_peak > 0 else 0.0
            panels.append((normalised(heat, WORD_SCALE_FLOOR * text_peak), f"{word}  (x{relative:.2f})"))
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    header, footer = 0.8, 0.5 if tags is not None else 0.1  # inches above and below the panels
    height = 2.6 * rows + header + footer
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, height), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - header / height, bottom=footer / height,
                        wspace=0.08, hspace=0.25)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (heat, title) in zip(axes.flat, panels):
        _draw(ax, pixels, heat, title, cmap)
    if tags is not None:
        listing = ", ".join(f"{word} {p:.2f}" for word, p in tags.tags)
        fig.text(0.02, 0.15 / height, "concept tags: " + listing, fontsize=9, ha="left", va="bottom", wrap=True)
    what = "match probability" if explanation.target == "itm" else "ITC similarity"
    cut = " (text cut at the model's length)" if explanation.truncated else ""
    fig.suptitle(f"\"{explanation.text}\"{cut}\n{what} {explanation.score:.3f}, "
                 f"{explanation.target.upper()} Grad-CAM, layer {explanation.layer}", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def pixels_to_image(pixels: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Image.Image:
    """A normalised (3, R, R) tensor back to a PIL image (for explanations of tensors)."""
    rgb = pixels.detach().cpu().float() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return Image.fromarray((rgb.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def overlay_png(image: Image.Image, explanation: Explanation) -> bytes:
    """The whole-text map drawn over the image exactly as in a sheet's "whole text" panel, as PNG bytes
    at the image's own size (for result pages, where one overlay per hit is shown)."""
    from matplotlib import colormaps

    size = (image.height, image.width)
    heat = normalised(smoothed_heat(explanation.text_map, size, max(size) / explanation.text_map.shape[-1])).numpy()
    colours = colormaps["jet"](heat)[..., :3]
    alpha = (MAX_OPACITY * heat)[..., None]
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    blended = (1 - alpha) * pixels + alpha * colours
    out = io.BytesIO()
    Image.fromarray((blended * 255).round().astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()
