"""The embedding precision an index records, and which precisions may add features to it.

An index holds features of one family: ``float`` (the model's fp32 weights, run in fp32 or under bf16
autocast: the same model, whose features are comparable) or ``int8`` (a dynamically quantized copy, whose
features have moved a little: mixed with float ones, near-ties would rank by precision instead of by
content). The family is recorded in the manifest's meta at build time (``precision``; indexes written
before it existed hold float features). An update of another family is refused, and queries embed with the
recorded one, so that a query and the images it is compared with come from the same model.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError, SimlaError
from ..models.quantize import INT8
from .build import PRECISIONS

__all__ = ["FLOAT", "INT8", "PrecisionMismatchError", "precision_family", "update_precision"]

#: The family of fp32 and bf16-autocast features (and of indexes that record no precision).
FLOAT = "float"

_FAMILY_TEXT = {FLOAT: "float features (fp32 or bf16)", INT8: "int8 features (a dynamically quantized model)"}
_FAMILY_FLAGS = {FLOAT: "--precision fp32, bf16 or auto", INT8: "--precision int8 or auto"}


class PrecisionMismatchError(SimlaError, ValueError):
    """An update was asked in another precision family than the one the index's features were made in."""


def precision_family(precision: str | None) -> str:
    """"int8" for int8, "float" for fp32, bf16, auto and None (an index that records no precision)."""
    return INT8 if precision == INT8 else FLOAT


def update_precision(path: Path, recorded: str | None, asked: str) -> str:
    """The precision an update of the index at ``path`` (built in family ``recorded``) runs with when
    ``asked`` is requested: "auto" follows the index; another family raises PrecisionMismatchError."""
    if asked not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {asked!r}")
    family = precision_family(recorded)
    if asked == "auto":
        return INT8 if family == INT8 else "auto"
    if precision_family(asked) != family:
        raise PrecisionMismatchError(
            f"{path} was built with {_FAMILY_TEXT[family]}; precision {asked} would add "
            f"{_FAMILY_TEXT[precision_family(asked)]}, and the two must not be mixed in one index. Update it with "
            f"{_FAMILY_FLAGS[family]}, or build a new index with --precision {asked}")
    return asked
