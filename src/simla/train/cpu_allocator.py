"""How the C library's malloc treats a CPU training process: keep freed tensor memory, or give it back.

PyTorch's CPU tensors come from the C library's malloc. A training step allocates and frees gigabytes of
activations, and glibc's defaults suit neither speed nor memory:

- by default, blocks above a moving threshold get fresh pages from the kernel and the heap is trimmed
  whenever its free top passes twice that threshold, so the next step faults the same memory back in
  page by page, zero-filled (in a profile: `fill_`, `bernoulli_` and copies into new tensors at a few
  hundred MB/s);
- memory freed inside the heap is kept, so after a few steps the process holds gigabytes that no tensor
  uses (the peak RSS of a checkpointed paper-size step at batch 8 is 2-3 GB above its live tensors).

`configure_cpu_allocator("keep")` (simla's default for CPU training) raises the threshold to glibc's
maximum (32 MiB) and stops trimming below 1 GiB, so activations are recycled from step to step (1.07x a
paper-size step on a 2-core CPU, the same peak memory). `"release"` (the default with gradient
checkpointing) serves every block from 4 MiB up with its own mapping that is unmapped when freed, so
RSS follows the live tensors (a checkpointed batch-8 step: 6.2 GB instead of 8.7, at the price of page
faults: about 30 GB zero-filled per step, 1.47x the plain step's time instead of 1.08x). `"system"` leaves
glibc's defaults. The settings are process-wide and take effect for later allocations; other C libraries
(musl, a preloaded jemalloc/tcmalloc) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

logger = logging.getLogger(__name__)

CPU_ALLOCATOR_POLICIES = ("auto", "keep", "release", "system")

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MIB = 1 << 20
_SETTINGS = {
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit systems.
    "keep": {_M_MMAP_THRESHOLD: 32 * _MIB, _M_TRIM_THRESHOLD: 1024 * _MIB},
    # Activations of the paper model at batch 8 are 2-25 MB: from 4 MiB up, each gets its own mapping.
    "release": {_M_MMAP_THRESHOLD: 4 * _MIB, _M_TRIM_THRESHOLD: 8 * _MIB},
}


def resolve_cpu_allocator(policy: str, grad_checkpointing: bool) -> str:
    """"auto" -> "release" when activations are checkpointed (memory is the point), else "keep"."""
    if policy == "auto":
        return "release" if grad_checkpointing else "keep"
    return policy


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def configure_cpu_allocator(policy: str, grad_checkpointing: bool = False) -> bool:
    """Apply `policy` ("keep", "release" or "system"; "auto" is resolved first) to glibc's malloc; True when
    settings were changed.

    Returns False (and changes nothing) for "system" and where the C library is not glibc.
    """
    if policy not in CPU_ALLOCATOR_POLICIES:
        raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATOR_POLICIES}, got {policy!r}")
    policy = resolve_cpu_allocator(policy, grad_checkpointing)
    if policy == "system":
        return False
    libc = _glibc()
    if libc is None:
        logger.info("cpu_allocator=%s: not a glibc system, malloc left as it is", policy)
        return False
    for parameter, value in _SETTINGS[policy].items():
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            logger.warning("mallopt(%d, %d) was refused; malloc keeps its previous setting", parameter, value)
            return False
    logger.info("cpu_allocator=%s: %s", policy, {k: v for k, v in _SETTINGS[policy].items()})
    return True
