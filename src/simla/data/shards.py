"""Streaming WebDataset tar shards (as written by img2dataset) with the standard ``tarfile`` module.

A shard is a tar file whose members are grouped into samples by key: ``00042.jpg``, ``00042.txt``
and ``00042.json`` form the sample ``00042``. We read shards ourselves rather than through the
webdataset library so that shard order, the split across ranks and DataLoader workers, the shuffle
buffer and resume-by-skipping are all explicit and testable here.

Determinism: for a fixed shard list, seed, epoch, world size and DataLoader worker count, every
global worker yields the same sequence of samples on every run. Changing the world size or the
worker count changes the split, so an exact resume (:meth:`ShardStream.set_position`) needs the
same world size and worker count as the run that saved the position.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch.utils.data

from simla.data.images import BadSampleError
from simla.data.readers import brace_expand, split_shard_spec


__all__ = [
    "RawSample",
    "ShardStats",
    "ShardStream",
    "count_samples",
    "expand_shards",
    "iter_tar_samples",
    "sample_image_and_caption",
]

logger = logging.getLogger(__name__)

# Image members in order of preference (img2dataset writes one of these per sample).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


@dataclass
class RawSample:
    """One undecoded sample of a shard.

    Attributes:
        key: the member path up to the first dot of its basename (``"part/00042"``).
        shard: the shard file the sample came from.
        files: lower-cased extension without the dot (``"jpg"``, ``"txt"``, ``"json"``) -> bytes.
    """

    key: str
    shard: str
    files: dict[str, bytes]

    @property
    def source(self) -> str:
        """``"shard:key"``, how bad samples are named in logs and errors."""
        return f"{self.shard}:{self.key}"


@dataclass
class ShardStats:
    """Counters for one reading process (with DataLoader workers, each worker keeps its own)."""

    shards_read: int = 0
    shards_failed: int = 0
    samples: int = 0
    failed: list[str] = field(default_factory=list)


def expand_shards(spec: str | Sequence[str]) -> list[str]:
    """Turn a shard specification into the list of existing local shard files.

    Args:
        spec: one pattern, several joined by ``"::"``, or a list of patterns. Patterns may use brace
            expansion (``data/{00000..00099}.tar``, ``{cc3m,sbu}/{000..009}.tar``) and glob wildcards.

    Returns:
        Shard paths in pattern order, duplicates removed.

    Raises:
        ValueError: an empty specification, a remote URL or an unbalanced brace.
        FileNotFoundError: a pattern that matches no file on disk (named in the message).
    """
    patterns = split_shard_spec(spec)
    if not patterns:
        raise ValueError(f"empty shard specification {spec!r}")
    shards: list[str] = []
    for pattern in patterns:
        if pattern.startswith("file://"):
            pattern = pattern[len("file://"):]
        elif "://" in pattern or pattern.startswith("pipe:"):
            raise ValueError(f"shard pattern {pattern!r}: only local paths are supported; copy or mount the "
                             f"shards locally")
        found, missing = [], []
        for candidate in brace_expand(os.path.expanduser(pattern)):
            if glob.has_magic(candidate):
                found.extend(sorted(glob.glob(candidate)))
            elif os.path.isfile(candidate):
                found.append(candidate)
            else:
                missing.append(candidate)
        if not found:
            raise FileNotFoundError(f"shard pattern {pattern!r} matches no file on disk")
        if missing:
            # img2dataset leaves gaps where a whole shard failed to download; train on the rest.
            logger.warning("shard pattern %r: %d of %d shards are missing (e.g. %s); using the %d present",
                           pattern, len(missing), len(missing) + len(found), missing[0], len(found))
        shards.extend(found)
    unique = list(dict.fromkeys(shards))
    if len(unique) < len(shards):
        logger.warning("%d duplicate shards removed from %r", len(shards) - len(unique), spec)
    return unique


def _split_member_name(name: str) -> tuple[str, str]:
    """``"dir/00042.seg.png"`` -> (``"dir/00042"``, ``"seg.png"``): key up to the basename's first dot."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


# HeaderError's subclasses live in tarfile's namespace since Python 3.2, though not in its __all__
# (nor in typeshed): a zero block (end-of-archive marker) and a read of zero bytes (end of file).
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_EMPTY_HEADER: type[Exception] = tarfile.EmptyHeaderError  # type: ignore[attr-defined]


