"""Reading checkpoint files safely: ours, safetensors export directories and reference `.pth` files.

A file is checked before anything is unpickled: a damaged zip or pickle stream is reported as corrupt (never
fed to the unpickler), a file that is no checkpoint says so, and a file that needs arbitrary unpickling
(the reference pickles its config) is refused unless the caller trusts it.
"""

from __future__ import annotations

import logging
import os
import pickle
import pickletools
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .errors import CheckpointError
from .hub import read_json


FORMAT = "simla"

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- reading files
class CorruptCheckpointError(CheckpointError):
    """The file is a checkpoint that was cut short or damaged (an interrupted download, copy or write)."""


class NotACheckpointError(CheckpointError):
    """The file is not a PyTorch checkpoint at all (e.g. a text file, a safetensors file, another zip)."""


class UntrustedCheckpointError(CheckpointError):
    """The file is intact but needs arbitrary unpickling, which the caller has not allowed."""


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_2_PLUS = b"\x80"  # every pickle protocol >= 2 starts with the PROTO opcode
# What torch.load raises on damaged bytes (miniz reader errors, pickle streams that end early or make no
# sense). Permission errors are not among them: they surface, unchanged, when the file is first opened.
_LOAD_ERRORS = (RuntimeError, EOFError, ValueError, KeyError, IndexError, TypeError, pickle.UnpicklingError,
                struct.error, zipfile.BadZipFile, zlib.error)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _corrupt(path: Path, what: str, err: BaseException | None = None) -> CorruptCheckpointError:
    cause = f" ({_first_line(err)})" if err is not None else ""
    return CorruptCheckpointError(f"{path} is truncated or corrupt: {what}{cause}. It was probably cut short by an "
                                  "interrupted download, copy or write; fetch or copy it again.")


def _checkpoint_format(path: Path) -> str:
    """'zip' (torch >= 1.6) or 'legacy' (an older torch.save pickle stream), judged from the first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if not head:
        raise _corrupt(path, "the file is empty (0 bytes)")
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_PICKLE_PROTOCOL_2_PLUS):
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then a JSON header
        raise NotACheckpointError(f"{path} is a safetensors file, not a torch checkpoint: pass the directory that "
                                  "holds it as model.safetensors together with its config.json")
    raise NotACheckpointError(f"{path} is not a PyTorch checkpoint (it starts with {head[:8]!r}, neither a zip "
                              "archive nor a pickle)")


def _data_member(path: Path, archive: zipfile.ZipFile) -> zipfile.ZipInfo:
    members = [m for m in archive.infolist() if m.filename == "data.pkl" or m.filename.endswith("/data.pkl")]
    if not members:
        raise NotACheckpointError(f"{path} is a zip archive but not a PyTorch checkpoint (it has no data.pkl)")
    return members[0]


def _check_zip(path: Path, everything: bool) -> None:
    """Check the archive's structure and the CRC of its pickle (of every member when `everything`).

    Nothing is unpickled here. The full check reads the whole file; it runs only before full unpickling,
    so that a damaged file never gets that far.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist() if everything else [_data_member(path, archive)]
            for member in members:
                with archive.open(member) as stream:
                    while stream.read(1 << 24):  # reading to the end verifies the member's CRC-32
                        pass
    except zipfile.BadZipFile as err:
        raise _corrupt(path, "the zip archive is incomplete or damaged", err) from err
    except (EOFError, zlib.error, OSError) as err:
        raise _corrupt(path, "a zip member cannot be read back", err) from err


def _check_legacy(path: Path) -> None:
    """Walk the pickles of an old-format file (magic, protocol, sys info, object, storage keys) without
    executing them: a stream that ends early is caught here, before any unpickling."""
    with open(path, "rb") as handle:
        for part in ("magic number", "protocol version", "system info", "checkpoint object", "storage keys"):
            start = handle.tell()
            try:
                for _ in pickletools.genops(handle):
                    pass
            except (ValueError, EOFError) as err:
                raise _corrupt(path, f"its {part} pickle ends early", err) from err
            if part == "magic number":
                handle.seek(start)
                if _plain_unpickle(handle) != torch.serialization.MAGIC_NUMBER:
                    raise NotACheckpointError(f"{path} is a pickle file but not a PyTorch checkpoint")


