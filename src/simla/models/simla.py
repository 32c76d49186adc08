"""The two encoders every SIMLA model shares, and SimlaModel: + ITC projections, ITM head and the user API.

`SimlaBackbone` is the ViT and the shared encoder with the config, the text tokenizer and the momentum
plumbing; task models that need no ITC/ITM heads (VQA) build on it directly. `SimlaModel` adds what
inference needs to embed, search and score; pretraining and retrieval extend it with their heads,
momentum teachers and queues.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import SimlaConfig, config_for_task
from ..data.images import load_image
from ..data.transforms import EvalView
from ..tokenizers.text import get_tokenizer
from .bert import SharedEncoder
from .momentum import MomentumTeachers
from .vision import VisionEncoder


TextInput = str | Sequence[str] | Tensor | Mapping[str, Tensor] | tuple[Tensor, Tensor]


class SimlaBackbone(MomentumTeachers, nn.Module):
    """The ViT image encoder and the ONE shared text/multimodal encoder, with the config and tokenizer.

    The model keeps its own copy of the config, as its task uses it (`config_for_task`): the caller's
    config is never changed. Momentum teachers are declared in `MOMENTUM_MODULES` (see `MomentumTeachers`);
    the backbone has none.
    """

    TASK = "backbone"  # the name create_model/load_checkpoint use for a class (each task model sets its own)
    # Whether the next training forward applies the EMA update to the teachers. The training engine clears it
    # for every micro-batch but the first of an optimizer step, so that with gradient accumulation the
    # teachers move once per optimizer step (momentum m per step, not m**k). Queues still receive every
    # micro-batch's features.
    update_momentum: bool = True
    # Tensors of other task models that this one deliberately lacks: loading them reports "ignored"
    # (a model may add more per instance: see `ignored_source_prefixes`).
    IGNORED_SOURCE_PREFIXES: tuple[str, ...] = (
        "mlm_head", "mim_head", "concept_head", "mim_adapter", "visual_encoder.mask_token",
        "image_queue", "text_queue", "idx_queue", "queue_ptr", "caption_queue",
        "visual_encoder_m", "vision_proj_m", "text_encoder_m", "text_proj_m",
    )

    def __init__(self, config: SimlaConfig, text_layers: int | None = None) -> None:
        """`text_layers`: depth of the shared encoder when a task deepens it (NLVR2); default the config's.

        `config` is copied as this model's task uses it (only pretraining with MIM has the ViT mask token);
        the copy is `self.config`, and `config` itself is left as it was.
        """
        super().__init__()
        config = config_for_task(config, self.TASK)
        config.validate()
        self.config = config
        v, t = config.vision, config.text
        self.visual_encoder = VisionEncoder(
            image_size=v.image_size,
            patch_size=v.patch_size,
            width=v.width,
            depth=v.depth,
            num_heads=v.num_heads,
            mlp_ratio=v.mlp_ratio,
            qkv_bias=v.qkv_bias,
            ln_eps=v.ln_eps,
            drop_path=v.drop_path,
            use_mask_token=v.use_mask_token,
        )
        if v.layer_init_std is not None:
            for module in self.visual_encoder.blocks.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=v.layer_init_std)
        # One set of weights, two roles: text encoder without an image, multimodal encoder with one.
        if text_layers is not None:
            t = dataclasses.replace(t, num_layers=text_layers)
        self.text_encoder = SharedEncoder(t, encoder_width=v.width)
        self.text_encoder.set_uniform_dropout(config.objectives.execution == "simla")
        self._tokenizer = None

    @property
    def device(self) -> torch.device:
        return self.visual_encoder.cls_token.device

    # Heads a task adds that another task's checkpoint cannot hold: missing from such a source, they are
    # reported as new (fresh weights), not as missing.
    NEW_HEAD_PREFIXES: tuple[str, ...] = ()

    def ignored_source_prefixes(self) -> tuple[str, ...]:
        """Key prefixes of source tensors this model lacks by design (loading them reports "ignored"): the
        class's `IGNORED_SOURCE_PREFIXES`, plus what this instance leaves out (a pretraining ablation's heads)."""
        return tuple(self.IGNORED_SOURCE_PREFIXES)

    def prepare_source_state(self, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The source state dict with what this model derives from it before loading (e.g. the VQA decoder
        initialised from the encoder's top layers); a model that derives nothing returns it as it is."""
        return dict(state)

    @property
    def has_unused_parameters(self) -> bool:
        """Whether some trained parameter gets no gradient in a step (DistributedDataParallel must be told)."""
        return False

    # ------------------------------------------------------------------------------------- momentum
    def train(self, mode: bool = True) -> "SimlaBackbone":
        """Training mode; the teachers keep their dropout only when `objectives.momentum_dropout` (the reference)."""
        super().train(mode)
        if mode and not self.config.objectives.momentum_dropout:
            for _, teacher in self.momentum_pairs():
                teacher.eval()
        return self

    # ------------------------------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        """The text tokenizer named by `config.text.tokenizer`, loaded on first use (no network before)."""
        if self._tokenizer is None:
            name = self.config.text.tokenizer
            if name is None:
                raise RuntimeError("this model has no text tokenizer configured; pass token ids or set config.text.tokenizer")
            self._tokenizer = get_tokenizer(name)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    def tokenize(self, texts: TextInput, max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """(input_ids, attention_mask) on the model's device from strings, ids, or a tokenizer output."""
        device = self.device
        if isinstance(texts, str) or (isinstance(texts, Sequence) and texts and isinstance(texts[0], str)):
            out = self.tokenizer(texts, max_length=max_length or self.config.objectives.max_text_length)
            ids, mask = out.input_ids, out.attention_mask
        elif isinstance(texts, Tensor):
            ids = texts
            mask = (texts != self.config.text.pad_token_id).long()
        elif isinstance(texts, Mapping):
            ids, mask = texts["input_ids"], texts["attention_mask"]
        elif isinstance(texts, tuple) and len(texts) == 2:
            ids, mask = texts
        elif hasattr(texts, "input_ids"):
            ids, mask = texts.input_ids, texts.attention_mask
        else:
            raise TypeError(f"texts must be strings, an id tensor or (ids, mask); got {type(texts).__name__}")
        if ids.dim() == 1:
            ids, mask = ids.unsqueeze(0), mask.unsqueeze(0)
        return ids.to(device), mask.to(device)

    def prepare_pixels(self, images) -> Tensor:
        """(B, 3, R, R) normalised pixels on the model's device from pixels, PIL images or image paths.

        Images are resized to the model's resolution as in evaluation (bicubic, no crop).
        """
        if isinstance(images, Tensor):
            return images.to(self.device)
        view = EvalView(self.config.vision.image_size)
        single = isinstance(images, (str, bytes, os.PathLike)) or hasattr(images, "convert")
        items = [images] if single else list(images)
        pixels = [view(item.convert("RGB") if hasattr(item, "convert") else load_image(item)) for item in items]
        return torch.stack(pixels).to(self.device)

    def num_parameters(self, trainable_only: bool = True) -> int:
        """Online parameter count (momentum copies are frozen and excluded when trainable_only)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}"


class SimlaModel(SimlaBackbone):
    """The backbone + ITC projections, temperature and ITM head: embed, search and score image-text pairs."""

    TASK = "base"

    def __init__(self, config: SimlaConfig) -> None:
        super().__init__(config)
        v, t, o = self.config.vision, self.config.text, self.config.objectives
        self.vision_proj = nn.Linear(v.width, o.embed_dim)
        self.text_proj = nn.Linear(t.hidden_size, o.embed_dim)
        self.itm_head = nn.Linear(t.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(o.temp))

    # ----------------------------------------------------------------------------------------- pieces
    def image_features(self, image_tokens: Tensor) -> Tensor:
        """L2-normalised ITC feature of the image [CLS] token."""
        return F.normalize(self.vision_proj(image_tokens[:, 0]), dim=-1)

    def text_features(self, text_hidden: Tensor) -> Tensor:
        """L2-normalised ITC feature of the text [CLS] token (text-mode hidden states)."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def fuse(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor,
             image_index: Tensor | None = None) -> Tensor:
        """Multimodal hidden states: the caption's tokens cross-attending to the image tokens. With
        `image_index` (one entry per caption), caption i attends to image row `image_index[i]`, and each
        image's cross-attention keys/values are computed once however many captions use it."""
        return self.text_encoder(input_ids, attention_mask, mode="multimodal", encoder_hidden_states=image_tokens,
                                 context_index=image_index)

    def itm_logits(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor,
                   image_index: Tensor | None = None) -> Tensor:
        return self.itm_head(self.fuse(image_tokens, input_ids, attention_mask, image_index)[:, 0])

    # ------------------------------------------------------------------------------------ user API
    def encode_image(self, pixels: Tensor) -> Tensor:
        """(B, 3, R, R) normalised pixels -> (B, embed_dim) L2-normalised ITC features."""
        return self.image_features(self.visual_encoder(pixels))

    def encode_text(self, texts: TextInput) -> Tensor:
        """Captions (strings, or token ids) -> (B, embed_dim) L2-normalised ITC features."""
        ids, mask = self.tokenize(texts)
        return self.text_features(self.text_encoder(ids, mask, mode="text"))

    def itm_score(self, pixels: Tensor, texts: TextInput) -> Tensor:
        """Probability that image b matches text b, for each pair b: shape (B,)."""
        ids, mask = self.tokenize(texts)
        if pixels.shape[0] != ids.shape[0]:
            raise ValueError(f"itm_score pairs images with texts one to one: got {pixels.shape[0]} images, {ids.shape[0]} texts")
        logits = self.itm_logits(self.visual_encoder(pixels), ids, mask)
        return logits.softmax(-1)[:, 1]

    def similarity(self, pixels: Tensor, texts: TextInput) -> Tensor:
        """(num_images, num_texts) cosine similarities of the ITC features."""
        return self.encode_image(pixels) @ self.encode_text(texts).t()
