"""How every evaluation splits its examples across ranks and gathers them back, exactly once each.

Rank r takes examples r, r + W, ... (no padding: a DistributedSampler would repeat examples to even out
the last batch, and they would be counted twice); the per-rank rows are gathered and put back in file
order by their "index".
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..distributed import all_gather_objects, get_rank, get_world_size


def this_rank_share(count: int) -> list[int]:
    """The indices of `count` examples that this rank evaluates."""
    return list(range(get_rank(), count, get_world_size()))


def eval_loader(dataset: Dataset, *, batch_size: int, num_workers: int, progress: bool = False,
                desc: str = "eval"):
    """A DataLoader (with a progress bar when asked) that leaves the global RNG alone: a private generator,
    so that evaluating in the middle of a run keeps its resume exact."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(0))
    if progress:
        return tqdm(loader, desc=desc, unit="batch")
    return loader


def gather_in_order(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every rank's rows, on every rank, in file order (by the "index" each row carries)."""
    return sorted((row for part in all_gather_objects(rows) for row in part), key=lambda row: row["index"])
