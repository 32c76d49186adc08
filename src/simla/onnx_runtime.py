"""ONNX export of a SimlaModel's two encoders and its ITM scorer, and `OnnxModel`, which runs them with ONNX
Runtime on the CPU.

`export_onnx(model, folder)` writes three graphs and a description:

    image_encoder.onnx   pixels (B, 3, R, R) float32, normalised as for the model -> features (B, D), L2-normalised
    text_encoder.onnx    input_ids (B, L) int64, attention_mask (B, L) int64      -> features (B, D), L2-normalised
    itm.onnx             pixels, input_ids, attention_mask                         -> probability (B,) that image b
                         matches text b (the ITM head's softmax, as `SimlaModel.itm_score`)
    simla_onnx.json      model name, config, image size, max text length, tokenizer, the torch model's
                         fingerprint, precision, simla version

B and L are dynamic (L up to `text.max_position_embeddings`). With `int8=True` every graph's MatMul/Gemm
weights are quantised to int8 by ONNX Runtime's dynamic quantisation (activations quantised per batch at run
time), like torch's `quantize_dynamic` of the Linear layers.

onnx, onnxscript (torch's exporter) and onnxruntime are an optional extra: pip install "simla[onnx]".
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .atomic_write import write_atomically
from .config import SimlaConfig
from .data.images import load_image
from .data.transforms import EvalView
from .errors import CheckpointError, MissingExtraError
from .models.simla import SimlaModel
from .search.fingerprint import model_fingerprint
from .tokenizers import get_tokenizer
from .version import __version__

__all__ = ["DESCRIPTION_FILE", "GRAPHS", "OnnxModel", "export_onnx"]

#: The export's description, written last: a folder without it is not (or not yet) an export.
DESCRIPTION_FILE = "simla_onnx.json"
#: Role -> file name of the three graphs.
GRAPHS = {"image": "image_encoder.onnx", "text": "text_encoder.onnx", "itm": "itm.onnx"}
FORMAT_VERSION = 1
_INSTALL_HINT = 'pip install "simla[onnx]"'


def _require(module: str, purpose: str) -> Any:
    """Import an optional package of the onnx extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(f"{purpose} needs the optional {module.split('.')[0]} package: {_INSTALL_HINT}") from err


