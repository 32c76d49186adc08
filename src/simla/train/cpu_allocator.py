"""Which malloc serves a CPU training process, and how it treats freed tensor memory.

PyTorch's CPU tensors come from the C library's malloc. A training step allocates and frees gigabytes of
activations, and glibc's defaults suit neither speed nor memory:

- by default, blocks above a moving threshold get fresh pages from the kernel and the heap is trimmed
  whenever its free top passes twice that threshold, so the next step faults the same memory back in
  page by page, zero-filled (in a profile: `fill_`, `bernoulli_` and copies into new tensors at a few
  hundred MB/s);
- memory freed inside the heap is kept, so after a few steps the process holds gigabytes that no tensor
  uses (the peak RSS of a checkpointed paper-size step at batch 8 is 2-3 GB above its live tensors).

Policies (the recipes' `cpu_allocator`):

- `"keep"` (simla's default for CPU training) raises glibc's mmap threshold to its maximum (32 MiB) and
  stops trimming below 1 GiB, so activations are recycled from step to step (1.07x a paper-size step on a
  2-core CPU, the same peak memory).
- `"release"` (the default with gradient checkpointing) serves every block from 4 MiB up with its own
  mapping that is unmapped when freed, so RSS follows the live tensors (a checkpointed batch-8 step: 6.2 GB
  instead of 8.7), at the price of page faults: about 30 GB zero-filled per step, 1.47x the plain step's
  time.
- `"tcmalloc"`, `"jemalloc"`, `"mimalloc"`: another malloc altogether, loaded before the C library's
  (`LD_PRELOAD`), which keeps freed memory in size classes and returns it gradually. These can only be
  chosen when a process starts: the `simla` command restarts itself under the library
  (`restart_under_allocator`); a Python program started some other way must be launched with `LD_PRELOAD`
  set. Under tcmalloc a checkpointed batch-8 step peaks at the 6.2 GB of `"release"` and takes 1.26x the
  plain step's time, instead of 1.47x.
- `"system"` leaves malloc as it is.

`"auto"` leaves a malloc that was preloaded by the user alone, and otherwise picks `"release"` with
gradient checkpointing and `"keep"` without.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform
import sys
from pathlib import Path

from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: Policies applied to glibc's malloc in a running process.
GLIBC_POLICIES = ("keep", "release")
#: Mallocs that replace glibc's; each must be loaded when the process starts.
PRELOADED_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")
CPU_ALLOCATOR_POLICIES = ("auto", *GLIBC_POLICIES, *PRELOADED_ALLOCATORS, "system")

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

# Shared-library file names of each malloc, most specific first, and how to install it.
_LIBRARY_NAMES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
    "mimalloc": ("libmimalloc.so.3", "libmimalloc.so.2", "libmimalloc.so"),
}
_INSTALL_HINTS = {
    "tcmalloc": "`apt install libtcmalloc-minimal4` on Debian or Ubuntu, `dnf install gperftools-libs` on Fedora",
    "jemalloc": "`apt install libjemalloc2` on Debian or Ubuntu, `dnf install jemalloc` on Fedora",
    "mimalloc": '`pip install "simla[mimalloc]"`',
}
# Set by restart_under_allocator in the restarted process, so that a preload that does not take stops there.
_RESTART_MARK = "SIMLA_MALLOC_RESTARTED"


def resolve_cpu_allocator(policy: str, grad_checkpointing: bool) -> str:
    """"auto" -> the preloaded malloc if one serves this process, else "release" when activations are
    checkpointed (memory is the point) and "keep" otherwise; any other policy is returned as it is."""
    if policy != "auto":
        return policy
    active = active_allocator()
    if active in PRELOADED_ALLOCATORS:
        return active
    return "release" if grad_checkpointing else "keep"


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def active_allocator() -> str | None:
    """Which malloc serves this process: "glibc", "tcmalloc", "jemalloc", "mimalloc", "other", or None when
    it cannot be told (not Linux).

    Read from the library that the process-wide `malloc` symbol resolves into, so a malloc library that is
    merely loaded (linked into some extension) does not count.
    """
    maps = Path("/proc/self/maps")
    if platform.system() != "Linux" or not maps.exists():
        return None
    address = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < end:
            name = Path(fields[5]).name if len(fields) == 6 else ""
            for allocator in PRELOADED_ALLOCATORS:
                if name.startswith(f"lib{allocator}"):
                    return allocator
            return "glibc" if name.startswith("libc.") or name.startswith("libc-") else "other"
    return "other"


def find_allocator_library(name: str) -> Path | None:
    """The shared library of malloc `name` ("tcmalloc", "jemalloc", "mimalloc") on this machine, or None.

    Looks in the Python environment first (a pip-installed mimalloc, a conda environment's lib/), then in
    the system's library folders, then in the dynamic linker's cache.
    """
    if name not in _LIBRARY_NAMES:
        raise ValueError(f"unknown malloc {name!r}; choose from {PRELOADED_ALLOCATORS}")
    folders = [Path(entry) / "cmeel.prefix" / "lib" for entry in sys.path if entry]
    folders += [Path(sys.prefix) / "lib"]
    folders += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                                  "/usr/lib", "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")]
    for filename in _LIBRARY_NAMES[name]:
        for folder in folders:
            candidate = folder / filename
            if candidate.is_file():
                return candidate
    # Elsewhere, the dynamic linker's cache gives a name (libjemalloc.so.2) that LD_PRELOAD resolves alike.
    found = ctypes.util.find_library(_LIBRARY_NAMES[name][0][3:].split(".so")[0])
    return Path(found) if found else None


def _missing_library(name: str) -> ConfigError:
    return ConfigError(f"cpu_allocator={name}: the {name} library was not found on this machine; install it "
                       f"({_INSTALL_HINTS[name]}), or use cpu_allocator=auto, keep, release or system")


def preload_environment(name: str, environment: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `environment` (default: this process's) in which a new process starts under malloc `name`:
    its library first in LD_PRELOAD. Raises ConfigError, with the install command, when it is missing."""
    library = find_allocator_library(name)
    if library is None:
        raise _missing_library(name)
    environment = dict(os.environ if environment is None else environment)
    environment["LD_PRELOAD"] = os.pathsep.join(filter(None, [str(library), environment.get("LD_PRELOAD")]))
    return environment


def restart_under_allocator(policy: str) -> None:
    """If `policy` names a malloc that does not serve this process yet, replace the process with the same
    command line under that malloc (`LD_PRELOAD`); otherwise return.

    Only for a program's entry point (the `simla` command calls it once its recipe has loaded): everything
    the process did so far is discarded. Raises ConfigError when the library is missing, or when an earlier
    restart did not make it the process's malloc.
    """
    if policy not in PRELOADED_ALLOCATORS or active_allocator() == policy:
        return
    if active_allocator() is None:
        raise ConfigError(f"cpu_allocator={policy} preloads a library, which simla does on Linux only")
    environment = preload_environment(policy)
    if os.environ.get(_RESTART_MARK) == policy:
        raise ConfigError(f"cpu_allocator={policy}: the process was restarted with LD_PRELOAD="
                          f"{environment['LD_PRELOAD']}, but malloc still comes from {active_allocator()}; check "
                          f"that the library loads (LD_PRELOAD=... python -c pass)")
    environment[_RESTART_MARK] = policy
    logger.info("cpu_allocator=%s: restarting under LD_PRELOAD=%s", policy, environment["LD_PRELOAD"])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environment)


