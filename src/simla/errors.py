"""Errors a user can fix: bad paths, recipes, data files and checkpoints, hub names that cannot be reached.

Each subclasses the built-in type that plain Python callers would expect (ValueError for a bad recipe,
OSError for an unreachable hub), and `SimlaError`, which the `simla` command reports as one line
(`simla: error: ...`, exit status 2) instead of a traceback. Anything else that escapes is a bug and keeps
its traceback.
"""

from __future__ import annotations

import errno


class SimlaError(Exception):
    """An error in what the user asked for, with a message that says what to change."""


class ConfigError(SimlaError, ValueError):
    """A recipe or model config is malformed or invalid (unknown key, wrong type, value out of range)."""


class DataError(SimlaError, ValueError):
    """An annotation file, shard or evaluation file is malformed or unusable."""


class InvalidTextError(SimlaError, ValueError):
    """A text to tokenize (a caption, a query) is not valid Unicode: it holds a lone surrogate."""


class UnusableDataError(SimlaError, RuntimeError):
    """Too many samples are bad to go on (most often a wrong image_root); raised at run time, not at parsing."""


class CheckpointError(SimlaError, RuntimeError):
    """A checkpoint or weight file cannot be used: not a checkpoint, truncated, untrusted, or mismatched."""


class NonFiniteError(SimlaError, FloatingPointError):
    """Training diverged (NaN/inf weights or losses); the run stops and its last checkpoint stays good."""


class DiskFullError(SimlaError, OSError):
    """A file could not be written because its disk is full; the previous version of the file is unchanged."""

    def __init__(self, message: object, *more: object) -> None:
        # One argument when raised; (errno, message) again when unpickled (OSError pickles its args).
        super().__init__(*((message, *more) if more else (errno.ENOSPC, message)))


class HubError(SimlaError, OSError):
    """A hub name or URL could not be resolved (offline, not cached, or no such repository)."""


class MissingExtraError(SimlaError, ImportError):
    """An optional dependency is needed for what was asked; the message gives the pip command."""


#: Built-in errors that, raised at the command line, mean the user named something that is not there.
USER_OS_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
