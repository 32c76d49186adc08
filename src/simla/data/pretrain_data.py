"""Pretraining batches from annotation files or WebDataset shards, built in dataloader workers.

A whole batch is built by one worker call, which lets a bad sample be replaced by another sample of the
dataset that is NOT already in the batch (never a duplicate: a duplicate would be a false negative for
ITC/ITM). All randomness (caption choice, crop, flip, RandAugment, block mask, replacements) comes from a
per-sample seed derived from (seed, epoch, rank, batch, slot): every rank draws its own augmentations and
masks, and a resumed run rebuilds exactly the batches the interrupted run would have seen.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..errors import DataError, UnusableDataError
from ..masking import BlockMaskGenerator
from ..tokenizers.text import TextTokenizer
from ..tokenizers.captions import pre_caption
from .images import BadSampleError, DecodeSize, load_image
from .readers import CaptionRecord
from .shards import ShardStream, sample_image_and_caption
from .transforms import PretrainViews

logger = logging.getLogger(__name__)

def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across processes and Python hash seeds)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def sample_seed(seed: int, epoch: int, rank: int, batch: int, slot: int) -> int:
    """The seed of every random choice made for one sample of annotation-file data."""
    return derive_seed(seed, epoch, rank, batch, slot)


def reason_of(err: BadSampleError) -> str:
    """The counter a bad sample is logged under (`skipped` in the training log): its kind."""
    return err.kind


def bad_entry(err: BadSampleError) -> tuple[str, str, str]:
    """(source, kind, reason) of a bad sample, as batch metadata carries it to the main process."""
    return str(err.source), err.kind, err.reason


class BadSampleLog:
    """Logs each bad source once per run, in the main process.

    Dataloader workers only put their bad samples into the batch metadata: a worker's memory of what it
    reported dies with it at the end of every epoch, and several workers would each report the same file.
    """

    def __init__(self) -> None:
        self.reported: set[str] = set()

    def __call__(self, meta: Mapping[str, Any]) -> None:
        for source, kind, reason in meta.get("bad", ()):
            if source not in self.reported:
                self.reported.add(source)
                logger.warning("skipping bad sample (%s) %s: %s", kind, source, reason)


def read_caption(record: Any, rng: random.Random, max_words: int) -> str:
    """A cleaned caption of `record` (a list caption is sampled); empty ones are bad samples."""
    captions = record.captions
    caption = pre_caption(captions[rng.randrange(len(captions))] if len(captions) > 1 else captions[0], max_words)
    if not caption:
        raise BadSampleError(record.origin, "empty caption after cleaning", "empty_caption")
    return caption


# The notes list of the sample being built (see collect_image_notes); None outside a batch builder.
_IMAGE_NOTES: ContextVar[list[str] | None] = ContextVar("simla_image_notes", default=None)


@contextmanager
def collect_image_notes() -> Iterator[list[str]]:
    """Within the block, :func:`read_image` appends what ``load_image`` did (``"transparent"``, ``"svg"``,
    ...) to the yielded list.

    A context variable rather than an argument: every task's sample builder calls ``read_image(record)``,
    and the batch datasets count the notes (``meta["images"]``) without each builder having to pass
    them along. Each worker process builds one sample at a time, so the list is never shared.
    """
    notes: list[str] = []
    token = _IMAGE_NOTES.set(notes)
    try:
        yield notes
    finally:
        _IMAGE_NOTES.reset(token)


def read_image(record: Any, decode_size: DecodeSize | None = None):
    """The record's image in RGB (a path, or the bytes of a shard member named by its origin).

    A view passes ``decode_size`` (see :func:`~simla.data.images.load_image`) when it can use a JPEG
    decoded at reduced scale; ``image_reader(record)`` is this function waiting for it.
    """
    notes = _IMAGE_NOTES.get()
    if isinstance(record.image, (bytes, bytearray)):
        return load_image(record.image, name=record.origin, notes=notes, decode_size=decode_size)
    return load_image(record.image, notes=notes, decode_size=decode_size)


def image_reader(record: Any) -> Callable[[DecodeSize | None], Any]:
    """The record's image as a reader for the views: they decide the decode size once they know the image's."""
    return partial(read_image, record)


@dataclass
class SampleBuilder:
    """Turns one record (image source, captions, origin) into the pretraining inputs."""

    views: PretrainViews
    masker: BlockMaskGenerator
    max_words: int = 30

    def build(self, record: Any, rng: random.Random) -> dict[str, Any]:
        """The sample's caption, uint8 views (``to_float`` normalises them, in batches) and patch mask."""
        caption = read_caption(record, rng, self.max_words)
        encoder_view, tokenizer_view = self.views.pixels(image_reader(record), rng)
        patch_mask = torch.from_numpy(self.masker(rng)).flatten()
        return {"image": encoder_view, "tokenizer_image": tokenizer_view, "caption": caption, "patch_mask": patch_mask}

    def to_float(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The views of a built batch (or sample) as the model reads them: the encoder view normalised, the
        tokenizer view in [0, 1]. Run where the batch is used (on the GPU after the copy, in one pass)."""
        out = dict(batch)
        out["image"] = self.views.normalize(batch["image"])
        if "tokenizer_image" in batch:
            out["tokenizer_image"] = batch["tokenizer_image"].to(torch.float32) / 255.0
        return out


def collate(samples: list[dict[str, Any]], tokenizer: TextTokenizer, max_length: int) -> dict[str, Any]:
    """Stack every field; captions are tokenized together in the reference form."""
    text = tokenizer([s["caption"] for s in samples], max_length=max_length, clean=False)
    batch: dict[str, Any] = {"text_ids": text.input_ids, "text_mask": text.attention_mask}
    for key in samples[0]:
        if key != "caption":
            values = [s[key] for s in samples]
            batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else torch.tensor(values)
    return batch


# ------------------------------------------------------------------------- annotation files
class BatchSpec(NamedTuple):
    """One item of :class:`CaptionBatches`: which records make batch `batch` of `epoch` on `rank`."""

    epoch: int
    batch: int
    indices: Sequence[int]
    rank: int = 0


class CaptionBatches(Dataset):
    """Map-style dataset whose items are whole batches, addressed by a :class:`BatchSpec`.

    The rank is part of every per-sample seed: the batch index counts batches per rank, so without it
    every rank would draw the same crop, flip, RandAugment ops and patch mask for the same slot.
    """

    def __init__(self, records: Sequence[CaptionRecord], builder: SampleBuilder, tokenizer: TextTokenizer,
                 max_length: int, seed: int, max_attempts_per_sample: int = 50,
                 collate_fn: Callable[..., dict[str, Any]] = collate) -> None:
        self.records = records
        self.builder = builder
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.seed = seed
        self.max_attempts = max_attempts_per_sample
        self.collate_fn = collate_fn  # (samples, tokenizer, max_length) -> batch; tasks bring their own

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, spec: BatchSpec | tuple) -> tuple[dict[str, Any], dict[str, Any]]:
        epoch, batch_index, indices, rank = BatchSpec(*spec)
        taken = set(indices)
        samples, skipped, images, used, bad = [], Counter(), Counter(), [], []
        for slot, index in enumerate(indices):
            rng = random.Random(sample_seed(self.seed, epoch, rank, batch_index, slot))
            for _ in range(self.max_attempts):
                try:
                    with collect_image_notes() as notes:  # counted only for samples that are used
                        samples.append(self.builder.build(self.records[index], rng))
                    images.update(notes)
                    used.append(index)
                    break
                except BadSampleError as err:
                    bad.append(bad_entry(err))
                    skipped[reason_of(err)] += 1
                    index = self._replacement(rng, taken)
                    taken.add(index)
            else:
                raise UnusableDataError(f"{self.max_attempts} samples in a row were bad while filling batch "
                                   f"{batch_index} of epoch {epoch}; is the image_root right? counts: {dict(skipped)}")
        meta = {"skipped": dict(skipped), "images": dict(images), "size": len(samples), "batch": batch_index,
                "indices": used, "bad": bad}
        return self.collate_fn(samples, self.tokenizer, self.max_length), meta

    def _replacement(self, rng: random.Random, taken: set[int]) -> int:
        if len(taken) >= len(self.records):
            raise UnusableDataError("no unused sample is left to replace a bad one (dataset smaller than a batch?)")
        while True:
            candidate = rng.randrange(len(self.records))
            if candidate not in taken:
                return candidate


class EpochBatchPlan:
    """The batches of one rank for one epoch: a seeded permutation shared by all ranks, split by rank.

    Like DistributedSampler with drop_last: every rank gets the same number of full batches and no
    sample appears twice in an epoch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        if self.steps_per_epoch == 0:
            raise DataError(f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} ranks")

    def batch(self, epoch: int, batch_index: int, order: torch.Tensor) -> BatchSpec:
        start = batch_index * self.batch_size
        return BatchSpec(epoch, batch_index, order[start:start + self.batch_size].tolist(), self.rank)

    def order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch))
        permutation = torch.randperm(self.num_samples, generator=g)
        used = self.steps_per_epoch * self.batch_size * self.world_size
        return permutation[:used][self.rank::self.world_size]


