"""Resident-memory measurement shared by the benchmark scripts (run as `python benchmarks/NAME.py`, which puts
this folder on the import path)."""

from __future__ import annotations

import os
import resource
import sys
import threading

try:  # optional: psutil reads the current RSS portably; /proc is the Linux fallback
    import psutil
except ImportError:  # pragma: no cover - depends on the environment
    psutil = None

MIB = 1024.0 * 1024.0


def current_rss_bytes() -> int | None:
    """This process's resident set now, or None where neither psutil nor /proc can tell."""
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def lifetime_peak_rss_mib() -> float:
    """The process-lifetime peak RSS (it can only grow from one measured configuration to the next)."""
    # ru_maxrss is KiB on Linux but bytes on macOS.
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


class RssSampler:
    """Background thread recording the peak current RSS between enter and exit."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss is not None:
                self.peak = max(self.peak, rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
