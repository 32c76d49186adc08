"""ITM re-ranking of search candidates, through the batched pair scorer of retrieval evaluation.

The query text is tokenised once; candidate images are read from the index, encoded by the ViT and
scored with the text by the ITM head, ``batch_size`` pairs per forward pass. A candidate whose image can
no longer be read (moved or corrupted since indexing) gets ``None`` and keeps its ITC place instead of
failing the whole search.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from ..data.images import BadSampleError
from ..eval.rerank import rerank

__all__ = ["itm_probabilities"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def itm_probabilities(model, text: str, item_ids: Sequence[int], index, *, rows: Sequence[int] | None = None,
                      batch_size: int = 32) -> dict[int, float | None]:
    """ITM match probability of ``text`` with each item's image: {rows[i] (default item_ids[i]): p or None}."""
    rows = list(item_ids if rows is None else rows)
    if not item_ids:
        return {}
    ids, mask = model.tokenize([text])
    unreadable: set[int] = set()

    def pixels_of(positions: torch.Tensor) -> torch.Tensor:
        images = []
        for p in positions.tolist():
            try:
                images.append(index.load_image(item_ids[p]))
            except (BadSampleError, OSError, LookupError) as exc:
                logger.warning("re-ranking: item %s is unreadable now (%s); it keeps its ITC place", item_ids[p], exc)
                unreadable.add(p)
                images.append(None)
        size = model.config.vision.image_size
        blank = torch.zeros(3, size, size, device=model.device)
        real = [img for img in images if img is not None]
        encoded = iter(model.prepare_pixels(real)) if real else iter(())
        return torch.stack([next(encoded) if img is not None else blank for img in images])

    def score_pairs(query: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        tokens = model.visual_encoder(pixels_of(positions))
        n = positions.numel()
        logits = model.itm_logits(tokens, ids.expand(n, -1), mask.expand(n, -1))
        return logits.float().softmax(-1)[:, 1]

    # One query row; k = all candidates, so every candidate is scored, in fixed-size batches.
    order = torch.arange(len(item_ids), 0, -1, dtype=torch.float32)[None]
    scores = rerank(order, len(item_ids), score_pairs, batch_size=batch_size)[0]
    return {row: (None if p in unreadable else float(scores[p])) for p, row in enumerate(rows)}
