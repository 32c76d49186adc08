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
from .outputs import ClassificationOutput
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
    MOMENTUM_MODULES = ("visual_encoder", "text_encoder", "cls_head")

    def __init__(self, config: SimlaConfig, text_layers: int | None = None) -> None:
        super().__init__(config, text_layers=text_layers)
        self._prepare_encoder()
        self.cls_head = mlp_head(self.config.text.hidden_size, len(self.CLASSES))
        self.build_momentum_teachers()

    def _prepare_encoder(self) -> None:
        """Changes to the online encoder that its momentum copy must inherit (NLVR2 ties layers)."""

    def fused_cls(self, batch: Mapping[str, Tensor], momentum: bool = False) -> Tensor:
        """The multimodal [CLS] state (B, H) of the batch's text over its image(s)."""
        raise NotImplementedError

    def logits(self, batch: Mapping[str, Tensor], momentum: bool = False) -> Tensor:
        head = self.cls_head_m if momentum else self.cls_head
        return head(self.fused_cls(batch, momentum))

    def forward(self, batch: Mapping[str, Tensor], alpha: float | None = None) -> ClassificationOutput:
        missing = [k for k in self.BATCH_KEYS if k not in batch]
        if missing:
            raise KeyError(f"{self.TASK} batch lacks {missing}; expected keys {list(self.BATCH_KEYS)}")
        alpha = self.config.objectives.alpha if alpha is None else float(alpha)
        logits = self.logits(batch)
        teacher = None
        if alpha > 0:
            with torch.no_grad():
                if self.training and self.update_momentum:
                    self.update_momentum_teachers(self.config.objectives.momentum)
                teacher = self.logits(batch, momentum=True)
        labels = batch["label"].long()
        loss = distilled_cross_entropy(logits, labels, teacher, alpha)
        return ClassificationOutput({"cls": loss}, logits=logits.detach(), labels=labels)


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
