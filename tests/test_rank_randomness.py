"""Per-rank, per-sample randomness: every rank draws its own crops, flips and masks, reproducibly.

Two ranks are simulated by building each data path with rank=0 and rank=1 (world size 2), exactly as
`build_data` does under torchrun.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import simla
from simla.data.pretrain_data import (AnnotationData, BatchSpec, CaptionBatches, EpochBatchPlan, SampleBuilder,
                                      ShardBatches)
from simla.data.readers import read_records
from simla.data.transforms import FinetuneView
from simla.data.retrieval import RetrievalSampleBuilder, read_retrieval_train
from simla.data.shards import ShardStream, expand_shards
from simla.data.transforms import PretrainViewConfig, PretrainViews
from simla.masking import BlockMaskGenerator

from datasets import make_pairs, write_json, write_shards

SEED = 1234


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rank_data")
    pairs = make_pairs(root, 16)
    write_json(root / "pairs.json", pairs)
    write_json(root / "train.json", [{"image": p["image"], "caption": p["caption"], "image_id": i}
                                     for i, p in enumerate(pairs)])
    return root


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return simla.get_tokenizer(minilm_dir)


def pretrain_builder() -> SampleBuilder:
    views = PretrainViews(PretrainViewConfig(image_size=32, tokenizer_size=16))
    return SampleBuilder(views, BlockMaskGenerator(8, 12, 4))


def retrieval_builder() -> RetrievalSampleBuilder:
    return RetrievalSampleBuilder(FinetuneView(32))


def annotation_batch(records, builder, tokenizer, rank: int, batch: int = 0):
    """Batch `batch` of epoch 0 on `rank` of 2, from a fresh dataset (as a fresh process would build it)."""
    plan = EpochBatchPlan(len(records), 4, SEED, rank, 2)
    data = AnnotationData(CaptionBatches(records, builder, tokenizer, 16, SEED), plan, num_workers=0)
    for i, (tensors, meta) in enumerate(data.batches(0)):
        if i == batch:
            return tensors, meta
    raise AssertionError("too few batches")


def assert_all_slots_differ(a: torch.Tensor, b: torch.Tensor) -> None:
    for slot in range(a.shape[0]):
        assert not torch.equal(a[slot], b[slot]), f"slot {slot} drew the same on both ranks"


def test_pretraining_masks_and_crops_differ_across_ranks_and_repeat_on_rerun(data_root, tokenizer):
    records = read_records(data_root / "pairs.json", data_root)
    rank0, meta0 = annotation_batch(records, pretrain_builder(), tokenizer, rank=0)
    rank1, meta1 = annotation_batch(records, pretrain_builder(), tokenizer, rank=1)
    assert not set(meta0["indices"]) & set(meta1["indices"])  # different records on the two ranks ...
    assert_all_slots_differ(rank0["patch_mask"], rank1["patch_mask"])  # ... and different masks per slot
    again0, _ = annotation_batch(records, pretrain_builder(), tokenizer, rank=0)
    again1, _ = annotation_batch(records, pretrain_builder(), tokenizer, rank=1)
    for key in ("patch_mask", "image", "tokenizer_image", "text_ids"):
        assert torch.equal(rank0[key], again0[key]) and torch.equal(rank1[key], again1[key]), key

    # The same records on both ranks: the crops, flips and RandAugment ops differ too.
    dataset = CaptionBatches(records, pretrain_builder(), tokenizer, 16, SEED)
    same = [0, 1, 2, 3]
    on0, _ = dataset[BatchSpec(0, 0, same, rank=0)]
    on1, _ = dataset[BatchSpec(0, 0, same, rank=1)]
    assert_all_slots_differ(on0["image"], on1["image"])
    assert_all_slots_differ(on0["patch_mask"], on1["patch_mask"])
    assert torch.equal(on0["image"], dataset[BatchSpec(0, 0, same, rank=0)][0]["image"])


def test_retrieval_crops_differ_across_ranks_and_repeat_on_rerun(data_root, tokenizer):
    records = read_retrieval_train(data_root / "train.json", data_root)
    dataset = CaptionBatches(records, retrieval_builder(), tokenizer, 16, SEED)
    same = [4, 5, 6, 7]
    on0, _ = dataset[BatchSpec(0, 0, same, rank=0)]
    on1, _ = dataset[BatchSpec(0, 0, same, rank=1)]
    assert torch.equal(on0["image_id"], on1["image_id"])
    assert_all_slots_differ(on0["image"], on1["image"])
    rerun, _ = CaptionBatches(records, retrieval_builder(), tokenizer, 16, SEED)[BatchSpec(0, 0, same, rank=1)]
    assert torch.equal(on1["image"], rerun["image"])
    # The plan that the fine-tuning command uses hands its rank to every batch it describes.
    plan = EpochBatchPlan(len(records), 4, SEED, rank=1, world_size=2)
    assert plan.batch(0, 0, plan.order(0)).rank == 1


def test_shard_masks_differ_across_ranks_and_repeat_on_rerun(tmp_path, tokenizer):
    shards = expand_shards(write_shards(tmp_path / "shards", count=16, per_shard=4))

    def first_batch(rank: int):
        stream = ShardStream(shards, rank=rank, world_size=2, seed=SEED, shuffle_buffer=2)
        batches = ShardBatches(stream, pretrain_builder(), tokenizer, 16, batch_size=4, seed=SEED, rank=rank,
                               num_workers=0)
        return next(iter(batches))[0]

    rank0, rank1 = first_batch(0), first_batch(1)
    assert_all_slots_differ(rank0["patch_mask"], rank1["patch_mask"])
    assert torch.equal(rank0["patch_mask"], first_batch(0)["patch_mask"])
    assert torch.equal(rank1["image"], first_batch(1)["image"])
