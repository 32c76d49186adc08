"""Momentum (EMA) teachers and the wrap-around feature queue."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy of `module`: the EMA teacher starts equal to its online twin."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _paired_parameters(pairs: Iterable[tuple[nn.Module, nn.Module]]) -> tuple[list[Tensor], list[Tensor]]:
    online, momentum = [], []
    for a, b in pairs:
        pa, pb = list(a.parameters()), list(b.parameters())
        if len(pa) != len(pb) or any(x.shape != y.shape for x, y in zip(pa, pb)):
            raise RuntimeError(f"momentum pair {type(a).__name__} does not mirror its online module")
        online += pa
        momentum += pb
    return online, momentum


@torch.no_grad()
def copy_to_momentum(pairs: Iterable[tuple[nn.Module, nn.Module]]) -> None:
    """Overwrite every momentum parameter with its online twin (done after any checkpoint load)."""
    online, momentum = _paired_parameters(pairs)
    torch._foreach_copy_(momentum, online)


@torch.no_grad()
def momentum_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """theta_m <- m * theta_m + (1 - m) * theta, fused over all tensors (no per-tensor Python work).

    Computed as one lerp, theta_m + (1 - m) * (theta - theta_m): one pass over the teacher's memory
    instead of a multiply pass and an add pass (the same value up to float rounding).
    """
    online, teacher = _paired_parameters(pairs)
    torch._foreach_lerp_(teacher, online, 1.0 - momentum)


@torch.no_grad()
def write_to_queue(queue: Tensor, features: Tensor, pointer: Tensor) -> None:
    """Write `features` (n, E) as columns of `queue` (E, Q) from `pointer` on, wrapping around.

    Any n works (the reference asserted Q % n == 0); if n > Q only the newest Q columns are kept.
    `pointer` is a (1,) long tensor updated in place, so no host synchronisation happens.
    """
    size, total = queue.shape[1], features.shape[0]
    kept = features[-size:]  # as if written one after another: the oldest rows would be overwritten
    skipped = total - kept.shape[0]
    columns = (pointer + skipped + torch.arange(kept.shape[0], device=queue.device)) % size
    queue.index_copy_(1, columns, kept.t().to(queue.dtype))
    pointer.copy_((pointer + total) % size)
