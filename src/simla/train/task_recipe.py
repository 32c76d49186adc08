"""The base of every fine-tuning recipe: the checkpoint to start from and the fine-tuning defaults.

Each task's recipe (retrieval, VQA, NLVR2, SNLI-VE, ...) is a dataclass that extends `FinetuneRecipe` with
its own fields and paper defaults; all of them load from YAML + `key=value` overrides through
`simla.train.recipe.load_recipe` and are validated before any work starts. The fields every training
command shares are declared once, in `simla.train.recipe.TrainingRecipe`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..data.transforms import FinetuneView
from .recipe import TrainingRecipe, check_model_overrides, field_


@dataclass
class FinetuneRecipe(TrainingRecipe):
    checkpoint: str = field_("", "checkpoint to fine-tune: ours, an export directory or a reference .pth")
    trust_pickle: bool = field_(False, "allow unpickling reference checkpoints (trusted files only)")
    model_config: dict = field_({}, "model config overrides, e.g. model_config.alpha=0.4")
    image_size: int = field_(384, "fine-tuning resolution (position embeddings are resampled)")
    tokenizer: str | None = field_(None, "text tokenizer (dir or hub name); default: the checkpoint's")
    train_file: str | list[str] = field_("", "training annotation file")
    test_file: str | None = field_(None, "evaluation file answered at the end of the run")
    crop_scale_min: float = field_(0.5, "smallest crop area fraction of RandomResizedCrop (reference 0.5)")
    max_bad_fraction: float = field_(1.0, "stop when more than this fraction of all samples read so far were bad "
                                          "(1: never stop; bad samples are still skipped, logged and counted)")
    batch_size: int = field_(32, "examples per process per step")
    epochs: int = field_(5, "epochs")
    lr: float = field_(2e-5, "peak learning rate")
    min_lr: float = field_(1e-6, "final learning rate")
    warmup_steps: int = field_(100, "warm-up steps (reference: 1 'epoch' of 100 iterations)")
    alpha_warmup: bool = field_(True, "ramp distillation alpha over the first epoch (alpha: model_config.alpha)")
    eval_batch_size: int = field_(32, "examples per forward at evaluation")
    output_dir: str = field_("runs/finetune", "run folder")

    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("image_size", "eval_batch_size")

    def train_view(self) -> FinetuneView:
        """The training images' view: a random resized crop, a flip and RandAugment (as the recipe says)."""
        return FinetuneView(self.image_size, scale=(self.crop_scale_min, 1.0), randaugment=self.randaugment)

    def validate(self) -> None:
        if not self.checkpoint and self.resume is None:
            raise ValueError("checkpoint: required (the checkpoint to fine-tune)")
        super().validate()
        check_model_overrides(self.model_config)