class AnnotationData:
    """ResumableData over annotation-file records (map-style, exact resume)."""

    def __init__(self, dataset: CaptionBatches, plan: EpochBatchPlan, num_workers: int) -> None:
        self.dataset, self.plan, self.num_workers = dataset, plan, num_workers
        self.steps_per_epoch = plan.steps_per_epoch
        self.bad_log = BadSampleLog()
        self._epoch, self._next_batch = 0, 0
        # Record indices of every consumed batch (tests and audits; off by default to save memory).
        self.record_history = False
        self.history: list[list[int]] = []

    def batches(self, epoch: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        if epoch != self._epoch:
            self._epoch, self._next_batch = epoch, 0
        order = self.plan.order(epoch)
        specs = [self.plan.batch(epoch, b, order) for b in range(self._next_batch, self.steps_per_epoch)]
        # batch_size=None: each dataset item is already a batch. A private generator keeps the loader from
        # drawing on the global RNG, whose state belongs to the model (dropout, masking) and the checkpoint.
        loader = DataLoader(self.dataset, sampler=specs, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(0), persistent_workers=False)
        for batch, meta in loader:
            self.bad_log(meta)
            yield batch, meta

    def consumed(self, epoch: int, meta: Mapping[str, Any]) -> None:
        self._epoch, self._next_batch = epoch, int(meta["batch"]) + 1
        if self.record_history:
            self.history.append(list(meta["indices"]))

    def position(self) -> dict[str, Any]:
        return {"kind": "annotations", "epoch": self._epoch, "next_batch": self._next_batch}

    def load_position(self, position: Mapping[str, Any]) -> None:
        if position.get("kind") != "annotations":
            raise ValueError(f"checkpoint data position is for {position.get('kind')!r} data, not annotation files")
        self._epoch, self._next_batch = int(position["epoch"]), int(position["next_batch"])


# ------------------------------------------------------------------------------ WebDataset
class ShardBatches(IterableDataset):
    """Batches streamed from tar shards; bad samples are skipped and the stream's next sample takes over.

    Resume: each worker role records how many stream samples it has consumed; a resumed worker skips
    that many (before decoding). Worker roles are rotated so that the DataLoader's round-robin continues
    with the role that was next when the checkpoint was written.
    """

    def __init__(self, stream: ShardStream, builder: SampleBuilder, tokenizer: TextTokenizer, max_length: int,
                 batch_size: int, seed: int, rank: int, num_workers: int) -> None:
        self.stream, self.builder, self.tokenizer = stream, builder, tokenizer
        self.max_length, self.batch_size, self.seed, self.rank = max_length, batch_size, seed, rank
        self.num_workers = max(1, num_workers)
        self.epoch, self.skip, self.role_offset = 0, {}, 0

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        role = (worker + self.role_offset) % self.num_workers
        self.stream.set_epoch(self.epoch)
        consumed = int(self.skip.get(role, 0))
        self.stream.set_position(self.epoch, consumed, worker_role=role)
        samples, skipped, images, keys, bad = [], Counter(), Counter(), [], []
        for raw in self.stream:
            rng = random.Random(derive_seed(self.seed, self.epoch, self.rank, role, consumed))
            consumed += 1
            try:
                image_bytes, caption = sample_image_and_caption(raw)
                with collect_image_notes() as notes:
                    samples.append(self.builder.build(CaptionRecord(image_bytes, (caption,), raw.source), rng))
                images.update(notes)
                keys.append(raw.source)
            except BadSampleError as err:
                bad.append(bad_entry(err))
                skipped[reason_of(err)] += 1
                continue
            if len(samples) == self.batch_size:
                meta = {"skipped": dict(skipped), "images": dict(images), "size": len(samples), "role": role,
                        "consumed": consumed, "keys": keys, "bad": bad}
                yield collate(samples, self.tokenizer, self.max_length), meta
                samples, skipped, images, keys, bad = [], Counter(), Counter(), [], []
        # A partial final batch is dropped (drop_last, as the reference); its bad samples still count.


class ShardData:
    """ResumableData over WebDataset shards."""

    def __init__(self, dataset: ShardBatches, num_workers: int, steps_per_epoch: int) -> None:
        self.dataset, self.num_workers, self.steps_per_epoch = dataset, num_workers, steps_per_epoch
        self._epoch, self._consumed, self._batches = 0, {}, 0
        self.bad_log = BadSampleLog()
        self.record_history = False
        self.history: list[list[str]] = []

    def batches(self, epoch: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        if epoch != self._epoch:
            self._epoch, self._consumed, self._batches = epoch, {}, 0
        self.dataset.epoch = epoch
        self.dataset.skip = dict(self._consumed)
        self.dataset.role_offset = self._batches % max(1, self.num_workers)
        loader = DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(0))
        for batch, meta in loader:
            self.bad_log(meta)
            yield batch, meta

    def consumed(self, epoch: int, meta: Mapping[str, Any]) -> None:
        self._epoch = epoch
        self._consumed[int(meta["role"])] = int(meta["consumed"])
        self._batches += 1
        if self.record_history:
            self.history.append(list(meta["keys"]))

    def position(self) -> dict[str, Any]:
        return {"kind": "shards", "epoch": self._epoch, "batches": self._batches,
                "consumed": {str(k): v for k, v in self._consumed.items()}}

    def load_position(self, position: Mapping[str, Any]) -> None:
        if position.get("kind") != "shards":
            raise ValueError(f"checkpoint data position is for {position.get('kind')!r} data, not shards")
        self._epoch, self._batches = int(position["epoch"]), int(position["batches"])
        self._consumed = {int(k): int(v) for k, v in position["consumed"].items()}
