"""Index items are read only from regular files inside the source, within the size cap, unchanged since
indexing: FIFOs, devices and huge files never hang or exhaust a build, and an edited manifest or a swapped
symlink cannot make `Index.image_bytes` (and so `/api/image`) serve a file from elsewhere."""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import simla
from simla.checkpoint import save_checkpoint
from simla.errors import ConfigError, SimlaError
from simla.search import Index
from simla.search.sources import (MAX_ITEM_BYTES, MAX_ITEM_BYTES_ENV, ItemUnavailableError, image_mime_type,
                                  read_item_bytes, resolve_source, scan_source)
from test_search_index import _image, _jpeg, _write

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging: SIGALRM interrupts a blocking open()/read()."""
    def expire(signum, frame):
        raise TimeoutError(f"still blocked after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", queue_size=8, task="base").eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _special_files(root: Path) -> None:
    """Two good images, and a FIFO, a link to /dev/zero and a sparse file over the cap, all named as images."""
    _write(root / "a.png", 0)
    _write(root / "b.png", 1)
    os.mkfifo(root / "fifo.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    with open(root / "huge.png", "wb") as f:
        f.truncate(MAX_ITEM_BYTES + 1)  # sparse: no disk used, but a whole read would be 64 MiB


def test_scan_reports_fifos_devices_oversized_and_outside_files(tmp_path):
    root = tmp_path / "photos"
    _special_files(root)
    _write(tmp_path / "elsewhere.png", 2)
    os.symlink(tmp_path / "elsewhere.png", root / "link.png")
    items, problems = scan_source(resolve_source(root))
    assert [i.key for i in items] == ["a.png", "b.png"]
    found = {p.key: p for p in problems}
    assert set(found) == {"fifo.jpg", "zero.jpg", "huge.png", "link.png"}
    assert (found["fifo.jpg"].kind, found["fifo.jpg"].reason) == ("not_regular", "not a regular file (fifo)")
    assert found["zero.jpg"].reason == "not a regular file (character device)"
    assert found["huge.png"].kind == "too_large" and "larger than 64 MiB" in found["huge.png"].reason
    assert found["link.png"].kind == "outside_source" and str(root) in found["link.png"].reason


def test_cli_build_finishes_and_counts_special_files(tmp_path, checkpoint):
    root, out = tmp_path / "photos", tmp_path / "idx"
    _special_files(root)
    args = ["index", "build", str(root), "--checkpoint", str(checkpoint), "--output", str(out), "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu"]
    code = f"import sys; from simla.cli import main; sys.exit(main({args!r}))"

    def limit_memory():  # today's code read /dev/zero until the OOM killer came; fail fast instead
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         preexec_fn=limit_memory, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 items, 3 files in the error table" in run.stdout
    assert "skipped fifo.jpg: not a regular file (fifo)" in run.stdout
    assert "skipped zero.jpg: not a regular file (character device)" in run.stdout
    assert "skipped huge.png: larger than 64 MiB" in run.stdout
    index = Index.open(out)
    assert {e.key: e.kind for e in index.errors()} == {"fifo.jpg": "not_regular", "zero.jpg": "not_regular",
                                                       "huge.png": "too_large"}
    assert sorted(i.key for i in index.manifest.items()) == ["a.png", "b.png"]


def test_read_item_bytes_never_blocks_on_a_fifo_nor_reads_past_the_cap(tmp_path, monkeypatch):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)
    with _deadline(10), pytest.raises(ItemUnavailableError) as caught:
        read_item_bytes(str(fifo))
    assert caught.value.kind == "not_regular" and "not a regular file (fifo)" in str(caught.value)

    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(2000))
    monkeypatch.setenv(MAX_ITEM_BYTES_ENV, "1000")
    with pytest.raises(ItemUnavailableError) as caught:
        read_item_bytes(str(big))
    assert caught.value.kind == "too_large" and "larger than 1,000 bytes" in str(caught.value)
    _, problems = scan_source(resolve_source(tmp_path))
    assert {p.key: p.kind for p in problems} == {"big.png": "too_large", "fifo.jpg": "not_regular"}

    monkeypatch.setenv(MAX_ITEM_BYTES_ENV, "lots")
    with pytest.raises(ConfigError, match=MAX_ITEM_BYTES_ENV):
        read_item_bytes(str(big))


@pytest.fixture
def small_index(tmp_path, model):
    root = tmp_path / "photos"
    for i in range(3):
        _write(root / f"p{i}.png", i)
    index = Index.build(root, tmp_path / "idx", model=model, batch_size=4, num_workers=0, progress=False)
    items = {item.key: item for item in index.manifest.items()}
    assert set(items) == {"p0.png", "p1.png", "p2.png"}
    return index, root, items


def _set_path(index: Index, key: str, path: str) -> None:
    with sqlite3.connect(index.path / "manifest.sqlite") as db:
        db.execute("UPDATE items SET path = ? WHERE key = ?", (path, key))


def test_an_edited_manifest_path_outside_the_source_is_refused(small_index, tmp_path):
    index, root, items = small_index
    assert index.image_bytes(items["p0.png"].id) == (root / "p0.png").read_bytes()  # untouched items still read

    for target in ("/etc/hostname", str(tmp_path / "p1-copy.png"), str(root / ".." / "p1-copy.png")):
        (tmp_path / "p1-copy.png").write_bytes((root / "p1.png").read_bytes())  # same bytes, same hash
        _set_path(index, "p1.png", target)
        for read in (index.image_bytes, index.load_image, index.thumbnail):
            with pytest.raises(ItemUnavailableError) as caught:
                read(items["p1.png"].id)
            error = caught.value
            assert isinstance(error, SimlaError) and error.kind == "outside_source"
            assert error.key == "p1.png" and error.path == target
            assert "outside the index's source" in str(error) and str(root) in str(error) and target in str(error)


def test_an_indexed_file_replaced_by_a_symlink_outside_is_refused(small_index, tmp_path):
    index, root, items = small_index
    outside = tmp_path / "secret.png"
    outside.write_bytes((root / "p2.png").read_bytes())  # even the very same bytes are not served from there
    (root / "p2.png").unlink()
    os.symlink(outside, root / "p2.png")
    with pytest.raises(ItemUnavailableError) as caught:
        index.image_bytes(items["p2.png"].id)
    assert caught.value.kind == "outside_source" and f"resolves to {outside}" in str(caught.value)

    os.symlink("/etc/passwd", root / "passwd.png")
    _set_path(index, "p2.png", str(root / "passwd.png"))
    with pytest.raises(ItemUnavailableError, match="outside the index's source"):
        index.image_bytes(items["p2.png"].id)


def test_a_file_changed_or_swapped_after_indexing_is_refused(small_index):
    index, root, items = small_index
    _image(7).save(root / "p0.png", format="PNG")  # new pixels
    with pytest.raises(ItemUnavailableError) as caught:
        index.image_bytes(items["p0.png"].id)
    assert caught.value.kind == "changed" and "changed since it was indexed" in str(caught.value)
    assert "simla index update" in str(caught.value)

    data = bytearray((root / "p1.png").read_bytes())
    data[-20] ^= 0xFF  # same size, different bytes: the hash catches it
    (root / "p1.png").write_bytes(bytes(data))
    with pytest.raises(ItemUnavailableError, match="changed since it was indexed"):
        index.image_bytes(items["p1.png"].id)

    (root / "p2.png").unlink()
    os.mkfifo(root / "p2.png")
    with _deadline(10), pytest.raises(ItemUnavailableError) as caught:
        index.image_bytes(items["p2.png"].id)
    assert caught.value.kind == "not_regular"

    index.update(batch_size=4, num_workers=0, progress=False)  # re-embeds p0, records p2 (and corrupt p1)
    now = {item.key: item for item in index.manifest.items()}
    assert index.image_bytes(now["p0.png"].id) == (root / "p0.png").read_bytes()
    assert "p2.png" not in now and {e.key: e.kind for e in index.errors()}["p2.png"] == "not_regular"


def test_annotation_and_shard_items_are_confined(tmp_path, model):
    images = tmp_path / "data" / "imgs"
    for i in range(2):
        _write(images / f"{i}.png", i)
    _write(tmp_path / "outside.png", 5)
    ann = tmp_path / "data" / "ann.json"
    ann.write_text(json.dumps([{"image": "imgs/0.png", "caption": "red"}, {"image": "imgs/1.png", "caption": "green"},
                               {"image": str(tmp_path / "outside.png"), "caption": "not under the image root"}]))
    index = Index.build(ann, tmp_path / "ann_idx", model=model, num_workers=0, progress=False)
    assert len(index) == 2 and [e.kind for e in index.errors()] == ["outside_source"]
    first = index.manifest.items()[0]
    assert index.image_bytes(first.id) == Path(first.path).read_bytes()
    _set_path(index, first.key, str(tmp_path / "outside.png"))
    with pytest.raises(ItemUnavailableError, match="outside the index's source"):
        index.image_bytes(first.id)

    shard = tmp_path / "shards" / "s-000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i in range(2):
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = len(_jpeg(i))
            tar.addfile(info, io.BytesIO(_jpeg(i)))
    other = tmp_path / "other.tar"
    other.write_bytes(shard.read_bytes())
    shard_index = Index.build(str(shard), tmp_path / "shard_idx", model=model, num_workers=0, progress=False)
    item = shard_index.manifest.items()[1]
    assert shard_index.image_bytes(item.id) == _jpeg(1)
    _set_path(shard_index, item.key, str(other))
    with pytest.raises(ItemUnavailableError, match="outside the index's source"):
        shard_index.image_bytes(item.id)


def test_image_mime_type_from_the_bytes():
    def encoded(fmt: str) -> bytes:
        out = io.BytesIO()
        _image(0).save(out, format=fmt)
        return out.getvalue()

    assert image_mime_type(encoded("PNG")) == "image/png"
    assert image_mime_type(encoded("JPEG")) == "image/jpeg"
    assert image_mime_type(encoded("GIF")) == "image/gif"
    assert image_mime_type(encoded("WEBP")) == "image/webp"
    assert image_mime_type(encoded("BMP")) == "image/bmp"
    assert image_mime_type(encoded("TIFF")) == "image/tiff"
    for garbage in (b"", b"<html><script>alert(1)</script>", b"root:x:0:0:root:/root:/bin/bash\n", b"RIFF1234WAVE"):
        assert image_mime_type(garbage) is None
