"""Drawing explanations: a PNG sheet per (image, text) pair, and one overlay per search hit.

The sheet shows the image, the whole-text map, one map per word (the word as its title) and, when the
model has a concept head, the image's top concept tags. What a map means decides how it is drawn. An ITM
Grad-CAM value is a token's attention to a patch times how much that attention raises the match score: the
values of one pair's words are in the same units, and the whole-text map is the MEAN of its real tokens'
maps. Attention is never zero, so every map also carries a level that most of the image gets; what points
at something is the rise above that level. Therefore:

1. each map is upsampled to the image bicubically (as the grounding evaluation does), negatives from the
   bicubic overshoot clipped to 0, and smoothed with a Gaussian of half a patch (sigma in image pixels), so
   the patch grid does not show as blocks on large photos;
2. a panel shows its map's rise above the map's own MEDIAN (the level at least half of the image gets: a
   dip somewhere, often a ring around an object, must not make the whole background look hot), on ONE span
   per sheet: the rise of the tokens' SUM (the whole-text map times the token count) from its median to its
   peak. So the whole-text panel uses the full colour
   range, and a word's panel shows its share of that evidence: words are comparable with each other and
   with the whole text, a word the model ignores (a flat map) stays blank, and no word is stretched to fill
   the range on its own (a word that rises more than all tokens together is clipped). Each word's title
   gives its peak relative to the whole-text map's peak;
3. below FLOOR (a fifth of the span) nothing is drawn: those pixels are the image's own, unchanged;
4. above it, the "jet" colour map from blue (at the floor) to red (at the top of the span), with an opacity
   from MIN_OPACITY to MAX_OPACITY. A small cross marks each drawn panel's peak on the un-smoothed upsampled
   map (the point the pointing game, `simla.eval.pointing`, checks); a given box (the named object's) is
   outlined on every panel;
5. an ITM match probability below LOW_MATCH puts a notice under the title: the model does not find the text
   in the image, so the maps show what would raise the score, not where the thing is.

`overlay_png` (search result pages) draws the whole-text map alone by the same rules (its span is its own
rise from median to peak), so at least half of every image, the coldest half, stays exactly its pixels.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.transforms.functional import gaussian_blur

from .concepts import ConceptTags
from .gradcam import Explanation, peak_point, upsample_map

FLOOR = 0.2  # share of the sheet's span below which a pixel is left as it is
MIN_OPACITY, MAX_OPACITY = 0.25, 0.65  # at the floor and at the top of the span
LOW_MATCH = 0.5  # below this ITM match probability the maps do not locate the text
COLUMNS = 6


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def smoothed_heat(grid_map: Tensor, size: tuple[int, int], patch_pixels: float) -> Tensor:
    """A (g, g) map -> the (H, W) heat to draw, before step 2 (step 1 of the module doc)."""
    heat = upsample_map(grid_map, size).clamp(min=0)
    sigma = max(patch_pixels / 2, 0.5)
    kernel = 2 * math.ceil(2 * sigma) + 1
    # Reflection padding must stay inside the image: a long thin picture (a 126 x 20 banner) gets a shorter
    # kernel across its narrow side. torchvision takes the sizes as (width, height).
    height, width = heat.shape
    sizes = [min(kernel, 2 * side - 1) for side in (width, height)]
    return gaussian_blur(heat[None, None], sizes, [sigma, sigma])[0, 0]


def levels(heat: Tensor, base: float, span: float) -> Tensor:
    """Step 2: the rise of `heat` above `base` as a share of `span`, clipped to [0, 1]; all zero when the span
    is not positive (a flat map)."""
    return ((heat - base) / span).clamp(0, 1) if span > 0 else torch.zeros_like(heat)


def overlay_colours(level: np.ndarray, cmap) -> np.ndarray:
    """Steps 3-4: (H, W) levels in [0, 1] -> (H, W, 4) RGBA, fully transparent below FLOOR."""
    above = level >= FLOOR
    t = np.clip((level - FLOOR) / (1 - FLOOR), 0, 1)
    colours = cmap(t)
    colours[..., 3] = np.where(above, MIN_OPACITY + (MAX_OPACITY - MIN_OPACITY) * t, 0.0)
    return colours


def blend(image: Image.Image, level: np.ndarray, cmap) -> np.ndarray:
    """The image with the overlay of `level` composited on it, (H, W, 3) uint8; pixels below the floor are
    returned exactly as they were."""
    pixels = np.asarray(image.convert("RGB"))
    colours = overlay_colours(level, cmap)
    alpha = colours[..., 3:]
    mixed = (1 - alpha) * (pixels / 255.0) + alpha * colours[..., :3]
    return (mixed * 255).round().astype(np.uint8)  # alpha 0: p / 255 * 255 rounds back to p exactly


def token_count(explanation: Explanation) -> int:
    """How many token maps the whole-text map averages (exact when the explanation says, else [CLS] words [SEP])."""
    if explanation.word_maps is None:
        return 1  # ITC: one map, nothing to compare it with
    return explanation.tokens if explanation.tokens else len(explanation.words) + 2


def low_match_notice(explanation: Explanation) -> str | None:
    if explanation.target != "itm" or explanation.score >= LOW_MATCH:
        return None
    return (f"match probability below {LOW_MATCH}: the model does not find this text here, "
            "so the maps do not show where it is")


def _draw(ax, image: Image.Image, level: Tensor | None, peak: Tensor | None, title: str, cmap,
          box: Sequence[float] | None) -> None:
    ax.imshow(image if level is None else blend(image, level.numpy(), cmap))
    if box is not None:
        from matplotlib.patches import Rectangle

        x, y, w, h = (float(v) for v in box[:4])
        for colour, width in (("black", 2.5), ("white", 1.2)):  # visible on light and dark images alike
            ax.add_patch(Rectangle((x - 0.5, y - 0.5), w, h, fill=False, edgecolor=colour, linewidth=width))
    point = peak_point(peak) if level is not None and peak is not None and bool((level >= FLOOR).any()) else None
    if point is not None:  # imshow puts pixel (row, col)'s centre at (col, row); peak_point says (col + .5, row + .5)
        for colour, size, width in (("black", 9, 3.0), ("white", 7, 1.4)):
            ax.plot([point[0] - 0.5], [point[1] - 0.5], marker="+", color=colour, markersize=size,
                    markeredgewidth=width)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


Panel = tuple[Tensor | None, Tensor | None, str]  # (levels in [0, 1] or None for the bare image, peak map, title)


def sheet_panels(explanation: Explanation, size: tuple[int, int]) -> list[Panel]:
    """The panels of a sheet for an image of (height, width) `size`: steps 1-2 of the module doc."""
    patch_pixels = max(size) / explanation.text_map.shape[-1]  # one patch, in image pixels
    text_heat = smoothed_heat(explanation.text_map, size, patch_pixels)
    text_peak = float(text_heat.max())
    # The whole text drawn as the tokens' sum (the mean times their count): its rise is the sheet's span.
    # (torch's median is the lower of the two middle values: a value of the map, no interpolation.)
    summed = text_heat * token_count(explanation)
    span = float(summed.max() - summed.median())
    panels: list[Panel] = [(None, None, "image"),
                           (levels(summed, float(summed.median()), span), explanation.text_map_image, "whole text")]
    if explanation.word_maps is not None:
        for word, grid_map, peak in zip(explanation.words, explanation.word_maps, explanation.word_maps_image):
            heat = smoothed_heat(grid_map, size, patch_pixels)
            relative = float(heat.max()) / text_peak if text_peak > 0 else 0.0
            panels.append((levels(heat, float(heat.median()), span), peak, f"{word}  (x{relative:.2f})"))
    return panels


def render_sheet(image: Image.Image, explanation: Explanation, path: str | Path,
                 tags: ConceptTags | None = None, box: Sequence[float] | None = None) -> Path:
    """Write the PNG sheet of one explained pair (and the image's concept tags, if given; the named object's
    [x, y, w, h] box outlined on every panel, if given); returns its path."""
    plt = _pyplot()
    from matplotlib import colormaps

    cmap = colormaps["jet"]
    image = image.convert("RGB")
    panels = sheet_panels(explanation, (image.height, image.width))
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    notice = low_match_notice(explanation)
    header = 1.0 if notice else 0.8  # inches above the panels
    footer = 0.5 if tags is not None else 0.1  # and below
    height = 2.6 * rows + header + footer
    fig, axes = plt.subplots(rows, columns, figsize=(max(2.4 * columns, 7.2), height), squeeze=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=1 - header / height, bottom=footer / height,
                        wspace=0.08, hspace=0.25)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (level, peak, title) in zip(axes.flat, panels):
        _draw(ax, image, level, peak, title, cmap, box)
    if tags is not None:
        fig.text(0.02, 0.15 / height, "concept tags: " + tags.describe(), fontsize=9, ha="left", va="bottom", wrap=True)
    what = "match probability" if explanation.target == "itm" else "ITC similarity"
    cut = " (text cut at the model's length)" if explanation.truncated else ""
    title = (f"\"{explanation.text}\"{cut}\n{what} {explanation.score:.3f}, "
             f"{explanation.target.upper()} Grad-CAM, layer {explanation.layer}")
    fig.suptitle(title, fontsize=11, y=1 - 0.05 / height, va="top")
    if notice:  # on its own line, in red, so that it is not read past
        fig.text(0.5, 1 - 0.55 / height, notice, fontsize=10, color="firebrick", ha="center", va="top")
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

    image = image.convert("RGB")
    size = (image.height, image.width)
    heat = smoothed_heat(explanation.text_map, size, max(size) / explanation.text_map.shape[-1])
    level = levels(heat, float(heat.median()), float(heat.max() - heat.median())).numpy()
    out = io.BytesIO()
    Image.fromarray(blend(image, level, colormaps["jet"])).save(out, format="PNG")
    return out.getvalue()