def configure_cpu_allocator(policy: str, grad_checkpointing: bool = False) -> bool:
    """Apply `policy` ("auto" is resolved first) to this process's malloc; True when glibc's settings were
    changed or the named malloc serves the process.

    "keep" and "release" change glibc's settings; they change nothing (and return False) where malloc is not
    glibc's. "tcmalloc", "jemalloc" and "mimalloc" only check that the process was started under that malloc,
    and raise ConfigError, saying how to start it so, when it was not. "system" changes nothing.
    """
    if policy not in CPU_ALLOCATOR_POLICIES:
        raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATOR_POLICIES}, got {policy!r}")
    policy = resolve_cpu_allocator(policy, grad_checkpointing)
    if policy == "system":
        return False
    active = active_allocator()
    if policy in PRELOADED_ALLOCATORS:
        if active == policy:
            logger.info("cpu_allocator=%s: malloc comes from %s", policy, policy)
            return True
        library = find_allocator_library(policy)
        if library is None:
            raise _missing_library(policy)
        raise ConfigError(f"cpu_allocator={policy} must be loaded when the process starts: run through the `simla` "
                          f"command, which restarts itself under it, or start Python with LD_PRELOAD={library}")
    libc = _glibc()
    if libc is None or active not in ("glibc", None):
        logger.info("cpu_allocator=%s: malloc is not glibc's (%s), left as it is", policy, active)
        return False
    for parameter, value in _SETTINGS[policy].items():
        if libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) != 1:
            logger.warning("mallopt(%d, %d) was refused; malloc keeps its previous setting", parameter, value)
            return False
    logger.info("cpu_allocator=%s: %s", policy, {k: v for k, v in _SETTINGS[policy].items()})
    return True
