"""Classifiers on the multimodal [CLS]: the shared base of NLVR2 and SNLI-VE, and the SNLI-VE model.

Both tasks put an MLP head (Linear H->H, ReLU, Linear H->classes; the reference's `cls_head`) on the [CLS]
state of the shared encoder in multimodal mode, and train it with (1 - alpha) * CE + alpha * soft CE from
momentum copies of the ViT, the encoder and the head. With alpha = 0 no teacher runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..config import SimlaConfig
from ..task_objectives import distilled_cross_entropy
from .momentum import copy_to_momentum, make_momentum_copy, momentum_update
from .pretrain import PretrainOutput
from .simla import SimlaBackbone


def mlp_head(width: int, classes: int) -> nn.Sequential:
    """The reference's `cls_head`: Linear(width, width), ReLU, Linear(width, classes) (keys .0 and .2)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


class SimlaClassifier(SimlaBackbone):
    """Backbone + `cls_head` on the multimodal [CLS] + momentum copies; subclasses say how a batch is fused."""

    CLASSES: tuple[str, ...] = ()  # class names by label id
    BATCH_KEYS: tuple[str, ...] = ()
    NEW_HEAD_PREFIXES = ("cls_head",)  # fresh when fine-tuning starts from a checkpoint of another task
    IGNORED_SOURCE_PREFIXES = SimlaBackbone.IGNORED_SOURCE_PREFIXES + (
        "vision_proj", "text_proj", "itm_head", "temp", "mlm_head_m",
    )

    def __init__(self, config: SimlaConfig, text_layers: int | None = None) -> None:
        super().__init__(config, text_layers=text_layers)
        self._prepare_encoder()
        self.cls_head = mlp_head(config.text.hidden_size, len(self.CLASSES))
        self.visual_encoder_m = make_momentum_copy(self.visual_encoder)
        self.text_encoder_m = make_momentum_copy(self.text_encoder)
        self.cls_head_m = make_momentum_copy(self.cls_head)

    def _prepare_encoder(self) -> None:
        """Changes to the online encoder that its momentum copy must inherit (NLVR2 ties layers)."""

    def momentum_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(getattr(self, n), getattr(self, n + "_m")) for n in ("visual_encoder", "text_encoder", "cls_head")]

    def copy_params_to_momentum(self) -> None:
        copy_to_momentum(self.momentum_pairs())

    def fused_cls(self, batch: Mapping[str, Tensor], momentum: bool = False) -> Tensor:
        """The multimodal [CLS] state (B, H) of the batch's text over its image(s)."""
        raise NotImplementedError

    def logits(self, batch: Mapping[str, Tensor], momentum: bool = False) -> Tensor:
        head = self.cls_head_m if momentum else self.cls_head
        return head(self.fused_cls(batch, momentum))

    def forward(self, batch: Mapping[str, Tensor], alpha: float | None = None) -> PretrainOutput:
        missing = [k for k in self.BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"{self.TASK} batch lacks {missing}; expected keys {list(self.BATCH_KEYS)}")
        alpha = self.config.objectives.alpha if alpha is None else float(alpha)
        logits = self.logits(batch)
        teacher = None
        if alpha > 0:
            with torch.no_grad():
                if self.training and self.update_momentum:
                    momentum_update(self.momentum_pairs(), self.config.objectives.momentum)
                teacher = self.logits(batch, momentum=True)
        loss = distilled_cross_entropy(logits, batch["label"].long(), teacher, alpha)
        return PretrainOutput({"cls": loss}, {"logits": logits.detach()})


class SimlaForVE(SimlaClassifier):
    """SNLI-VE: does the image entail, contradict, or say nothing about the sentence?"""

    TASK = "ve"
    CLASSES = ("contradiction", "neutral", "entailment")  # label ids as the reference: entailment 2
    BATCH_KEYS = ("image", "text_ids", "text_mask", "label")

    def fused_cls(self, batch: Mapping[str, Tensor], momentum: bool = False) -> Tensor:
        vision = self.visual_encoder_m if momentum else self.visual_encoder
        encoder = self.text_encoder_m if momentum else self.text_encoder
        image = vision(batch["image"])
        return encoder(batch["text_ids"], batch["text_mask"], mode="multimodal", encoder_hidden_states=image)[:, 0]
