"""Process-group helpers that are no-ops at world size 1, so single-process runs need no process group."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate `tensor` from every rank along dim 0 (rank order); the input itself at world size 1."""
    world = get_world_size()
    if world == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def gather_to_rank0(obj: Any) -> list[Any] | None:
    """Every rank's picklable `obj`, in rank order, on rank 0 (None elsewhere); [obj] at world size 1.

    A collective: every rank must call it. Used for the small per-rank state that a checkpoint holds
    (RNG states, data positions, counters), not for tensors of any size.
    """
    if not is_distributed():
        return [obj]
    gathered: list[Any] | None = [None] * get_world_size() if get_rank() == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable `obj`, in rank order, on every rank; [obj] at world size 1."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def init_from_env(device: str = "auto") -> torch.device:
    """Join the torchrun process group when launched by torchrun, and pick this process's device.

    `device` is "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". Under torchrun (WORLD_SIZE > 1)
    the group uses NCCL on CUDA and gloo on CPU, and "cuda"/"auto" mean the GPU of this process's
    LOCAL_RANK, so that N processes on one machine use N different GPUs. A plain process starts no group.
    """
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was asked for, but CUDA is not available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if not use_cuda:
        return torch.device("cpu")
    chosen = torch.device(device if ":" in device else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    torch.cuda.set_device(chosen)
    return chosen


def finish() -> None:
    """Leave the process group, if one was started (a no-op in a plain process)."""
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def evaluation_group(device: str = "auto") -> Iterator[torch.device]:
    """`init_from_env` for a command that evaluates: yields the device, and leaves the process group it
    started on the way out (a caller's own group is left alone)."""
    owns_group = not is_distributed()
    chosen = init_from_env(device)
    try:
        yield chosen
    finally:
        if owns_group:
            finish()
