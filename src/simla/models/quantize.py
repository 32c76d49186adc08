"""Dynamic int8 quantization of a model's inference path, for embedding and scoring on CPUs.

`quantize_int8(model)` returns an inference-only copy whose linear layers in the ViT, the shared encoder,
the ITC projections and the ITM head run as dynamically quantized int8 layers: weights stored as int8
(per-tensor scale), activations quantized per batch at run time, products in int8 with int32
accumulation. Those layers hold nearly all of the model's arithmetic, so on a CPU the copy embeds and
scores faster (see ``benchmarks/embedding_precision.py``); features move slightly (cosine to the float
features > 0.98 on the tiny test model), so features of an int8 copy and of the float model must not be
mixed in one index or one comparison.

What stays float: embeddings, LayerNorms, the patch convolution, attention products, and every module
outside the inference path (momentum teachers, pretraining and task heads), which inference never runs.

Dynamic quantization has CPU kernels only: a model on a GPU is refused. It uses torch's eager-mode
quantization (`torch.ao.quantization.quantize_dynamic`), which torch marks deprecated in favour of the
separate torchao package; simla does not depend on torchao, so the deprecation warnings of that one call
are silenced here (only those).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear
from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

from ..errors import SimlaError

__all__ = ["INT8", "Int8DeviceError", "inference_precision", "int8_device", "is_int8", "quantize_int8"]

#: The value of `model.inference_precision` on a quantized copy (a float model has no such attribute).
INT8 = "int8"

#: The submodules inference runs, in the order of a forward pass; those a model lacks are skipped.
INFERENCE_MODULES = ("visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head")

#: The warnings torch emits for eager-mode quantization (message prefixes), silenced around the call.
_DEPRECATION_MESSAGES = (r"torch\.ao\.quantization is deprecated", r"torch\.quantize_per_tensor, ")


class Int8DeviceError(SimlaError, ValueError):
    """int8 was asked for on a GPU: dynamic quantization runs on the CPU only."""


def inference_precision(model: nn.Module) -> str:
    """"int8" for a copy made by :func:`quantize_int8`, "float" for any other model (fp32 weights, which
    bf16 autocast also uses: its features are comparable with fp32 ones)."""
    return getattr(model, "inference_precision", "float")


def is_int8(model: nn.Module) -> bool:
    """Whether ``model`` is an int8 copy made by :func:`quantize_int8`."""
    return inference_precision(model) == INT8


def int8_device(device: str | torch.device) -> str:
    """The device int8 work runs on for a requested ``device``: "auto" and CPUs give "cpu"; a GPU raises
    :class:`Int8DeviceError` (for commands: one line saying what to change)."""
    if str(device) == "auto" or torch.device(device).type == "cpu":
        return "cpu"
    kind = torch.device(device).type
    raise Int8DeviceError(f"precision int8 runs on the CPU only (dynamic quantization has no {kind} kernels), not "
                          f"on device {device}; use device cpu, or precision fp32/bf16 on the GPU")


def quantize_int8(model: nn.Module) -> nn.Module:
    """An int8 inference copy of ``model`` (a SIMLA model on the CPU); ``model`` itself is left untouched.

    The copy is in eval mode with gradients off, its inference linear layers (:data:`INFERENCE_MODULES`)
    dynamically quantized to int8, and it is marked ``copy.inference_precision == "int8"``. Its
    ``encode_image``, ``encode_text``, ``itm_score`` and ``similarity`` work as the float model's; it cannot
    be trained or fingerprinted (its weights are packed int8; an index records the float model's fingerprint
    and the precision). A model that is already an int8 copy is returned as it is.

    torch marks eager-mode quantization (used here) deprecated in favour of torchao, which simla does not
    depend on; its deprecation warnings are silenced for this call only.
    """
    if is_int8(model):
        return model
    present = [name for name in INFERENCE_MODULES if isinstance(getattr(model, name, None), nn.Module)]
    if not {"visual_encoder", "text_encoder"} <= set(present):
        raise TypeError(f"quantize_int8 takes a SIMLA model (with visual_encoder and text_encoder), "
                        f"got {type(model).__name__}")
    devices = {t.device.type for t in (*model.parameters(), *model.buffers())}
    if devices - {"cpu"}:
        raise Int8DeviceError(f"quantize_int8 needs a model on the CPU (dynamic int8 quantization has CPU kernels "
                              f"only); this one is on {', '.join(sorted(devices))}: call model.cpu() first")
    quantized = copy.deepcopy(model)
    quantized.eval()
    quantized.requires_grad_(False)
    with warnings.catch_warnings():
        for message in _DEPRECATION_MESSAGES:
            warnings.filterwarnings("ignore", message=message)
        quantize_dynamic(quantized, {name: default_dynamic_qconfig for name in present}, dtype=torch.qint8,
                         mapping={nn.Linear: DynamicQuantizedLinear}, inplace=True)
    quantized.inference_precision = INT8
    return quantized
