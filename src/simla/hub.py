"""Resolve pretrained sources (local files/directories or Hugging Face hub names) and read weight files.

The network is touched only when a source is not on local disk, and then with a clear error when it
cannot be reached, so offline users learn at once that a local path works instead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

from .errors import CheckpointError, HubError


logger = logging.getLogger(__name__)

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def resolve_hf_directory(name_or_path: str | os.PathLike) -> Path:
    """A local directory holding a Hugging Face model: the path itself, or a hub snapshot download."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; expected a Hugging Face model directory or hub name")
    name = str(name_or_path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"no such directory: {name}")
    try:
        from huggingface_hub import snapshot_download

        allow = ["config.json", "*.safetensors", "pytorch_model.bin", "vocab.txt", "tokenizer*.json", "special_tokens_map.json"]
        return Path(snapshot_download(repo_id=name, allow_patterns=allow))
    except Exception as err:  # the hub client raises many types for "offline" / "not found"
        raise HubError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
            "If you are offline, pass a local directory that holds config.json and the weights."
        ) from err


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err


def load_weight_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors file or a torch file with `weights_only=True` (never arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weight file: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def find_hf_weights(directory: Path) -> Path:
    for name in _HF_WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} holds none of {list(_HF_WEIGHT_FILES)}")


# Hugging Face BertConfig field -> our TextConfig field.
_HF_TEXT_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "pad_token_id": "pad_token_id",
}


def text_overrides_from_hf_config(directory: Path) -> dict[str, Any]:
    """TextConfig overrides that make the shared encoder match a Hugging Face BERT config.json."""
    config_path = directory / "config.json"
    hf = read_json(config_path)
    if hf.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{config_path}: model_type {hf.get('model_type')!r} is not a BERT model")
    if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(f"{config_path}: only exact-GELU BERTs with absolute positions are supported")
    out = {ours: hf[theirs] for theirs, ours in _HF_TEXT_FIELDS.items() if theirs in hf}
    for key in ("layer_norm_eps", "hidden_dropout", "attention_dropout"):
        if key in out:
            out[key] = float(out[key])
    return out
