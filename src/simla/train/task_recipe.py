"""The fields every fine-tuning recipe shares (checkpoint, data, optimisation, run), in one typed base.

Each task's recipe (retrieval, VQA, NLVR2, SNLI-VE, ...) is a dataclass that extends `FinetuneRecipe` with
its own fields and paper defaults; all of them load from YAML + `key=value` overrides through
`simla.train.recipe.load_recipe` and are validated before any work starts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Literal

from .recipe import CPU_ALLOCATOR_HELP, check_model_overrides, field_


@dataclass
class FinetuneRecipe:
    checkpoint: str = field_("", "checkpoint to fine-tune: ours, an export directory or a reference .pth")
    trust_pickle: bool = field_(False, "allow unpickling reference checkpoints (trusted files only)")
    model_config: dict = field_({}, "model config overrides, e.g. model_config.alpha=0.4")
    image_size: int = field_(384, "fine-tuning resolution (position embeddings are resampled)")
    tokenizer: str | None = field_(None, "text tokenizer (dir or hub name); default: the checkpoint's")
    train_file: str | list[str] = field_("", "training annotation file")
    test_file: str | None = field_(None, "evaluation file answered at the end of the run")
    image_root: str | None = field_(None, "directory that relative image paths are joined to")
    num_workers: int = field_(4, "dataloader worker processes")
    randaugment: bool = field_(True, "RandAugment on the training view")
    crop_scale_min: float = field_(0.5, "smallest crop area fraction of RandomResizedCrop (reference 0.5)")
    batch_size: int = field_(32, "examples per process per step")
    grad_accum_steps: int = field_(1, "micro-batches accumulated per optimizer step")
    epochs: int = field_(5, "epochs")
    max_steps: int | None = field_(None, "stop after this many optimizer steps")
    lr: float = field_(2e-5, "peak learning rate")
    warmup_lr: float = field_(1e-5, "learning rate at step 0")
    min_lr: float = field_(1e-6, "final learning rate")
    warmup_steps: int = field_(100, "warm-up steps (reference: 1 'epoch' of 100 iterations)")
    lr_schedule: Literal["cosine", "reference"] = field_("cosine", "'cosine' per step, or the reference staircase")
    weight_decay: float = field_(0.02, "AdamW weight decay")
    grad_clip: float | None = field_(None, "gradient-norm clipping (null: none)")
    alpha_warmup: bool = field_(True, "ramp distillation alpha over the first epoch (alpha: model_config.alpha)")
    precision: Literal["fp32", "bf16"] = field_("fp32", "fp32 or bf16 autocast")
    grad_checkpointing: bool = field_(False, "recompute activations to save memory")
    compile: bool = field_(False, "torch.compile every ViT block and encoder layer (the first steps compile; "
                                  "measured no faster on a 2-core CPU, where matrix products dominate)")
    cpu_allocator: Literal["auto", "keep", "release", "tcmalloc", "jemalloc", "mimalloc", "system"] = field_(
        "auto", CPU_ALLOCATOR_HELP)
    freeze_vision_encoder: bool = field_(False, "keep the ViT's loaded weights fixed (about half the step time on a "
                                                "small model; the paper fine-tunes everything)")
    eval_batch_size: int = field_(32, "examples per forward at evaluation")
    output_dir: str = field_("runs/finetune", "run folder")
    save_every: int = field_(1000, "checkpoint every N steps (and at the end)")
    log_every: int = field_(50, "log every N steps")
    seed: int = field_(42, "random seed")
    resume: str | None = field_(None, "'auto' or a checkpoint path to continue an interrupted run")
    tensorboard: bool = field_(False, "also write TensorBoard events")
    device: str = field_("auto", "'auto', 'cpu' or 'cuda'")
    progress: bool = field_(True, "progress bars")

    #: Integer fields of the subclass that must be >= 1, on top of the shared ones.
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        if not self.checkpoint and self.resume is None:
            raise ValueError("checkpoint: required (the checkpoint to fine-tune)")
        if not self.train_file:
            raise ValueError("train_file: required")
        check_model_overrides(self.model_config)
        shared = ("batch_size", "grad_accum_steps", "epochs", "save_every", "log_every", "image_size", "eval_batch_size")
        for name in shared + self.POSITIVE_FIELDS:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps: must be >= 1 or null")
        if not 0 < self.crop_scale_min <= 1:
            raise ValueError("crop_scale_min: must lie in (0, 1]")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