# ------------------------------------------------------------------------------------------ export
class _ImageEncoder(nn.Module):
    def __init__(self, model: SimlaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


class _TextEncoder(nn.Module):
    def __init__(self, model: SimlaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model.text_features(self.model.text_encoder(input_ids, attention_mask, mode="text"))


class _ItmScorer(nn.Module):
    def __init__(self, model: SimlaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        logits = self.model.itm_logits(self.model.visual_encoder(pixels), input_ids, attention_mask)
        return logits.softmax(-1)[:, 1]


def _example_inputs(config: SimlaConfig) -> dict[str, Tensor]:
    """Inputs to trace with: batch 2, length 6 (neither 0 nor 1, which torch.export would specialise),
    one caption padded."""
    size = config.vision.image_size
    ids = torch.tensor([[101, 1037, 3899, 2006, 1996, 102], [101, 1037, 4937, 102, 0, 0]])
    ids = ids.clamp(max=config.text.vocab_size - 1)
    return {"pixels": torch.randn(2, 3, size, size), "input_ids": ids, "attention_mask": (ids != 0).long()}


def _export_graph(module: nn.Module, inputs: dict[str, Tensor], output: str, path: Path, max_length: int) -> None:
    """Trace `module` with dynamic batch (and caption length) axes and save the graph, weights inside, at `path`."""
    _require("onnxscript", "exporting to ONNX")  # torch's exporter needs it: fail with the install hint first
    batch = torch.export.Dim("batch", min=1, max=65536)
    length = torch.export.Dim("length", min=1, max=max_length)
    shapes = {name: ({0: batch} if name == "pixels" else {0: batch, 1: length}) for name in inputs}
    with warnings.catch_warnings():
        # Inputs that share the batch (or length) axis make the exporter say it names the axis once.
        warnings.filterwarnings("ignore", message=r"# The axis name: \w+ will not be used")
        program = torch.onnx.export(module, tuple(inputs.values()), dynamo=True, input_names=list(inputs),
                                    output_names=[output], dynamic_shapes=shapes, verbose=False)
    write_atomically(path, lambda tmp: program.save(str(tmp), external_data=False))


def _quantize(source: Path, target: Path) -> None:
    quantization = _require("onnxruntime.quantization", "int8 ONNX export")
    root = logging.getLogger()
    root.addFilter(_no_preprocessing_advice)
    try:
        quantization.quantize_dynamic(str(source), str(target), weight_type=quantization.QuantType.QInt8)
    finally:
        root.removeFilter(_no_preprocessing_advice)


def _no_preprocessing_advice(record: logging.LogRecord) -> bool:
    """Drop ONNX Runtime's advice (on the root logger, for every call) to pre-process a model for static
    quantisation: dynamic quantisation of an exported graph does not need it."""
    return not str(record.msg).startswith("Please consider to run pre-processing")


def export_onnx(model: SimlaModel, folder: str | Path, *, int8: bool = False) -> Path:
    """Write image_encoder.onnx, text_encoder.onnx, itm.onnx and simla_onnx.json for `model` into `folder`.

    The model is exported as it is, on the CPU in eval mode (a model elsewhere is copied there; the caller's
    model is left as it was). `int8`: quantise the graphs' matrix weights with ONNX Runtime's dynamic
    quantisation. Returns the folder.
    """
    if not isinstance(model, SimlaModel):
        raise TypeError(f"export_onnx needs a SimlaModel (encoders + ITM head), got {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DESCRIPTION_FILE).unlink(missing_ok=True)
    was_training = model.training
    cpu_model = model if model.device.type == "cpu" else _cpu_copy(model)
    cpu_model.eval()
    config = cpu_model.config
    inputs = _example_inputs(config)
    max_length = config.text.max_position_embeddings
    graphs = {"image": (_ImageEncoder(cpu_model).eval(), {"pixels": inputs["pixels"]}, "features"),
              "text": (_TextEncoder(cpu_model).eval(), {k: inputs[k] for k in ("input_ids", "attention_mask")},
                       "features"),
              "itm": (_ItmScorer(cpu_model).eval(), inputs, "probability")}
    try:
        with torch.no_grad(), tempfile.TemporaryDirectory(dir=folder) as scratch:
            for role, (module, example, output) in graphs.items():
                target = folder / GRAPHS[role]
                if int8:
                    fp32 = Path(scratch) / GRAPHS[role]
                    _export_graph(module, example, output, fp32, max_length)
                    write_atomically(target, lambda tmp, fp32=fp32: _quantize(fp32, tmp))
                else:
                    _export_graph(module, example, output, target, max_length)
    finally:
        model.train(was_training)
    description = {
        "format": "simla-onnx", "version": FORMAT_VERSION, "simla_version": __version__,
        "model": config.name, "config": config.to_dict(), "image_size": config.vision.image_size,
        "max_text_length": config.objectives.max_text_length, "tokenizer": config.text.tokenizer,
        "pad_token_id": config.text.pad_token_id, "fingerprint": model_fingerprint(cpu_model),
        "precision": "int8" if int8 else "fp32", "graphs": dict(GRAPHS),
        "itm_inputs": ["pixels", "input_ids", "attention_mask"],
    }
    text = json.dumps(description, indent=2) + "\n"
    write_atomically(folder / DESCRIPTION_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return folder


def _cpu_copy(model: SimlaModel) -> SimlaModel:
    copy = type(model)(model.config)
    copy.load_state_dict({k: v.detach().to("cpu") for k, v in model.state_dict().items()})
    copy.tokenizer = model._tokenizer
    return copy


# ------------------------------------------------------------------------------------------ runtime
class OnnxModel:
    """An exported SIMLA model run by ONNX Runtime (CPU): `encode_image`, `encode_text` and `itm_score` with
    the meaning of SimlaModel's, on CPU tensors. Each graph is loaded on its first use."""

    def __init__(self, folder: Path, description: dict[str, Any], threads: int | None = None) -> None:
        self.folder = folder
        self.description = description
        self.config = SimlaConfig.from_dict(description["config"])
        self.threads = threads
        self._sessions: dict[str, Any] = {}
        self._tokenizer = None

    @classmethod
    def load(cls, folder: str | Path, threads: int | None = None) -> "OnnxModel":
        """Open an export written by `export_onnx`; `threads`: ONNX Runtime's intra-op threads (None: its default)."""
        folder = Path(folder)
        path = folder / DESCRIPTION_FILE
        if not path.is_file():
            raise CheckpointError(f"{folder} is not a simla ONNX export: it has no {DESCRIPTION_FILE} "
                                  "(write one with `simla export onnx`)")
        description = json.loads(path.read_text(encoding="utf-8"))
        if description.get("format") != "simla-onnx" or description.get("version") != FORMAT_VERSION:
            raise CheckpointError(f"{path} is not a simla ONNX export of version {FORMAT_VERSION}")
        missing = [name for name in description["graphs"].values() if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"the ONNX export {folder} lacks {', '.join(missing)}")
        _require("onnxruntime", "running an ONNX export")
        return cls(folder, description, threads)

    @property
    def precision(self) -> str:
        return self.description["precision"]

    def _session(self, role: str) -> Any:
        if role not in self._sessions:
            ort = _require("onnxruntime", "running an ONNX export")
            options = ort.SessionOptions()
            if self.threads is not None:
                options.intra_op_num_threads = self.threads
                options.inter_op_num_threads = 1
            path = self.folder / self.description["graphs"][role]
            self._sessions[role] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return self._sessions[role]

    def _run(self, role: str, **inputs: np.ndarray) -> Tensor:
        return torch.from_numpy(self._session(role).run(None, inputs)[0])

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            name = self.description["tokenizer"]
            if name is None:
                raise RuntimeError("this export has no text tokenizer; pass (input_ids, attention_mask)")
            self._tokenizer = get_tokenizer(name)
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str] | Tensor | tuple[Tensor, Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) as int64 arrays from strings, an id tensor or (ids, mask)."""
        if isinstance(texts, str) or (isinstance(texts, Sequence) and not isinstance(texts, tuple)
                                      and texts and isinstance(texts[0], str)):
            out = self.tokenizer(texts, max_length=self.description["max_text_length"])
            ids, mask = out.input_ids, out.attention_mask
        elif isinstance(texts, Tensor):
            ids, mask = texts, (texts != self.description["pad_token_id"]).long()
        elif isinstance(texts, tuple) and len(texts) == 2:
            ids, mask = texts
        else:
            raise TypeError(f"texts must be strings, an id tensor or (ids, mask); got {type(texts).__name__}")
        if ids.dim() == 1:
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        return _int64(ids), _int64(mask)

    def prepare_pixels(self, images) -> Tensor:
        """(B, 3, R, R) normalised pixels from PIL images or image paths (one or a list), resized to the
        export's resolution as in evaluation (bicubic, no crop), as `SimlaModel.prepare_pixels`."""
        if isinstance(images, Tensor):
            return images
        view = EvalView(self.description["image_size"])
        single = isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "convert")
        items = [images] if single else list(images)
        return torch.stack([view(item.convert("RGB") if hasattr(item, "convert") else load_image(item))
                            for item in items])

    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, 3, R, R) normalised pixels -> (B, embed_dim) L2-normalised ITC features."""
        return self._run("image", pixels=self._check_pixels(pixels))

    def _check_pixels(self, pixels: Tensor) -> np.ndarray:
        size = self.description["image_size"]
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"expected pixels of shape (B, 3, {size}, {size}) (see prepare_pixels), "
                             f"got {tuple(pixels.shape)}")
        return _float32(pixels)

    def encode_text(self, texts: str | Sequence[str] | Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """Captions (strings, an id tensor or (ids, mask)) -> (B, embed_dim) L2-normalised ITC features."""
        ids, mask = self.tokenize(texts)
        return self._run("text", input_ids=ids, attention_mask=mask)

    def itm_score(self, pixels: Tensor, texts: str | Sequence[str] | Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """Probability that image b matches text b, for each pair b: shape (B,)."""
        ids, mask = self.tokenize(texts)
        if pixels.shape[0] != ids.shape[0]:
            raise ValueError(f"itm_score pairs images with texts one to one: got {pixels.shape[0]} images, "
                             f"{ids.shape[0]} texts")
        return self._run("itm", pixels=self._check_pixels(pixels), input_ids=ids, attention_mask=mask)

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.folder)!r}, model={self.config.name!r}, precision={self.precision!r})"


def _float32(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


def _int64(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.int64).contiguous().numpy()