class _EndCheckingTarInfo(tarfile.TarInfo):
    """Records on the TarFile why its member list ended.

    ``tarfile`` stops *silently* when, after the first member, a header is missing (the file was cut
    at a block boundary), truncated or invalid; only a zero block (the end-of-archive marker) means a
    complete archive. Shards copied or downloaded in pieces are typically cut at block boundaries, so
    without this check a truncated shard would pass for a short one.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> _EndCheckingTarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as exc:
            tar.simla_end = exc  # type: ignore[attr-defined]
            raise


def _check_end(tar: tarfile.TarFile) -> None:
    """Raise ``ReadError`` unless ``tar`` (read with :class:`_EndCheckingTarInfo`) ended at its marker."""
    end = getattr(tar, "simla_end", None)
    if not isinstance(end, _EOF_HEADER):
        reason = "no end-of-archive marker" if end is None or isinstance(end, _EMPTY_HEADER) else f"bad header ({end})"
        raise tarfile.ReadError(f"{reason} after offset {tar.offset}")


def iter_tar_samples(path: str, stats: ShardStats | None = None) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in file order, grouping consecutive members by key.

    A corrupt or truncated shard is not fatal: the error is logged with the shard's name, counted in
    ``stats`` and the shard ends there. The sample being assembled when the damage is found is
    dropped, since some of its members may be missing; samples yielded before it are complete.

    Args:
        path: the shard file (plain or compressed tar).
        stats: optional counters to update.
    """
    stats = stats if stats is not None else ShardStats()
    key: str | None = None
    files: dict[str, bytes] = {}
    try:
        # "r|*": a forward-only stream, so memory stays at one member and gzip shards work too.
        with tarfile.open(path, mode="r|*", tarinfo=_EndCheckingTarInfo) as tar:
            while (member := tar.next()) is not None:
                # A stream TarFile appends every header to .members; over a 10k-sample shard that is
                # tens of MB per worker for nothing, since we never look back.
                tar.members = []  # type: ignore[attr-defined]  # stream-mode internals, see above
                if not member.isfile():
                    continue
                member_key, ext = _split_member_name(member.name)
                if os.path.basename(member_key) == "":
                    # Hidden files such as macOS "._00042.jpg" or ".DS_Store" are not samples.
                    logger.debug("%s: skipping member %s", path, member.name)
                    continue
                if member_key != key:
                    if key is not None:
                        stats.samples += 1
                        yield RawSample(key=key, shard=path, files=files)
                    key, files = member_key, {}
                if ext in files:
                    logger.warning("%s: sample %s has two %r members; keeping the last", path, key, ext)
                handle = tar.extractfile(member)
                files[ext] = handle.read() if handle is not None else b""
            _check_end(tar)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        stats.shards_failed += 1
        stats.failed.append(path)
        logger.error("shard %s is corrupt or truncated (%s: %s); skipping the rest of it",
                     path, type(exc).__name__, exc)
        return
    stats.shards_read += 1
    if key is not None:
        stats.samples += 1
        yield RawSample(key=key, shard=path, files=files)


def count_samples(shards: Sequence[str]) -> int:
    """Count the samples of the given shards by reading tar headers only.

    Uncompressed shards are scanned by seeking from header to header, so this costs one small read
    per member rather than reading the images (compressed shards must be decompressed in full).
    Unreadable shards are logged and contribute the samples found before the damage.
    """
    total = 0
    for path in shards:
        key, count = None, 0
        try:
            with tarfile.open(path, mode="r:*", tarinfo=_EndCheckingTarInfo) as tar:
                for member in tar:
                    member_key = _split_member_name(member.name)[0]
                    if member.isfile() and os.path.basename(member_key) and member_key != key:
                        key, count = member_key, count + 1
                _check_end(tar)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            logger.error("shard %s is unreadable while counting (%s: %s); counted %d samples before the damage",
                         path, type(exc).__name__, exc, count)
        total += count
    logger.info("counted %d samples in %d shards", total, len(shards))
    return total