class _NoGlobalsUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to import {module}.{name}")


def _plain_unpickle(handle: Any) -> Any:
    """Unpickle plain data only (numbers, strings, containers); anything that needs an import is refused."""
    try:
        return _NoGlobalsUnpickler(handle).load()
    except (pickle.UnpicklingError, EOFError, ValueError):
        return None


# torch's weights-only unpickler names the global it refused ("Unsupported global: GLOBAL argparse.Namespace
# ...", or "Trying to load unsupported GLOBAL posix.system whose module posix is blocked." for modules it
# never allows); the file itself was read correctly, so it needs trust rather than a new copy.
_REFUSED_GLOBAL_MARKERS = ("unsupported global",)


def _refused_global(err: pickle.UnpicklingError) -> str:
    """The line of a weights-only refusal that names the refused global, or '' when the error is another."""
    for line in str(err).splitlines():
        if any(marker in line.lower() for marker in _REFUSED_GLOBAL_MARKERS):
            return line.strip().removeprefix("WeightsUnpickler error: ")
    return ""


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load with the failure told apart: damaged, not a checkpoint, or needing trust.

    weights_only=True is always tried first. Only an intact file (CRC-checked archive, complete pickle
    streams) whose sole problem is a refused global is unpickled fully, and only with `trust_pickle`.
    """
    kind = _checkpoint_format(path)
    if kind == "zip":
        _check_zip(path, everything=False)
    else:
        _check_legacy(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = _refused_global(err)
        if not detail:
            raise _corrupt(path, "its pickle cannot be read", err) from err
        refused = err
    except _LOAD_ERRORS as err:
        raise _corrupt(path, "torch.load failed", err) from err
    if not trust_pickle:
        raise UntrustedCheckpointError(
            f"{path} is intact but needs trust (--trust-pickle): it cannot be read with weights_only=True ({detail}). "
            "Reference checkpoints pickle their training config, which requires arbitrary code execution to "
            "unpickle. If you trust the file's source, pass trust_pickle=True (CLI: --trust-pickle).") from refused
    if kind == "zip":
        _check_zip(path, everything=True)
    logger.warning("loading %s with full unpickling (trust_pickle=True)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as err:
        raise CheckpointError(f"{path} pickles objects of a module that is not installed or has changed "
                              f"({_first_line(err)}); install it (reference checkpoints need omegaconf)") from err
    except _LOAD_ERRORS as err:
        raise _corrupt(path, "full unpickling failed", err) from err


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False) -> dict[str, Any]:
    """The raw contents of any supported checkpoint form, as {"model": state_dict, ...}."""
    path = Path(path)
    if path.is_dir():
        weights, config = path / "model.safetensors", path / "config.json"
        if not weights.is_file() or not config.is_file():
            raise FileNotFoundError(f"{path} must hold model.safetensors and config.json")
        meta = read_json(config)
        return {"format": FORMAT, "model": load_file(str(weights)), "config": meta.get("config", meta),
                "task": meta.get("task", "pretrain")}
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    data = _torch_load(path, trust_pickle)
    if not isinstance(data, dict):
        raise NotACheckpointError(f"{path} holds a {type(data).__name__}, not a checkpoint (a dict with a 'model' "
                                  "state dict, or a state dict itself)")
    if "model" not in data:
        if data and all(isinstance(v, Tensor) for v in data.values()):
            data = {"model": data}  # a bare state dict
        else:
            raise NotACheckpointError(f"{path} is a dict without a 'model' entry and is not a state dict either; "
                                      f"its keys are {sorted(map(str, data))[:10]}")
    if not isinstance(data["model"], dict) or not all(isinstance(v, Tensor) for v in data["model"].values()):
        raise NotACheckpointError(f"{path}: its 'model' entry is not a state dict (name -> tensor)")
    return data
