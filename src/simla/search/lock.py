"""The write lock of an index folder: one writer (build, update, check --repair) at a time.

The lock is an ``flock`` on ``write.lock`` in the index folder, taken without waiting: a second writer is
refused at once with :class:`IndexBusyError` naming the process that holds it, instead of racing the first
(the two would delete each other's feature files). The kernel drops the lock when its holder exits, even
on a crash or kill, so a stale lock file never blocks anyone; the file itself stays (deleting it would let
two processes lock two different files). Readers (search, info, serve) never take the lock: SQLite
serialises them with the writer's short commits.

The lock is re-entrant within a process (a build that resumes runs an update under the same lock). Under
torchrun, rank 0 takes it and every rank learns whether it got it, so all ranks fail or go on together.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..distributed import all_gather_objects, get_rank
from ..errors import SimlaError

__all__ = ["LOCK_NAME", "IndexBusyError", "write_lock"]

LOCK_NAME = "write.lock"

_held: dict[str, tuple[int, int]] = {}  # real path of the index folder -> (file descriptor, depth)
_held_guard = threading.Lock()


class IndexBusyError(SimlaError, RuntimeError):
    """Another process is writing to the index (building, updating or repairing it)."""


def _holder(lock_file: Path) -> str:
    """The pid recorded by the process holding the lock, for the message ("unknown" if unreadable)."""
    try:
        text = lock_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return "unknown"
    return text if text.isdigit() else "unknown"


def _acquire(folder: Path) -> int:
    """Lock ``folder``'s lock file without waiting; returns its descriptor or raises IndexBusyError."""
    lock_file = folder / LOCK_NAME
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise IndexBusyError(f"index {folder} is being updated by another process (pid {_holder(lock_file)}); "
                             f"try again when it finishes") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    return fd


def _lock_local(folder: Path) -> tuple[str, bool]:
    """Take (or re-enter) this process's lock on ``folder``; returns (key, whether it was taken here)."""
    key = os.path.realpath(folder)
    with _held_guard:
        if key in _held:
            fd, depth = _held[key]
            _held[key] = (fd, depth + 1)
            return key, False
        _held[key] = (_acquire(folder), 1)
        return key, True


def _unlock_local(key: str) -> None:
    with _held_guard:
        fd, depth = _held[key]
        if depth > 1:
            _held[key] = (fd, depth - 1)
            return
        del _held[key]
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _lock_ranks(folder: Path) -> str | None:
    """Rank 0 locks; every rank raises the same IndexBusyError if it could not. Returns rank 0's key."""
    key, problem = None, None
    if get_rank() == 0:
        try:
            key, _ = _lock_local(folder)
        except IndexBusyError as exc:
            problem = str(exc)
    problem = all_gather_objects(problem)[0]
    if problem is not None:
        raise IndexBusyError(problem)
    return key


@contextmanager
def write_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s write lock for the ``with`` block (re-entrant; see the module doc)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = _lock_ranks(folder)
    try:
        yield
    finally:
        if key is not None:
            _unlock_local(key)
