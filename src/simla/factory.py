"""`create_model`: build a SIMLA model from a preset name, with validated overrides and initial weights.

Layering: this module sits above `simla.checkpoint` (it loads `pretrained=` weights through it); the
model classes are found by task name in `simla.models.registry`, below both.
"""

from __future__ import annotations

import logging
from typing import Any

from .checkpoint import load_weights_into
from .config import apply_overrides, config_for_task, get_config
from .hub import find_hf_weights, load_weight_file, resolve_hf_directory, text_overrides_from_hf_config
from .models.bert import load_hf_bert_state
from .models.registry import build_model
from .models.simla import SimlaBackbone
from .models.vision import load_vision_weights

logger = logging.getLogger(__name__)

__all__ = ["build_model", "create_model"]


def create_model(
    name: str,
    *,
    pretrained: str | None = None,
    text_encoder: str | None = None,
    vision_encoder: str | None = None,
    task: str = "pretrain",
    trust_pickle: bool = False,
    **overrides: Any,
) -> SimlaBackbone:
    """Build the preset `name` (see `list_models()`).

    pretrained: one of our checkpoints (`.pt`), an exported directory (safetensors + config.json) or a
        reference SIMLA/ALBEF `.pth`; its weights replace the random/initial ones (strictly).
    text_encoder: a Hugging Face BERT checkpoint (local directory or hub name) that initialises the shared
        encoder; the text width and depth follow the checkpoint, cross-attention keys/values keep the image
        width. Its vocabulary also becomes the text tokenizer.
    vision_encoder: DeiT/timm weights for the ViT (local file, timm model name or URL).
    overrides: config fields, e.g. `queue_size=1024`, `vision={"depth": 4}` or `**{"text.num_layers": 6}`.
    """
    config = apply_overrides(get_config(name), overrides)
    if text_encoder is not None:
        directory = resolve_hf_directory(text_encoder)
        apply_overrides(config, {f"text.{k}": v for k, v in text_overrides_from_hf_config(directory).items()})
        config.text.init = str(text_encoder)
        if (directory / "vocab.txt").is_file() or (directory / "tokenizer.json").is_file():
            config.text.tokenizer = str(directory)
    if vision_encoder is not None:
        config.vision.init = vision_encoder
    # A downstream model has no mask token, so the MIM pass's limits do not bind it (the paper model is
    # valid at 384 px for every task but pretraining): validate the config as the task's model uses it.
    config_for_task(config, task).validate()
    model = build_model(config, task)
    _initialise(model)
    # Teachers copy the online weights AFTER the initial weights are loaded.
    model.copy_params_to_momentum()
    if pretrained is not None:
        # Momentum weights come from the file when it has them, else are copied from the loaded weights.
        load_weights_into(model, pretrained, trust_pickle=trust_pickle)
    return model


def _initialise(model: SimlaBackbone) -> None:
    """Load the DeiT and BERT initial weights named in the config (network only if they are hub names)."""
    config = model.config
    if config.vision.init:
        report = load_vision_weights(model.visual_encoder, config.vision.init)
        logger.info("vision encoder initialised from %s: %s", config.vision.init, report)
    if config.text.init:
        directory = resolve_hf_directory(config.text.init)
        state = load_weight_file(find_hf_weights(directory))
        mlm_head = getattr(model, "mlm_head", None)
        load_hf_bert_state(model.text_encoder, mlm_head, state, source=str(config.text.init))
