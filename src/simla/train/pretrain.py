"""`simla pretrain`: wire a recipe into data, model, optimizer and the engine.

The same function runs at world size 1 without a process group and under torchrun (NCCL on GPU, gloo on
CPU). Every check that can fail (recipe, annotation files, tokenizers, shapes) runs before training.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from ..checkpoint import load_state_into, read_checkpoint
from ..config import SimlaConfig, get_config
from ..data.images import BadSampleError
from ..data.pretrain_data import (AnnotationData, CaptionBatches, EpochBatchPlan, SampleBuilder, ShardBatches,
                                  ShardData, derive_seed)
from ..data.readers import CaptionRecord, is_shard_pattern, read_records
from ..data.shards import ShardStream, count_samples, expand_shards, iter_tar_samples, sample_image_and_caption
from ..data.transforms import PretrainViewConfig, PretrainViews
from ..distributed import finish, get_rank, get_world_size, init_from_env, is_distributed
from ..errors import DataError, UnusableDataError
from ..factory import build_model, create_model
from ..masking import BlockMaskGenerator
from ..models.pretrain import SimlaForPretraining
from ..tokenizers.text import get_tokenizer
from ..tokenizers.visual import KMeansTokenizer, VisualTokenizer, load_visual_tokenizer
from .engine import TrainState
from .recipe import PretrainRecipe
from .runner import build_engine


logger = logging.getLogger(__name__)


def resolve_resume(recipe: PretrainRecipe) -> Path | None:
    if recipe.resume is None:
        return None
    if recipe.resume == "auto":
        path = Path(recipe.output_dir) / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    path = Path(recipe.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume: no such checkpoint {path}")
    return path


def _views(recipe: PretrainRecipe, config) -> PretrainViews:
    return PretrainViews(PretrainViewConfig(image_size=config.vision.image_size,
                                            tokenizer_size=config.tokenizer_image_size,
                                            scale=(recipe.crop_scale_min, 1.0), randaugment=recipe.randaugment,
                                            shared_geometry=recipe.shared_geometry))


def _fit_kmeans(recipe: PretrainRecipe, builder: SampleBuilder, records, shards, config, device) -> KMeansTokenizer:
    """Fit the built-in visual tokenizer on tokenizer views of training images (bad ones are skipped)."""

    rng = random.Random(recipe.seed)
    if records is not None:
        candidates = [records[i] for i in rng.sample(range(len(records)), min(len(records), recipe.kmeans_fit_images))]
    else:
        candidates = (CaptionRecord(image, (caption,), raw.source) for shard in shards
                      for raw in iter_tar_samples(shard) for image, caption in [_safe_pair(raw, sample_image_and_caption)]
                      if image is not None)
    views = []
    for record in candidates:
        if len(views) >= recipe.kmeans_fit_images:
            break
        try:
            views.append(builder.to_float(builder.build(record, rng))["tokenizer_image"])
        except BadSampleError:
            continue
    if not views:
        raise UnusableDataError("no readable training image to fit the k-means visual tokenizer on; are train_file "
                                f"and image_root right? (image_root={recipe.image_root!r})")
    patch = config.tokenizer_image_size // config.grid_size
    logger.info("fitting the k-means visual tokenizer (%d codes, %dpx patches) on %d images",
                config.objectives.visual_vocab_size, patch, len(views))
    return KMeansTokenizer.fit(torch.stack(views), vocab_size=config.objectives.visual_vocab_size, patch_size=patch,
                               image_size=config.tokenizer_image_size, seed=recipe.seed, device=device)


def _safe_pair(raw, extract):
    try:
        return extract(raw)
    except BadSampleError:
        return None, None


def build_visual_tokenizer(recipe, builder, records, shards, config, device) -> VisualTokenizer:
    run_copy = Path(recipe.output_dir) / "visual_tokenizer.safetensors"
    if recipe.visual_tokenizer == "kmeans":
        if get_rank() == 0 and not run_copy.is_file():
            _fit_kmeans(recipe, builder, records, shards, config, device).save(run_copy)
        if is_distributed():
            torch.distributed.barrier()
        tokenizer = KMeansTokenizer.load(run_copy)
    else:
        tokenizer = load_visual_tokenizer(recipe.visual_tokenizer, image_size=config.tokenizer_image_size,
                                          trust_pickle=recipe.trust_pickle)
    if tokenizer.vocab_size != config.objectives.visual_vocab_size:
        raise ValueError(f"visual tokenizer has {tokenizer.vocab_size} codes but the model's MIM head predicts "
                         f"{config.objectives.visual_vocab_size} (set model_config.visual_vocab_size)")
    if tokenizer.grid_size != config.grid_size or tokenizer.image_size != config.tokenizer_image_size:
        raise ValueError(f"visual tokenizer gives a {tokenizer.grid_size}x{tokenizer.grid_size} grid at "
                         f"{tokenizer.image_size}px; the model needs {config.grid_size}x{config.grid_size} at "
                         f"{config.tokenizer_image_size}px")
    return tokenizer.to(device)


def build_data(recipe: PretrainRecipe, config, tokenizer) -> tuple[Any, SampleBuilder, Any, Any]:
    o = config.objectives
    masker = BlockMaskGenerator(config.grid_size, o.mim_num_masked, o.mim_min_block, min_aspect=o.mim_min_aspect)
    builder = SampleBuilder(_views(recipe, config), masker)
    data, records, shards = caption_data(recipe, builder, tokenizer, o.max_text_length, derive_seed(recipe.seed, recipe.SEED_STREAM))
    return data, builder, records, shards


def caption_data(recipe: Any, builder: Any, tokenizer, max_length: int, seed: int) -> tuple[Any, Any, Any]:
    """(data source, records, shards) over image-caption pairs from annotation files or WebDataset shards.

    `recipe` supplies train_file (annotation files, image folders or shards), image_root, csv_image_key,
    csv_caption_key, the image-folder caption options (``folder_captions()``, when it has them), samples_per_epoch,
    shuffle_buffer, batch_size and num_workers; `builder.build(record, rng)` turns one pair into a sample.
    The data seed is shared by all ranks (one permutation, split by rank).
    """
    rank, world = get_rank(), get_world_size()
    if is_shard_pattern(recipe.train_file):
        shards = expand_shards(recipe.train_file)
        total = recipe.samples_per_epoch or count_samples(shards)
        steps = total // (recipe.batch_size * world)
        if steps == 0:
            raise DataError(f"{total} samples per epoch cannot fill a batch of {recipe.batch_size} on {world} ranks")
        stream = ShardStream(shards, rank=rank, world_size=world, seed=seed, shuffle_buffer=recipe.shuffle_buffer)
        dataset = ShardBatches(stream, builder, tokenizer, max_length, recipe.batch_size, seed, rank,
                               recipe.num_workers)
        return ShardData(dataset, recipe.num_workers, steps), None, shards
    # Recipes of other tasks that reuse this function have no image-folder fields: they get the defaults.
    folder = recipe.folder_captions() if hasattr(recipe, "folder_captions") else None
    records = read_records(recipe.train_file, recipe.image_root, image_key=recipe.csv_image_key,
                           caption_key=recipe.csv_caption_key, folder=folder)
    plan = EpochBatchPlan(len(records), recipe.batch_size, seed, rank, world)
    dataset = CaptionBatches(records, builder, tokenizer, max_length, seed)
    return AnnotationData(dataset, plan, recipe.num_workers), records, None


@dataclass
class PretrainResult:
    state: TrainState
    model: SimlaForPretraining
    data: Any


def run_pretraining(recipe: PretrainRecipe, record_history: bool = False,
                    on_step: Callable[[SimlaForPretraining, int], None] | None = None) -> PretrainResult:
    """Pretrain as the recipe says. `on_step(model, step)` runs after every optimizer step (e.g. an evaluation)."""
    recipe.validate()
    device = init_from_env(recipe.device)
    rank = get_rank()
    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume = resolve_resume(recipe)
    random.seed(recipe.seed + rank)
    torch.manual_seed(recipe.seed + rank)

    saved = read_checkpoint(resume) if resume is not None else None
    # The config is known before any weights are touched, so the annotation files are read and checked
    # (and the tokenizer loaded) before the model is built or initial weights are fetched.
    config = SimlaConfig.from_dict(saved["config"]) if saved else get_config(recipe.model, **recipe.model_config)
    tokenizer_name = recipe.tokenizer or (config.text.tokenizer if saved else None) or recipe.text_encoder \
        or config.text.tokenizer
    tokenizer = get_tokenizer(tokenizer_name)
    data, builder, records, shards = build_data(recipe, config, tokenizer)
    data.record_history = record_history
    if saved is not None:
        model = build_model(config, "pretrain")  # weights come from the checkpoint: fetch no initial weights
    else:
        model = create_model(recipe.model, text_encoder=recipe.text_encoder, vision_encoder=recipe.vision_encoder,
                             **recipe.model_config)
    assert isinstance(model, SimlaForPretraining)
    config = model.config
    # The tokenizer the run used is the model's: encode_text and saved checkpoints refer to it.
    model.tokenizer = tokenizer
    config.text.tokenizer = tokenizer_name
    if tokenizer.vocab_size > config.text.vocab_size:
        raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the model's ({config.text.vocab_size})")
    # Only MIM needs visual tokens: without it, no codebook is fitted and no tokenizer runs.
    uses_mim = "mim" in config.objectives.losses
    visual_tokenizer = build_visual_tokenizer(recipe, builder, records, shards, config, device) if uses_mim else None

    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump({"recipe": recipe.to_dict(), "model": config.to_dict()},
                                                         sort_keys=False), encoding="utf-8")
    def prepare(batch: dict[str, Any]) -> dict[str, Any]:
        if visual_tokenizer is None:
            batch = {k: v for k, v in batch.items() if k not in ("tokenizer_image", "patch_mask")}
        moved = builder.to_float({k: v.to(device, non_blocking=True) for k, v in batch.items()})
        if visual_tokenizer is not None:
            moved["visual_tokens"] = visual_tokenizer(moved.pop("tokenizer_image"))
        return moved

    engine = build_engine(model, recipe, data, out, device, prepare,
                          on_step=(lambda step: on_step(model, step)) if on_step is not None else None)
    if saved is not None:
        load_state_into(model, saved["model"], source=str(resume))
        engine.load_training_state(saved["train_state"])
        logger.info("resumed from %s at step %d", resume, engine.state.step)
    logger.info("pretraining %s for %d steps on %d process(es), device %s",
                config.name, engine.config.total_steps, get_world_size(), device)
    state = engine.fit()
    finish()
    return PretrainResult(state, model, data)
