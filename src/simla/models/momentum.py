"""Momentum (EMA) teachers and the wrap-around feature queue.

A model declares its teachers: `MOMENTUM_MODULES` names the online submodules that have an EMA twin
`teacher_name(name)` (`<name>_m`). `MomentumTeachers`, a base of every SIMLA model, builds the twins, pairs
them with their online modules, copies the online weights into them and runs the EMA update; a model
without teachers declares none and gets an empty pairing. `is_teacher_key` tells a teacher's state-dict
key from an online one, wherever the model came from.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn


#: The name suffix of an EMA teacher: the teacher of `text_encoder` is `text_encoder_m`.
TEACHER_SUFFIX = "_m"


def teacher_name(name: str) -> str:
    """The attribute (and state-dict prefix) of the EMA teacher of the online submodule `name`."""
    return name + TEACHER_SUFFIX


def online_name(name: str) -> str:
    """The online submodule a teacher's name belongs to (`text_encoder_m` -> `text_encoder`); others unchanged."""
    return name.removesuffix(TEACHER_SUFFIX)


def is_teacher_key(key: str) -> bool:
    """Whether a state-dict key or parameter name (`visual_encoder_m.blocks.0...`) belongs to an EMA teacher."""
    return key.split(".", 1)[0].endswith(TEACHER_SUFFIX)


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
    if online:  # a model without teachers has nothing to copy
        torch._foreach_copy_(momentum, online)


@torch.no_grad()
def momentum_update(pairs: Iterable[tuple[nn.Module, nn.Module]], momentum: float) -> None:
    """theta_m <- m * theta_m + (1 - m) * theta, fused over all tensors (no per-tensor Python work).

    Computed as one lerp, theta_m + (1 - m) * (theta - theta_m): one pass over the teacher's memory
    instead of a multiply pass and an add pass (the same value up to float rounding).
    """
    online, teacher = _paired_parameters(pairs)
    if online:
        torch._foreach_lerp_(teacher, online, 1.0 - momentum)


class MomentumTeachers:
    """The EMA teachers a model declares in `MOMENTUM_MODULES`, for an `nn.Module` subclass.

    A declared name whose online module the model did not build (absent, e.g. the MLM head of a pretraining
    ablation without MLM) gets no teacher; one that is None (an optional module, e.g. the MIM width adapter
    when the widths agree) gets a None teacher. Both are left out of `momentum_pairs()`.
    """

    #: Names of the online submodules that have an EMA teacher `<name>_m`, in the order the teachers are built.
    MOMENTUM_MODULES: tuple[str, ...] = ()

    def build_momentum_teachers(self) -> None:
        """Create every declared teacher as a frozen copy of its online module (call once the online modules exist)."""
        for name in self.MOMENTUM_MODULES:
            if not hasattr(self, name):
                continue
            online = getattr(self, name)
            setattr(self, teacher_name(name), None if online is None else make_momentum_copy(online))

    def momentum_names(self) -> list[str]:
        """The declared names that have an online module and a teacher in this model."""
        return [name for name in self.MOMENTUM_MODULES
                if getattr(self, name, None) is not None and getattr(self, teacher_name(name), None) is not None]

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, teacher) module pairs; empty for a model without teachers."""
        return [(getattr(self, name), getattr(self, teacher_name(name))) for name in self.momentum_names()]

    def copy_params_to_momentum(self) -> None:
        """Make every teacher equal to its online module; call after loading online weights (a no-op without teachers)."""
        copy_to_momentum(self.momentum_pairs())

    def update_momentum_teachers(self, momentum: float) -> None:
        """One EMA step of every teacher towards its online module (see `momentum_update`)."""
        momentum_update(self.momentum_pairs(), momentum)


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
