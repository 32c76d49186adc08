"""simla.search.Index: build, incremental update, resume, bad files, model fingerprint, search and re-rank."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import simla
from simla.checkpoint import save_checkpoint
from simla.search import Index, ModelMismatchError
from simla.search.build import sync_index
from simla.search.sources import resolve_source, scan_source

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (240, 220, 40), (200, 40, 200), (30, 200, 200)]


def _image(seed: int, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), COLOURS[seed % len(COLOURS)], dtype=np.uint8)
    x, y = rng.integers(0, size - 16, 2)
    pixels[y:y + 16, x:x + 16] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def _write(path: Path, seed: int, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(seed).save(path, format=fmt)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", queue_size=8, task="base").eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i in range(10):
        _write(root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png", i)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"")
    return root


def _build(photos: Path, out: Path, checkpoint: Path, **kw) -> Index:
    return Index.build(photos, out, checkpoint=checkpoint, batch_size=4, num_workers=0, progress=False, **kw)


def _brute_force(model, features: torch.Tensor, text: str) -> torch.Tensor:
    with torch.no_grad():
        return features @ model.encode_text([text])[0]


def test_build_counts_bad_files_and_search_equals_brute_force(photos, tmp_path, checkpoint, model):
    index = _build(photos, tmp_path / "idx", checkpoint)
    summary = index.last_summary
    assert (summary.scanned, summary.added, summary.embedded) == (12, 12, 10)
    assert summary.failed == 2 and summary.items == 10 and summary.errors == 2
    errors = {e.key: e for e in index.errors()}
    assert set(errors) == {"broken.jpg", "empty.png"}
    assert errors["empty.png"].kind == "truncated" and "empty" in errors["empty.png"].reason

    # The stored features are the model's own (float16), in the manifest's item order.
    keys = [item.key for item in index.manifest.items()]
    assert keys == sorted(keys) and "sub/img00.png" in keys
    pixels = model.prepare_pixels([str(photos / key) for key in keys])
    with torch.no_grad():
        expected = model.encode_image(pixels)
    ids, stored = simla.search.store.load_live_features(index.path, index.manifest)
    assert torch.allclose(torch.from_numpy(stored).float(), expected, atol=2e-3)

    sims = _brute_force(model, torch.from_numpy(stored).float(), "a red square")
    hits = index.search("a red square", k=10, dedup=None)
    assert [h.item_id for h in hits] == [int(ids[i]) for i in torch.argsort(sims, descending=True, stable=True)]
    assert [h.rank for h in hits] == list(range(1, 11))
    assert np.allclose([h.itc for h in hits], sorted(sims.tolist(), reverse=True), atol=1e-5)
    assert all(h.itm is None and h.score == h.itc for h in hits)
    # Paging returns the same ranking in slices.
    assert [h.item_id for h in index.search("a red square", k=3, offset=4, dedup=None)] == [h.item_id for h in hits[4:7]]


def test_rerank_equals_one_pair_at_a_time_itm(photos, tmp_path, checkpoint, model):
    index = _build(photos, tmp_path / "idx", checkpoint)
    text = "a green square"
    plain = index.search(text, k=10, dedup=None)
    hits = index.search(text, k=10, rerank=6, dedup=None, batch_size=4)  # batches span 4 + 2 candidates
    top6 = {h.item_id for h in plain[:6]}
    assert {h.item_id for h in hits[:6]} == top6 and [h.item_id for h in hits[6:]] == [h.item_id for h in plain[6:]]
    for hit in hits[:6]:
        pixels = model.prepare_pixels([str(photos / hit.key)])
        with torch.no_grad():
            alone = float(model.itm_score(pixels, [text])[0])
        assert hit.itm == pytest.approx(alone, abs=1e-5) and hit.score == pytest.approx(alone, abs=1e-5)
    assert [h.score for h in hits[:6]] == sorted((h.score for h in hits[:6]), reverse=True)
    fused = index.search(text, k=6, rerank=6, dedup=None, itc_weight=0.5)
    assert all(h.score == pytest.approx(h.itm + 0.5 * h.itc) for h in fused)


def test_image_query_finds_itself_and_dedup_collapses_copies(photos, tmp_path, checkpoint):
    for copy in ("copy_a.png", "copy_b.png"):
        _write(photos / copy, 3)  # the same pixels as img03.png
    index = _build(photos, tmp_path / "idx", checkpoint)
    hits = index.search(image=photos / "sub" / "img03.png", k=3, dedup=None)
    assert {h.key for h in hits} == {"sub/img03.png", "copy_a.png", "copy_b.png"}
    assert hits[0].itc == pytest.approx(1.0, abs=1e-3)
    collapsed = index.search(image=photos / "sub" / "img03.png", k=3, dedup=0.999)
    assert sorted([collapsed[0].key] + collapsed[0].duplicates) == ["copy_a.png", "copy_b.png", "sub/img03.png"]
    assert len(collapsed) == 3 and all(h.key not in collapsed[0].duplicates for h in collapsed[1:])
    with pytest.raises(ValueError, match="text query, an image query"):
        index.search(k=3)
    with pytest.raises(ValueError, match="k must be"):
        index.search("x", k=0)


def test_incremental_update_adds_changes_and_deletes(photos, tmp_path, checkpoint, model):
    index = _build(photos, tmp_path / "idx", checkpoint)
    before = {item.key: item for item in index.manifest.items()}
    _write(photos / "new" / "added.png", 40)  # added
    _write(photos / "img01.png", 41)  # changed bytes
    os.utime(photos / "img02.png", ns=(1, 1))  # touched: new time, same bytes
    (photos / "img04.png").unlink()  # deleted
    _write(photos / "broken.jpg", 42, fmt="JPEG")  # a bad file repaired
    summary = index.update(batch_size=4, num_workers=0, progress=False)
    assert (summary.added, summary.changed, summary.deleted, summary.touched) == (2, 1, 1, 1)  # broken.jpg, repaired, is new to the index
    assert summary.embedded == 3 and summary.items == 11 and summary.errors == 1
    after = {item.key: item for item in index.manifest.items()}
    assert "img04.png" not in after and "new/added.png" in after and "broken.jpg" in after
    assert after["img01.png"].id == before["img01.png"].id and after["img01.png"].sha256 != before["img01.png"].sha256
    assert after["img02.png"].mtime_ns == 1 and after["img02.png"].sha256 == before["img02.png"].sha256
    # The changed file's feature is its new image's; feature files were merged into one.
    assert len(index.manifest.chunks()) == 1 and len(list((index.path / "features").iterdir())) == 1
    hit = index.search(image=photos / "img01.png", k=1, dedup=None)[0]
    assert hit.key == "img01.png" and hit.itc == pytest.approx(1.0, abs=1e-3)
    # Nothing changed: nothing is embedded.
    again = index.update(batch_size=4, num_workers=0, progress=False)
    assert again.embedded == 0 and again.unchanged == 11 and again.skipped_errors == 1


def test_model_mismatch_is_refused(photos, tmp_path, checkpoint):
    _build(photos, tmp_path / "idx", checkpoint)
    torch.manual_seed(1)
    other = simla.create_model("simla_tiny", queue_size=8, task="base")
    other_path = save_checkpoint(other, tmp_path / "other.pt")
    with pytest.raises(ModelMismatchError, match="another model"):
        Index.open(tmp_path / "idx", checkpoint=other_path).search("a red square")
    with pytest.raises(ModelMismatchError):
        Index.open(tmp_path / "idx", model=other)
    with pytest.raises(FileExistsError, match="index update"):
        _build(photos, tmp_path / "idx", checkpoint)


def test_interrupted_build_resumes_without_redoing_batches(photos, tmp_path, checkpoint, model, monkeypatch):
    import simla.search.build as build

    calls = {"n": 0}
    real_add = build.Manifest.add_batch

    def dying_add(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed between writing the second batch's features and committing them
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(build.Manifest, "add_batch", dying_add)
    with pytest.raises(KeyboardInterrupt):
        _build(photos, tmp_path / "idx", checkpoint)
    monkeypatch.setattr(build.Manifest, "add_batch", real_add)
    index = Index.open(tmp_path / "idx")
    # The first batch (broken.jpg, empty.png, img01.png, img02.png) survived: two items, two errors.
    assert index.manifest.get_meta("complete") is False and len(index) == 2 and index.manifest.count_errors() == 2
    assert len(list((index.path / "features").iterdir())) == 2  # one registered, one orphan
    resumed = _build(photos, tmp_path / "idx", checkpoint)
    summary = resumed.last_summary
    assert (summary.unchanged, summary.skipped_errors, summary.embedded, summary.items) == (2, 2, 8, 10)
    assert resumed.manifest.get_meta("complete") is True
    assert len(list((resumed.path / "features").iterdir())) == 1


def test_killed_build_process_resumes(photos, tmp_path, checkpoint):
    """A real SIGKILL mid-build (after the first committed batch) leaves a usable, resumable index."""
    script = f"""
