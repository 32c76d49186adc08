"""BEiT-style block-wise patch mask for masked image modelling.

Faithful to the reference generator, including its random-number call order, so that a given seed
gives the same masks: per block attempt one ``uniform`` for the area, one ``uniform`` for the log aspect
ratio and, only if the block fits, two ``randint`` calls for the corner. The one deliberate difference
 is the dtype: the reference uses ``np.int``, removed in NumPy >= 1.24, which made every
sample fail on modern NumPy; we return a bool array.
"""

from __future__ import annotations

import logging
import math
import random
from types import ModuleType
from typing import Any

import numpy as np

__all__ = ["BlockMaskGenerator"]

logger = logging.getLogger(__name__)

#: Placement attempts per block before an iteration gives up (reference value).
MAX_ATTEMPTS_PER_BLOCK = 10


class BlockMaskGenerator:
    """Sample (H, W) boolean patch masks made of random rectangular blocks.

    Blocks are added until ``num_masked`` patches are masked or an iteration adds nothing, so a mask has
    at most ``num_masked`` patches: usually exactly that many, occasionally fewer.

    Args:
        grid_size: patch grid, ``R // 16`` for a ViT-B/16 (16 at 256 px); an int means a square grid.
        num_masked: target number of masked patches (75 in the reference, about 29% of 16x16).
        min_block: minimum target area of one block (16).
        max_block: maximum target area of one block; ``None`` means ``num_masked`` (as the reference).
        min_aspect: lower bound of the block aspect ratio h/w (0.3).
        max_aspect: upper bound; ``None`` means ``1 / min_aspect``. The ratio is sampled log-uniformly.
    """

    def __init__(
        self,
        grid_size: int | tuple[int, int],
        num_masked: int = 75,
        min_block: int = 16,
        max_block: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        self.height, self.width = self._parse_grid(grid_size)
        num_cells = self.height * self.width
        if not _is_int(num_masked) or not 1 <= num_masked <= num_cells:
            raise ValueError(f"num_masked must be an int in [1, {num_cells}] (grid cells), got {num_masked!r}")
        if not _is_int(min_block) or min_block < 1:
            raise ValueError(f"min_block must be an int >= 1, got {min_block!r}")
        if min_block > num_masked:
            raise ValueError(f"min_block ({min_block}) must not exceed num_masked ({num_masked})")
        max_block = num_masked if max_block is None else max_block
        if not _is_int(max_block) or max_block < min_block:
            raise ValueError(f"max_block must be an int >= min_block ({min_block}), got {max_block!r}")
        if not (isinstance(min_aspect, (int, float)) and math.isfinite(min_aspect) and min_aspect > 0):
            raise ValueError(f"min_aspect must be a finite number > 0, got {min_aspect!r}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if not (isinstance(max_aspect, (int, float)) and math.isfinite(max_aspect) and max_aspect >= min_aspect):
            raise ValueError(
                f"max_aspect must be a finite number >= min_aspect ({min_aspect}), got {max_aspect!r} "
                "(when None it defaults to 1/min_aspect, so min_aspect must then be <= 1)"
            )
        self.num_masked = int(num_masked)
        self.min_block = int(min_block)
        self.max_block = int(max_block)
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))

    @staticmethod
    def _parse_grid(grid_size: int | tuple[int, int]) -> tuple[int, int]:
        """Accept ``n`` or ``(h, w)`` with positive ints."""
        dims: list[Any]
        if _is_int(grid_size):
            dims = [grid_size, grid_size]
        else:
            try:
                dims = list(grid_size)  # type: ignore[arg-type]
            except TypeError:  # not iterable: reported below as a bad grid_size
                dims = []
        if len(dims) != 2 or not all(_is_int(d) and d >= 1 for d in dims):
            raise ValueError(f"grid_size must be a positive int or a pair of positive ints, got {grid_size!r}")
        return int(dims[0]), int(dims[1])

    @property
    def shape(self) -> tuple[int, int]:
        """The (H, W) shape of every mask."""
        return (self.height, self.width)

    def __call__(self, rng: random.Random | None = None) -> np.ndarray:
        """Sample one mask.

        Args:
            rng: source of randomness. ``None`` uses the module-level :mod:`random` state, which PyTorch
                reseeds in every DataLoader worker (as the reference relies on).

        Returns:
            A bool array of shape (H, W) with at most ``num_masked`` True cells.
        """
        source: random.Random | ModuleType = random if rng is None else rng
        mask = np.zeros(self.shape, dtype=bool)
        count = 0
        while count < self.num_masked:
            # Each block may use the remaining budget, capped by the per-block maximum.
            budget = min(self.num_masked - count, self.max_block)
            added = self._add_block(mask, budget, source)
            if added == 0:  # ten failed placements: give up with fewer than num_masked
                break
            count += added
        return mask

    def _add_block(self, mask: np.ndarray, budget: int, rng: random.Random | ModuleType) -> int:
        """Try up to 10 times to mask one rectangle adding between 1 and ``budget`` new cells.

        Modifies ``mask`` in place and returns the number of newly masked cells (0 if every try failed).
        """
        for _ in range(MAX_ATTEMPTS_PER_BLOCK):
            # When budget < min_block the bounds are reversed; random.uniform still samples between
            # them, which is what the reference does near the end of the budget.
            area = rng.uniform(self.min_block, budget)
            aspect = math.exp(rng.uniform(*self._log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # Strict inequality as in the reference: a block never spans the whole grid side.
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True  # a view into mask: sets exactly the `new` unmasked cells
                    return new
        return 0

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid_size=({self.height}, {self.width}), num_masked={self.num_masked}, "
            f"min_block={self.min_block}, max_block={self.max_block}, "
            f"aspect=({self.min_aspect:.3g}, {self.max_aspect:.3g}))"
        )


def _is_int(x: object) -> bool:
    """True for real integers (numpy ints included), False for bools and floats."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
