"""The reference RandAugment (2 ops with replacement, p=0.5, magnitude 7), split into sampling and application.

Sampling draws every random decision from an explicit :class:`random.Random`; application runs the ops in
PIL. Splitting the two lets the pretraining views apply one draw to two resolutions (geometric ops to both,
photometric ops to the encoder view only).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageEnhance, ImageOps

__all__ = ["GEOMETRIC_OPS", "PHOTOMETRIC_OPS", "RANDAUGMENT_OPS", "Op", "RandAugment"]

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
