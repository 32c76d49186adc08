"""A model's fingerprint: the hash of its config and of every weight, so an index is only ever queried
with the model that embedded it (features of another model live in another space, and their cosines
would rank at random without any error)."""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from ..errors import SimlaError
from ..models.quantize import is_int8

__all__ = ["ModelMismatchError", "model_fingerprint"]


class ModelMismatchError(SimlaError, ValueError):
    """The model given for a query or an update is not the one the index was built with."""


def model_fingerprint(model: nn.Module) -> str:
    """sha256 (hex) of the config (as canonical JSON) and of each tensor's name, dtype, shape and bytes.

    Of a float model only: an int8 copy's weights are packed and rounded (an int8 index records the float
    model's fingerprint and its precision, and quantizes the float model itself).
    """
    if is_int8(model):
        raise ModelMismatchError("an int8 model has no fingerprint of its own: fingerprint (and give the index) "
                                 "the float model it was quantized from")
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode("utf-8"))
        # Bytes through uint8, so bf16 (which numpy cannot represent) hashes like every other dtype.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