import os, signal, sys
import simla.search.manifest as manifest
from simla.search import Index
real = manifest.Manifest.add_batch
def add_then_die(self, *a, **k):
    real(self, *a, **k)
    os.kill(os.getpid(), signal.SIGKILL)
manifest.Manifest.add_batch = add_then_die
Index.build({str(photos)!r}, {str(tmp_path / 'idx')!r}, checkpoint={str(checkpoint)!r}, batch_size=4,
            num_workers=0, progress=False)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    with sqlite3.connect(tmp_path / "idx" / "manifest.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 2
    index = _build(photos, tmp_path / "idx", checkpoint)
    assert index.last_summary.embedded == 8 and len(index) == 10


def test_annotation_and_shard_sources(tmp_path, checkpoint):
    images = tmp_path / "imgs"
    for i in range(4):
        _write(images / f"{i}.png", i)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"image": "imgs/0.png", "caption": "a red one"},
                               {"image": "imgs/0.png", "caption": ["red again", "a red one"]},
                               {"image": "imgs/1.png", "caption": "green"},
                               {"image": "imgs/missing.png", "caption": "gone"}]))
    index = Index.build(ann, tmp_path / "ann_idx", checkpoint=checkpoint, num_workers=0, progress=False)
    items = {Path(i.key).name: i for i in index.manifest.items()}
    assert set(items) == {"0.png", "1.png"} and items["0.png"].caption == "a red one\nred again"
    assert [Path(e.key).name for e in index.errors()] == ["missing.png"]

    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            for ext, data in (("jpg", _jpeg(i)), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("00009.txt")  # a sample without an image
        info.size = 2
        tar.addfile(info, io.BytesIO(b"no"))
    spec = resolve_source(str(shard))
    listed, problems = scan_source(spec)
    assert [i.key for i in listed] == ["shard-000.tar:00000", "shard-000.tar:00001", "shard-000.tar:00002"]
    assert listed[1].caption == "caption 1" and problems[0].key == "shard-000.tar:00009"
    shard_index = Index.build(str(shard), tmp_path / "shard_idx", checkpoint=checkpoint, num_workers=0, progress=False)
    assert len(shard_index) == 3 and shard_index.image_bytes(shard_index.manifest.items()[2].id) == _jpeg(2)
    thumb = Image.open(io.BytesIO(shard_index.thumbnail(shard_index.manifest.items()[0].id, size=16)))
    assert thumb.format == "JPEG" and max(thumb.size) <= 16


def _jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    _image(seed).save(out, format="JPEG", quality=95)
    return out.getvalue()


def test_an_empty_source_gives_an_empty_index(tmp_path, checkpoint):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "bad.png").write_bytes(b"")
    index = _build(tmp_path / "photos", tmp_path / "idx", checkpoint)
    assert len(index) == 0 and index.last_summary.errors == 1
    assert index.search("a cat", k=5, rerank=3) == [] and index.search(image=_image(0), k=2) == []


