"""Writing a file atomically: into `NAME.tmp` beside it, then renamed over it.

A crash or a full disk never leaves a half-written file under the real name: the previous version survives.
On any failure the temporary file is removed (a half-written checkpoint can be gigabytes, and left behind it
would keep the disk full), and a failure caused by a full disk is reported as one: torch.save, for one, says
only "unexpected pos" when its write fails, so the disk's free space is checked too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from .errors import DiskFullError

__all__ = ["write_atomically"]

# Below this many free bytes a failed write is put down to the full disk (a write fails at the last block).
_NEARLY_FULL = 1 << 20


def write_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to write the file, then rename it to `path`; returns `path`.

    Raises:
        DiskFullError: (an OSError with errno ENOSPC) the disk filled up; `path` is unchanged.
        Anything else `write` raises, unchanged, after the temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        full = _disk_full(err, path.parent)  # judged before removing tmp frees the space it took
        with contextlib.suppress(OSError):
            tmp.unlink()
        if full is not None:
            raise DiskFullError(f"No space left on device while writing {path} ({full}); {path} was left as it "
                                f"was and the partial {tmp.name} removed. Free some space (or write elsewhere) "
                                "and run again.") from err
        raise
    return path


def _disk_full(err: BaseException, folder: Path) -> str | None:
    """How the failure shows a full disk (ENOSPC in the exception chain, or no free space left), else None."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{type(cause).__name__}: {cause.strerror or cause}"
        cause = cause.__cause__ or cause.__context__
    if not isinstance(err, Exception):
        return None  # KeyboardInterrupt and friends are never the disk's doing
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return f"{free} bytes free in {folder} when the write failed" if free < _NEARLY_FULL else None
