"""What a model's training forward returns: its losses by name, plus what else it computed, per task.

Every output is a dict of named scalar losses (`out["itc"]`, `out.total`), which is all the training
engine reads. What a forward computes besides its losses (drawn negatives, masks, logits, labels) is kept
in `out.targets` by name and read through the typed attributes of each task's output class; an attribute
the forward did not fill (e.g. `psl_keywords` of a pretraining ablation without PSL) is None.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__ = ["ClassificationOutput", "ModelOutput", "PretrainOutput", "RetrievalOutput", "VQAOutput"]


class ModelOutput(dict):
    """The computed losses by name (`out["itc"]` ...), plus `out.targets`: what else the forward computed.

    `extras` given by keyword join `targets`; a subclass names the ones it knows in `FIELDS` (each also
    readable as an attribute), and refuses others, so a misspelt name fails where it is written.
    """

    #: Names of the non-loss results this output carries (readable as `out.<name>`, None when absent).
    FIELDS: tuple[str, ...] = ()

    def __init__(self, losses: Mapping[str, Tensor], targets: Mapping[str, Any] | None = None,
                 **extras: Any) -> None:
        super().__init__(losses)
        unknown = sorted(set(extras) - set(self.FIELDS))
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {unknown}; its fields are {list(self.FIELDS)}")
        self.targets: dict[str, Any] = {**(targets or {}), **extras}

    @property
    def losses(self) -> dict[str, Tensor]:
        """The losses by name, as a plain dict."""
        return dict(self)

    @property
    def total(self) -> Tensor:
        """The sum of the losses (each already weighted as its objective defines)."""
        return sum(self.values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(losses={dict.__repr__(self)}, fields={sorted(self.targets)})"


class _ITMNegatives:
    """The in-batch ITM negatives a forward drew (for tests and inspection)."""

    targets: dict[str, Any]

    @property
    def itm_negative_images(self) -> Tensor | None:
        """(B,) the image drawn as each caption's ITM negative."""
        return self.targets.get("itm_negative_images")

    @property
    def itm_negative_texts(self) -> Tensor | None:
        """(B,) the caption drawn as each image's ITM negative."""
        return self.targets.get("itm_negative_texts")


class PretrainOutput(_ITMNegatives, ModelOutput):
    """Pretraining: the losses of the chosen objectives (itc, itm, mlm, mim, psl) and their targets."""

    FIELDS = ("temp", "alpha", "mlm_labels", "masked_ids", "itm_negative_images", "itm_negative_texts",
              "psl_keywords")

    @property
    def temp(self) -> Tensor | None:
        """The ITC temperature this step used (after clamping)."""
        return self.targets.get("temp")

    @property
    def alpha(self) -> Tensor | None:
        """The distillation weight this step used."""
        return self.targets.get("alpha")

    @property
    def mlm_labels(self) -> Tensor | None:
        """(B, L) the original ids at the MLM-masked positions, -100 elsewhere."""
        return self.targets.get("mlm_labels")

    @property
    def masked_ids(self) -> Tensor | None:
        """(B, L) the captions as MLM read them (masked)."""
        return self.targets.get("masked_ids")

    @property
    def psl_keywords(self) -> Tensor | None:
        """(B, K) the keyword ids PSL chose, -1 for empty slots."""
        return self.targets.get("psl_keywords")


class RetrievalOutput(_ITMNegatives, ModelOutput):
    """Retrieval fine-tuning: the itc and itm losses and the ITM negatives drawn (never of the same image)."""

    FIELDS = ("itm_negative_images", "itm_negative_texts")


class VQAOutput(ModelOutput):
    """VQA fine-tuning: the vqa loss and the loss of each answer."""

    FIELDS = ("answer_losses",)

    @property
    def answer_losses(self) -> Tensor | None:
        """(N,) each answer's (distilled) sequence loss, detached."""
        return self.targets.get("answer_losses")


class ClassificationOutput(ModelOutput):
    """A classifier on the multimodal [CLS] (NLVR2, SNLI-VE, NLVR2 text assignment): its loss, logits, labels."""

    FIELDS = ("logits", "labels")

    @property
    def logits(self) -> Tensor | None:
        """(B, classes) the online head's logits, detached."""
        return self.targets.get("logits")

    @property
    def labels(self) -> Tensor | None:
        """(B,) the labels the loss was computed against (text assignment: the ones it drew)."""
        return self.targets.get("labels")