def sample_image_and_caption(sample: RawSample) -> tuple[bytes, str]:
    """Pick the encoded image and the caption of a raw sample.

    The image is the first of ``jpg``, ``jpeg``, ``png``, ``webp`` present. The caption is the
    ``txt`` member decoded as UTF-8, else the ``"caption"`` (or ``"text"``) field of the ``json``
    member. An empty caption is returned as is: the dataset treats it as a bad sample after cleaning,
    exactly as for annotation files.

    Raises:
        simla.data.images.BadSampleError: no image member, no caption, or an undecodable caption.
    """
    image = next((sample.files[ext] for ext in IMAGE_EXTENSIONS if ext in sample.files), None)
    if image is None:
        raise BadSampleError(source=sample.source, reason=f"no image member (found: {sorted(sample.files)})",
                             kind="missing")
    if "txt" in sample.files:
        try:
            return image, sample.files["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadSampleError(source=sample.source, reason=f"caption .txt is not UTF-8: {exc}",
                                 kind="corrupt") from exc
    if "json" in sample.files:
        try:
            meta = json.loads(sample.files["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadSampleError(source=sample.source, reason=f"unreadable .json member: {exc}",
                                 kind="corrupt") from exc
        caption = None
        if isinstance(meta, dict):
            caption = meta.get("caption") if meta.get("caption") is not None else meta.get("text")
        if isinstance(caption, str):
            return image, caption
        raise BadSampleError(source=sample.source, reason="no string 'caption' or 'text' field in the .json member",
                             kind="missing")
    raise BadSampleError(source=sample.source, reason=f"no caption member (found: {sorted(sample.files)})",
                         kind="missing")


# (number of shards, number of global workers) pairs already warned about in this process.
_WARNED_IDLE: set[tuple[int, int]] = set()


class ShardStream(torch.utils.data.IterableDataset):
    """Yield :class:`RawSample` from tar shards, split across ranks and DataLoader workers.

    Each epoch, the shard list is shuffled with a generator seeded by ``(seed, epoch)`` (the same
    order on every rank), then shard ``i`` goes to global worker ``i % (world_size * num_workers)``
    with global worker ``rank * num_workers + worker_id``. Every sample is therefore seen exactly once
    per epoch over all ranks and workers. Each global worker passes its samples through a shuffle
    buffer of ``shuffle_buffer`` samples seeded by ``(seed, epoch, global worker)``; the buffer holds
    encoded bytes, so its memory is about ``shuffle_buffer`` x the mean sample size per worker.

    Call :meth:`set_epoch` before each epoch. The epoch lives on this object, which a DataLoader
    copies into its workers when an iterator is created; with ``persistent_workers=True`` the workers
    would keep the old epoch, so use non-persistent workers (the default).

    Args:
        shards: shard paths (see :func:`expand_shards`).
        rank: this process's rank.
        world_size: number of processes.
        seed: base seed for shard order and the shuffle buffers.
        shuffle_buffer: samples held by each worker's shuffle buffer; <= 1 disables it.
        shuffle: False keeps the shard order and sample order (evaluation, debugging).
    """

    def __init__(self, shards: list[str], *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000, shuffle: bool = True) -> None:
        super().__init__()
        if isinstance(shards, str):
            raise TypeError("shards must be a list of paths; use expand_shards() on a pattern first")
        if not shards:
            raise ValueError("ShardStream needs at least one shard")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.shards = list(shards)
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shuffle = shuffle
        self.epoch = 0
        # (epoch, skip count or per-worker counts, worker role or None), pending until iterated.
        self._skip: tuple[int, int | tuple[int, ...], int | None] | None = None
        self.stats = ShardStats()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order and shuffling the next iteration uses."""
        if self._skip is not None and self._skip[0] != epoch:
            self._skip = None  # a pending resume position belongs to its own epoch only
        self.epoch = epoch

    def set_position(self, epoch: int, samples_to_skip: int | Sequence[int], *,
                     worker_role: int | None = None) -> None:
        """Resume inside ``epoch``: the next iteration skips samples this worker already yielded.

        The skip applies to the first ``n`` samples each global worker of this rank would yield
        (after its shuffle buffer), on raw bytes before any decoding, so it is cheap. Give one int
        for every worker, or a sequence indexed by DataLoader worker id when the workers had yielded
        different counts (a DataLoader takes batches from its workers in turn, so after ``k`` batches
        of size ``B`` worker ``w`` has yielded ``B * ceil((k - w) / num_workers)`` samples as long as no
        worker ran dry). Exact only with the same world size, worker count, seed and shard list.
        Without DataLoader workers the position is used once; with workers, each iterator's worker
        copies use it, so call :meth:`set_epoch` (as every epoch loop does) before iterating again.

        ``worker_role`` (called from inside a DataLoader worker, on its copy) makes the next iteration
        act as worker ``worker_role`` of this rank instead of the worker's own id: its shards, its
        shuffle seed and its skip count. A resuming trainer uses it to rotate roles so that the
        DataLoader's round-robin continues with the worker whose batch was due at the checkpoint.
        """
        counts = samples_to_skip if isinstance(samples_to_skip, int) else tuple(int(n) for n in samples_to_skip)
        if min((counts,) if isinstance(counts, int) else counts, default=0) < 0:
            raise ValueError(f"samples_to_skip must be >= 0, got {samples_to_skip!r}")
        if worker_role is not None and worker_role < 0:
            raise ValueError(f"worker_role must be >= 0, got {worker_role}")
        self.epoch = epoch
        self._skip = (epoch, counts, worker_role)

    def shard_order(self, epoch: int) -> list[str]:
        """The epoch's shard order, identical on every rank (unshuffled when ``shuffle`` is False)."""
        order = list(self.shards)
        if self.shuffle:
            # A str seed is hashed with SHA-512 by random.seed, so it is stable across processes and
            # Python versions (tuple seeds are rejected by Python >= 3.11).
            random.Random(f"simla-shards:{self.seed}:{epoch}").shuffle(order)
        return order

    def _worker(self) -> tuple[int, int, int]:
        """(DataLoader worker id, DataLoader workers per rank, global worker id)."""
        info = torch.utils.data.get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        return worker_id, num_workers, self.rank * num_workers + worker_id

    def _shuffled(self, samples: Iterator[RawSample], rng: random.Random) -> Iterator[RawSample]:
        """A reservoir-style shuffle buffer: fill, then emit a random element for each new one."""
        buffer: list[RawSample] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            index = rng.randrange(len(buffer))
            buffer[index], sample = sample, buffer[index]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[RawSample]:
        worker_id, num_workers, global_worker = self._worker()
        total_workers = self.world_size * num_workers
        epoch = self.epoch
        pending = self._skip if self._skip is not None and self._skip[0] == epoch else None
        self._skip = None  # only in this copy; with workers, set_epoch() clears the parent's
        if pending is not None and pending[2] is not None:
            if pending[2] >= num_workers:
                raise ValueError(f"worker_role {pending[2]} given but this rank has {num_workers} workers")
            worker_id = pending[2]
            global_worker = self.rank * num_workers + worker_id
        order = self.shard_order(epoch)
        mine = order[global_worker::total_workers]
        if len(order) < total_workers and global_worker == len(order) \
                and (len(order), total_workers) not in _WARNED_IDLE:
            _WARNED_IDLE.add((len(order), total_workers))
            logger.warning("only %d shards for %d workers (%d ranks x %d DataLoader workers): %d workers "
                           "will be idle; write more, smaller shards", len(order), total_workers,
                           self.world_size, num_workers, total_workers - len(order))

        skip = 0
        if pending is not None:
            counts = pending[1]
            if isinstance(counts, int):
                skip = counts
            elif len(counts) == num_workers:
                skip = counts[worker_id]
            else:
                raise ValueError(f"set_position got {len(counts)} skip counts for {num_workers} DataLoader "
                                 f"workers; the worker count must match the saved position")
        logger.debug("epoch %d, global worker %d/%d: %d shards, skipping %d samples", epoch, global_worker,
                     total_workers, len(mine), skip)

        def raw() -> Iterator[RawSample]:
            for shard in mine:
                yield from iter_tar_samples(shard, self.stats)

        stream: Iterator[RawSample] = raw()
        if self.shuffle and self.shuffle_buffer > 1:
            stream = self._shuffled(stream, random.Random(f"simla-buffer:{self.seed}:{epoch}:{global_worker}"))
        for index, sample in enumerate(stream):
            if index >= skip:
                yield sample
