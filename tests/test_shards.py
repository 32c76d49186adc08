"""WebDataset shards: brace expansion, grouping, rank/worker splits, shuffling, resume and bad shards."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.utils.data

from simla.data.images import BadSampleError
from simla.data.readers import brace_expand
from simla.data.shards import (
    RawSample,
    ShardStats,
    ShardStream,
    count_samples,
    expand_shards,
    iter_tar_samples,
    sample_image_and_caption,
)

NUM_SHARDS, PER_SHARD = 5, 7


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def sample_members(shard: int, index: int) -> list[tuple[str, bytes]]:
    """img2dataset-like members: mostly jpg+txt+json metadata, some json-only captions, one png."""
    key = f"{shard:05d}{index:04d}"
    image_ext = "png" if (shard, index) == (2, 5) else "jpg"
    members = [(f"{key}.{image_ext}", f"image {key}".encode())]
    meta = {"url": f"http://x/{key}", "key": key, "status": "success", "caption": f"caption {key}"}
    if index != 3:
        members.append((f"{key}.txt", f"caption {key}".encode()))
    members.append((f"{key}.json", json.dumps(meta).encode()))
    return members


@pytest.fixture()
def shard_dir(tmp_path: Path) -> Path:
    for s in range(NUM_SHARDS):
        members = [m for i in range(PER_SHARD) for m in sample_members(s, i)]
        write_tar(tmp_path / f"{s:05d}.tar", members)
    return tmp_path


@pytest.fixture()
def shards(shard_dir: Path) -> list[str]:
    return expand_shards(str(shard_dir / "{00000..00004}.tar"))


ALL_KEYS = {f"{s:05d}{i:04d}" for s in range(NUM_SHARDS) for i in range(PER_SHARD)}


def keys(stream: ShardStream) -> list[str]:
    return [sample.key for sample in stream]


def loader_keys(stream: ShardStream, num_workers: int) -> list[str]:
    # batch_size=None hands samples through unbatched (RawSample is not collatable).
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=num_workers)
    return [sample.key for sample in loader]


class TaggedStream(torch.utils.data.IterableDataset):
    """Tags each sample of a ShardStream with the DataLoader worker that produced it."""

    def __init__(self, stream: ShardStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[tuple[int, str]]:
        worker = torch.utils.data.get_worker_info().id
        for sample in self.stream:
            yield worker, sample.key


def per_worker_keys(stream: ShardStream, num_workers: int = 2) -> dict[int, list[str]]:
    loader = torch.utils.data.DataLoader(TaggedStream(stream), batch_size=None, num_workers=num_workers)
    out: dict[int, list[str]] = {w: [] for w in range(num_workers)}
    for worker, key in loader:
        out[int(worker)].append(key)
    return out


# ---------------------------------------------------------------------------------------------
# Specifications
# ---------------------------------------------------------------------------------------------

def test_brace_expand() -> None:
    assert brace_expand("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert brace_expand("{8..11}") == ["8", "9", "10", "11"]
    assert brace_expand("{098..100}") == ["098", "099", "100"]
    assert brace_expand("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert brace_expand("x{a,b{1..2}}") == ["xa", "xb1", "xb2"]
    assert brace_expand("keep{this}") == ["keep{this}"]
    assert brace_expand("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unbalanced"):
        brace_expand("d/{0..3.tar")


def test_expand_shards_patterns_lists_and_errors(shard_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = str(shard_dir)
    first_two = [f"{d}/00000.tar", f"{d}/00001.tar"]
    assert expand_shards(f"{d}/{{00000..00001}}.tar") == first_two
    assert expand_shards(f"{d}/00000.tar::{d}/00001.tar") == first_two
    assert expand_shards([f"{d}/00000.tar", f"file://{d}/00001.tar"]) == first_two
    assert expand_shards(f"{d}/0000[34].tar") == [f"{d}/00003.tar", f"{d}/00004.tar"]
    with caplog.at_level(logging.WARNING, logger="simla.data.shards"):
        assert len(expand_shards(f"{d}/{{00000..00009}}.tar")) == NUM_SHARDS  # gaps are tolerated
    assert "5 of 10 shards are missing" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"'.*/{00010..00019}\.tar' matches no file"):
        expand_shards(f"{d}/00000.tar::{d}/{{00010..00019}}.tar")
    with pytest.raises(ValueError, match="only local paths"):
        expand_shards("s3://bucket/{0..9}.tar")
    with pytest.raises(ValueError, match="empty shard specification"):
        expand_shards("")


# ---------------------------------------------------------------------------------------------
# Reading shards and samples
# ---------------------------------------------------------------------------------------------

def test_iter_tar_samples_groups_members_by_key(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "s.tar", [
        ("dir/a.JPG", b"A"), ("dir/a.txt", b"cap a"), ("dir/a.seg.png", b"S"),
        ("dir/b.jpg", b"B"), ("dir/._b.jpg", b"junk"), ("other/b.txt", b"cap b"),
    ])
    stats = ShardStats()
    samples = list(iter_tar_samples(path, stats))
    assert samples == [
        RawSample(key="dir/a", shard=path, files={"jpg": b"A", "txt": b"cap a", "seg.png": b"S"}),
        RawSample(key="dir/b", shard=path, files={"jpg": b"B"}),
        RawSample(key="other/b", shard=path, files={"txt": b"cap b"}),
    ]
    assert (stats.shards_read, stats.shards_failed, stats.samples) == (1, 0, 3)


def test_sample_image_and_caption() -> None:
    def sample(**files: bytes) -> RawSample:
        return RawSample(key="k", shard="s.tar", files=files)

    assert sample_image_and_caption(sample(jpg=b"J", txt=b"a cat", json=b'{"caption": "no"}')) == (b"J", "a cat")
    assert sample_image_and_caption(sample(png=b"P", json=b'{"caption": "from json"}')) == (b"P", "from json")
    assert sample_image_and_caption(sample(webp=b"W", json=b'{"caption": null, "text": "t"}')) == (b"W", "t")
    assert sample_image_and_caption(sample(png=b"P", jpg=b"J", txt=b"x"))[0] == b"J"  # jpg preferred
    assert sample_image_and_caption(sample(jpg=b"J", txt=b"")) == (b"J", "")  # the dataset rejects it later
    for files, reason in [({"txt": b"x", "json": b"{}"}, "no image member"),
                          ({"jpg": b"J", "json": b'{"url": "u"}'}, "no string 'caption'"),
                          ({"jpg": b"J", "json": b"{oops"}, "unreadable .json"),
                          ({"jpg": b"J", "txt": b"\xff\xfe"}, "not UTF-8"),
                          ({"jpg": b"J"}, "no caption member")]:
        with pytest.raises(BadSampleError) as info:
            sample_image_and_caption(sample(**files))
        assert info.value.source == "s.tar:k"
        assert reason in info.value.reason


def test_every_fixture_sample_has_image_and_caption(shards: list[str]) -> None:
    samples = [s for shard in shards for s in iter_tar_samples(shard)]
    assert {s.key for s in samples} == ALL_KEYS
    for s in samples:
        image, caption = sample_image_and_caption(s)
        assert image == f"image {s.key}".encode() and caption == f"caption {s.key}"
    assert sum("png" in s.files for s in samples) == 1


def test_truncated_shard_is_logged_and_survived(shards: list[str], caplog: pytest.LogCaptureFixture) -> None:
    data = Path(shards[1]).read_bytes()
    Path(shards[1]).write_bytes(data[: len(data) // 2])
    stream = ShardStream(shards, shuffle=False)
    with caplog.at_level(logging.ERROR, logger="simla.data.shards"):
        seen = keys(stream)
    assert f"shard {shards[1]} is corrupt or truncated" in caplog.text
    assert len(seen) == len(set(seen))
    assert {k for k in ALL_KEYS if not k.startswith("00001")} <= set(seen)
    assert 0 < sum(k.startswith("00001") for k in seen) < PER_SHARD  # the part before the damage
    assert stream.stats.shards_failed == 1 and stream.stats.failed == [shards[1]]


def test_shard_cut_at_a_block_boundary_is_detected(shards: list[str], caplog: pytest.LogCaptureFixture) -> None:
    # tarfile itself ends silently when a file stops exactly between members; the missing
    # end-of-archive marker gives it away. Cut right before sample 3's first member.
    with tarfile.open(shards[0]) as tar:
        cut = tar.getmember("000000003.jpg").offset
    Path(shards[0]).write_bytes(Path(shards[0]).read_bytes()[:cut])
    stats = ShardStats()
    with caplog.at_level(logging.ERROR, logger="simla.data.shards"):
        samples = list(iter_tar_samples(shards[0], stats))
    assert "no end-of-archive marker" in caplog.text and shards[0] in caplog.text
    # Sample 2 might have lost members after the cut, so it is dropped with the damaged tail.
    assert [s.key for s in samples] == ["000000000", "000000001"]
    assert stats.shards_failed == 1


def test_corrupt_header_is_detected(shards: list[str], caplog: pytest.LogCaptureFixture) -> None:
    with tarfile.open(shards[0]) as tar:
        offset = tar.getmember("000000004.jpg").offset
    data = bytearray(Path(shards[0]).read_bytes())
    data[offset + 100: offset + 200] = b"\xff" * 100  # clobber mode/uid/checksum fields
    Path(shards[0]).write_bytes(bytes(data))
    with caplog.at_level(logging.ERROR, logger="simla.data.shards"):
        samples = list(iter_tar_samples(shards[0]))
    assert "bad header" in caplog.text
    assert len(samples) == 3


def test_sample_missing_its_image_raises_bad_sample(tmp_path: Path) -> None:
    path = write_tar(tmp_path / "s.tar", [("k1.txt", b"only text"), ("k2.jpg", b"J"), ("k2.txt", b"ok")])
    first, second = ShardStream([path], shuffle=False)
    with pytest.raises(BadSampleError, match=r"s\.tar:k1: no image member"):
        sample_image_and_caption(first)
    assert sample_image_and_caption(second) == (b"J", "ok")


# ---------------------------------------------------------------------------------------------
# Splitting, shuffling, resuming
# ---------------------------------------------------------------------------------------------

def test_each_sample_once_per_epoch_across_ranks(shards: list[str]) -> None:
    for epoch in range(3):
        per_rank = []
        for rank in range(2):
            stream = ShardStream(shards, rank=rank, world_size=2, seed=3, shuffle_buffer=4)
            stream.set_epoch(epoch)
            per_rank.append(keys(stream))
        assert not set(per_rank[0]) & set(per_rank[1])
        assert Counter(per_rank[0] + per_rank[1]) == Counter(ALL_KEYS)


@pytest.mark.parametrize("world_size", [1, 2])
def test_each_sample_once_per_epoch_across_dataloader_workers(shards: list[str], world_size: int) -> None:
    streams = [ShardStream(shards, rank=r, world_size=world_size, seed=1, shuffle_buffer=5)
               for r in range(world_size)]
    per_rank_worker: list[set[str]] = []
    everything: list[str] = []
    for stream in streams:
        stream.set_epoch(1)
        # Keys carry their shard, and shard i goes to worker i % n, so group the output per shard.
        seen = loader_keys(stream, num_workers=2)
        everything += seen
        per_rank_worker.append({k[:5] for k in seen})
    assert Counter(everything) == Counter(ALL_KEYS)  # disjoint and complete
    if world_size == 2:
        assert not per_rank_worker[0] & per_rank_worker[1]


def test_dataloader_workers_get_disjoint_shards(shards: list[str]) -> None:
    stream = ShardStream(shards, seed=0, shuffle_buffer=3)
    by_worker = {w: set(keys) for w, keys in per_worker_keys(stream).items()}
    assert sum(map(len, by_worker.values())) == len(ALL_KEYS) and by_worker[0] | by_worker[1] == ALL_KEYS
    assert not by_worker[0] & by_worker[1]
    # Worker 0 got shards 0, 2, 4 of the epoch's order, worker 1 shards 1, 3: whole shards each.
    order = [Path(s).stem for s in stream.shard_order(0)]
    assert {k[:5] for k in by_worker[0]} == {order[0], order[2], order[4]}
    assert {k[:5] for k in by_worker[1]} == {order[1], order[3]}


def test_shuffling_differs_by_epoch_and_is_reproducible(shards: list[str]) -> None:
    def run(seed: int, epoch: int) -> list[str]:
        stream = ShardStream(shards, seed=seed, shuffle_buffer=10)
        stream.set_epoch(epoch)
        return keys(stream)

    assert run(0, 0) == run(0, 0)
    assert run(0, 0) != run(0, 1)
    assert run(0, 0) != run(1, 0)
    assert sorted(run(0, 1)) == sorted(ALL_KEYS)
    # Samples are mixed across shard boundaries, not just shard order permuted.
    first_shards = [k[:5] for k in run(0, 0)[:PER_SHARD]]
    assert len(set(first_shards)) > 1
    # shuffle=False: shards and samples in the given order.
    assert keys(ShardStream(shards, shuffle=False)) == sorted(ALL_KEYS)


def test_set_position_skips_exactly_the_head(shards: list[str]) -> None:
    stream = ShardStream(shards, seed=5, shuffle_buffer=6)
    stream.set_epoch(2)
    full = keys(stream)
    stream.set_position(2, 11)
    assert keys(stream) == full[11:]
    assert keys(stream) == full  # the position is used once
    stream.set_position(2, 100)
    assert keys(stream) == []
    stream.set_position(2, 3)
    stream.set_epoch(3)  # moving to another epoch discards the pending position
    assert len(keys(stream)) == len(ALL_KEYS)


def test_set_position_with_dataloader_workers_and_ranks(shards: list[str]) -> None:
    stream = ShardStream(shards, rank=1, world_size=2, seed=2, shuffle_buffer=4)
    stream.set_epoch(4)
    full = per_worker_keys(stream)
    assert all(full.values())  # rank 1 = global workers 2 and 3, each with one shard of five
    stream.set_position(4, 2)
    assert per_worker_keys(stream) == {w: keys[2:] for w, keys in full.items()}
    stream.set_position(4, [0, 3])  # per DataLoader worker id
    assert per_worker_keys(stream) == {0: full[0], 1: full[1][3:]}
    stream.set_position(4, [1])
    with pytest.raises(ValueError, match="worker count must match"):
        per_worker_keys(stream)


class RotatedRoles(torch.utils.data.IterableDataset):
    """Worker w plays role (w + 1) % 2 and skips `skip` samples, as a resuming trainer does."""

    def __init__(self, stream: ShardStream, skip: int) -> None:
        self.stream, self.skip = stream, skip

    def __iter__(self) -> Iterator[tuple[int, str]]:
        role = (torch.utils.data.get_worker_info().id + 1) % 2
        self.stream.set_epoch(self.stream.epoch)
        self.stream.set_position(self.stream.epoch, self.skip, worker_role=role)
        for sample in self.stream:
            yield role, sample.key


def test_worker_role_takes_over_another_workers_share(shards: list[str]) -> None:
    stream = ShardStream(shards, rank=0, world_size=1, seed=9, shuffle_buffer=4)
    stream.set_epoch(1)
    full = per_worker_keys(stream)
    loader = torch.utils.data.DataLoader(RotatedRoles(stream, skip=2), batch_size=None, num_workers=2)
    by_role: dict[int, list[str]] = {0: [], 1: []}
    for role, key in loader:
        by_role[int(role)].append(key)
    assert by_role == {w: keys[2:] for w, keys in full.items()}
    stream.set_position(1, 0, worker_role=1)
    with pytest.raises(ValueError, match="worker_role 1 given but this rank has 1 workers"):
        keys(stream)


def test_count_samples(shards: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert count_samples(shards) == len(ALL_KEYS)
    odd = write_tar(tmp_path / "odd.tar", [("a.jpg", b"A"), ("a.txt", b"x"), ("._a.jpg", b"junk"), ("b.jpg", b"B")])
    assert count_samples([odd]) == 2
    data = Path(shards[0]).read_bytes()
    Path(shards[0]).write_bytes(data[:1500])  # inside sample 0's second member
    with caplog.at_level(logging.ERROR, logger="simla.data.shards"):
        assert count_samples(shards) == len(ALL_KEYS) - PER_SHARD + 1
    assert f"shard {shards[0]} is unreadable while counting" in caplog.text


def test_fewer_shards_than_workers_warns(shards: list[str], caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []
    with caplog.at_level(logging.WARNING, logger="simla.data.shards"):
        for rank in range(7):
            seen += keys(ShardStream(shards[:2], rank=rank, world_size=7))
    assert sorted(seen) == sorted(k for k in ALL_KEYS if k[:5] in {"00000", "00001"})
    assert caplog.text.count("only 2 shards for 7 workers") == 1


def test_constructor_validation(shards: list[str]) -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        ShardStream([])
    with pytest.raises(TypeError, match="expand_shards"):
        ShardStream("data/{0..3}.tar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rank"):
        ShardStream(shards, rank=2, world_size=2)
    with pytest.raises(ValueError, match=">= 0"):
        ShardStream(shards).set_position(0, -1)
    with pytest.raises(ValueError, match=">= 0"):
        ShardStream(shards).set_position(0, [0, -1])
    with pytest.raises(ValueError, match="worker_role"):
        ShardStream(shards).set_position(0, 0, worker_role=-1)
