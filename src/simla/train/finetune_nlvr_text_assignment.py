"""`simla finetune nlvr-ta`: the text-assignment stage that prepares the deepened encoder for NLVR2.

On image-caption pairs (JSON/CSV annotation files or WebDataset shards, as pretraining reads them) the model
learns whether a caption belongs to the left image, the right image, or neither, with negatives drawn by
image similarity (see `simla.models.nlvr`). Its checkpoint is what `simla finetune nlvr` starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..data.pretrain_data import image_reader, read_caption
from ..data.transforms import FinetuneView
from ..distributed import finish
from .pretrain import caption_data
from .recipe import field_
from .runner import load_task_model, start_task_run, train_task, write_run_config
from .task_recipe import FinetuneRecipe


@dataclass
class NLVRTextAssignmentRecipe(FinetuneRecipe):
    checkpoint: str = field_("", "pretraining checkpoint (its encoder is deepened here)")
    train_file: str | list[str] = field_("", "image-caption pairs: JSON/JSONL/CSV/TSV file(s) or a shard pattern")
    csv_image_key: str = field_("filepath", "CSV/TSV column holding the image path")
    csv_caption_key: str = field_("title", "CSV/TSV column holding the caption")
    samples_per_epoch: int | None = field_(None, "WebDataset only: samples per epoch (counted when null)")
    shuffle_buffer: int = field_(1000, "WebDataset only: shuffle buffer size per worker")
    image_size: int = field_(256, "resolution (the reference runs this stage at the pretraining 256 px)")
    crop_scale_min: float = field_(0.2, "smallest crop area fraction (the pretraining view: 0.2)")
    max_text_length: int = field_(25, "caption tokens incl. [CLS] (as pretraining)")
    batch_size: int = field_(64, "pairs per process per step (at least 3: each caption needs two negatives)")
    epochs: int = field_(1, "epochs (reference: 1)")
    min_lr: float = field_(1e-5, "final learning rate (reference: 1e-5)")
    output_dir: str = field_("runs/nlvr_ta", "run folder")

    TASK: ClassVar[str] = "nlvr-ta"
    SEED_STREAM: ClassVar[int] = 14
    POSITIVE_FIELDS: ClassVar[tuple[str, ...]] = ("max_text_length", "shuffle_buffer")

    def validate(self) -> None:
        super().validate()
        if self.batch_size < 3:
            raise ValueError("batch_size: text assignment needs at least 3 pairs per batch (two negatives each)")


@dataclass
class ImageCaptionBuilder:
    """One image (fine-tuning view) and one of its captions."""

    view: FinetuneView
    max_words: int = 30

    def build(self, record: Any, rng) -> dict[str, Any]:
        caption = read_caption(record, rng, self.max_words)
        return {"image": self.view(image_reader(record), rng), "caption": caption}


def run_nlvr_text_assignment(recipe: NLVRTextAssignmentRecipe, on_step: Callable[[Any, int], None] | None = None) -> dict[str, Any]:
    recipe.validate()
    run = start_task_run(recipe)
    model = load_task_model(recipe, run)
    data, _, _ = caption_data(recipe, ImageCaptionBuilder(recipe.train_view()), model.tokenizer,
                              recipe.max_text_length, run.data_seed)
    write_run_config(run, recipe, model)
    engine = train_task(run, model, recipe, data, (lambda step: on_step(model, step)) if on_step else None)
    finish()
    return {"step": engine.state.step, "checkpoint": str(run.output_dir / "checkpoints" / "last.pt")}