def test_bad_sources_fail_before_work(tmp_path, checkpoint):
    with pytest.raises(FileNotFoundError, match="source not found"):
        Index.build(tmp_path / "nope", tmp_path / "idx", checkpoint=checkpoint)
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ValueError, match="not a folder"):
        Index.build(tmp_path / "x.bin", tmp_path / "idx", checkpoint=checkpoint)
    with pytest.raises(simla.search.IndexNotFoundError, match="no simla index"):
        Index.open(tmp_path)
    assert not (tmp_path / "idx").exists()


def test_sync_rejects_bad_arguments(tmp_path, model):
    with pytest.raises(ValueError, match="precision"):
        sync_index(tmp_path, None, None, model, precision="fp8")


def test_bf16_build_and_combined_text_image_query(photos, tmp_path, checkpoint, model):
    fp32 = _build(photos, tmp_path / "fp32", checkpoint, precision="fp32")
    bf16 = _build(photos, tmp_path / "bf16", checkpoint, precision="bf16")
    _, a = simla.search.store.load_live_features(fp32.path, fp32.manifest)
    _, b = simla.search.store.load_live_features(bf16.path, bf16.manifest)
    cosines = (torch.from_numpy(a).float() * torch.from_numpy(b).float()).sum(-1)
    assert cosines.min() > 0.98
    # Text and image together: the normalised sum of the two query features.
    query_image = photos / "img05.png"
    with torch.no_grad():
        both = torch.nn.functional.normalize(
            model.encode_text(["a red square"])[0] + model.encode_image(model.prepare_pixels(query_image))[0], dim=0)
    ids, stored = simla.search.store.load_live_features(fp32.path, fp32.manifest)
    expected = torch.from_numpy(stored).float() @ both
    hits = fp32.search("a red square", image=query_image, k=3)
    assert [h.item_id for h in hits] == [int(ids[i]) for i in torch.argsort(expected, descending=True)[:3]]
    assert hits[0].itc == pytest.approx(float(expected.max()), abs=1e-5)


def test_paging_a_reranked_query_scores_each_pair_once(photos, tmp_path, checkpoint, monkeypatch):
    import simla.search.index as index_module

    index = _build(photos, tmp_path / "idx", checkpoint)
    scored = []
    real = index_module.itm_probabilities

    def counting(model, text, item_ids, *args, **kwargs):
        scored.extend(item_ids)
        return real(model, text, item_ids, *args, **kwargs)

    monkeypatch.setattr(index_module, "itm_probabilities", counting)  # the name the index calls
    first = index.search("a blue square", k=3, rerank=6)
    second = index.search("a blue square", k=3, rerank=6, offset=3)
    assert len(scored) == 6 and len(set(scored)) == 6
    assert [h.item_id for h in first + second] == [h.item_id for h in index.search("a blue square", k=6, rerank=6)]
    index.search("another text", k=3, rerank=2)
    assert len(scored) == 8
    index.update(num_workers=0, progress=False)  # the cache does not outlive the features it describes
    index.search("a blue square", k=3, rerank=6)
    assert len(scored) == 14
