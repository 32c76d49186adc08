"""An index left running: the write lock, corruption checks and repair, chunk paths confined to the index."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_search_index import _write

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.errors import SimlaError
from simla.search import Index
from simla.search.index import ItemNotFoundError
from simla.search.lock import LOCK_NAME, IndexBusyError, write_lock
from simla.search.manifest import MANIFEST_NAME, CorruptIndexError, Manifest
from simla.search.store import FEATURES_DIR, compact, remove_orphans

SRC = Path(simla.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=8, task="base")
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def index(tmp_path, checkpoint) -> Path:
    photos = tmp_path / "photos"
    for i in range(6):
        _write(photos / f"p{i}.png", i)
    out = tmp_path / "idx"
    assert main(["index", "build", str(photos), "--checkpoint", str(checkpoint), "--output", str(out),
                 "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    return out


def _update(index: Path) -> list[str]:
    return ["index", "update", str(index), "--num-workers", "0", "--device", "cpu", "--quiet"]


def _chunk_file(index: Path) -> Path:
    manifest = Manifest(index / MANIFEST_NAME)
    (_, file, _), = manifest.chunks()
    manifest.close()
    return index / file


def _healthy_and_searchable(index: Path, items: int, capsys) -> None:
    capsys.readouterr()
    assert main(["index", "check", str(index)]) == 0, capsys.readouterr()
    assert "healthy" in capsys.readouterr().out
    found = Index.open(index)
    assert len(found) == items and len(found.search("a red square", k=items)) == items
    found.close()


# ------------------------------------------------------------------------------------------------ the lock
def test_concurrent_updates_are_serialised_or_refused(index, capsys):
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "simla.cli", *_update(index)]
    for round_ in range(3):
        _write(index.parent / "photos" / f"new{round_}.png", 10 + round_)
        runs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
        results = [(run.wait(timeout=120), run.stdout.read(), run.stderr.read()) for run in runs]
        assert min(rc for rc, _, _ in results) == 0, results
        for rc, _, err in results:
            assert rc == 0 or (rc == 2 and "is being updated by another process (pid" in err
                               and err.count("\n") == 1), results
    _healthy_and_searchable(index, 9, capsys)


def test_a_held_lock_refuses_a_second_writer_at_once(index, capsys):
    fd = os.open(index / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # another open file: as another process would
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"4242\n")
        assert main(_update(index)) == 2
        assert f"index {index} is being updated by another process (pid 4242); try again" in capsys.readouterr().err
        assert main(["index", "check", str(index), "--repair"]) == 2
        assert main(["index", "info", str(index)]) == 0  # readers never wait for the lock
        with pytest.raises(IndexBusyError), write_lock(index):
            pass
    finally:
        os.close(fd)
    with write_lock(index), write_lock(index):  # free again, and re-entrant within a process
        pass


def test_remove_orphans_spares_other_writers_files(index):
    features = index / FEATURES_DIR
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live_tmp = features / f"{'a' * 32}.npy.{os.getppid()}.tmp"  # a live process's file being written
    dead_tmp = features / f"{'b' * 32}.npy.{dead.pid}.tmp"
    unregistered = features / f"{'c' * 32}.npy"
    stranger = features / "notes.txt"
    for path in (live_tmp, dead_tmp, unregistered, stranger):
        path.write_bytes(b"x")
    registered = _chunk_file(index)
    manifest = Manifest(index / MANIFEST_NAME)
    assert remove_orphans(index, manifest) == 2
    manifest.close()
    assert live_tmp.exists() and stranger.exists() and registered.exists()
    assert not dead_tmp.exists() and not unregistered.exists()


# ------------------------------------------------------------------------------------------------ manifest
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:16] = b"not an sqlite db"
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize("damage", [_truncate, _garbage, _header, _empty])
def test_a_corrupt_manifest_is_one_clear_line(index, capsys, damage):
    damage(index / MANIFEST_NAME)
    capsys.readouterr()
    for command in (["index", "info", str(index)], ["search", str(index), "a red square"], _update(index)):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("simla: error: ")
        assert f"{index / MANIFEST_NAME}" in err and "manifest is damaged" in err and "simla index check" in err
    assert main(["index", "check", str(index)]) == 1
    assert "DAMAGED manifest" in capsys.readouterr().out
    with pytest.raises(CorruptIndexError):
        Index.open(index)


def test_repair_of_an_unreadable_manifest_says_how_to_rebuild(index, capsys):
    _garbage(index / MANIFEST_NAME)
    capsys.readouterr()
    assert main(["index", "check", str(index), "--repair"]) == 1
    out = capsys.readouterr().out
    assert f"move {index} away and run `simla index build SOURCE --checkpoint C --output {index}`" in out


# ------------------------------------------------------------------------------------------------ chunks
def _nan(path: Path) -> None:
    data = np.load(path)
    data[0, 0] = np.nan
    np.save(path, data)


def _wrong_shape(path: Path) -> None:
    np.save(path, np.load(path)[:, :-1])


def _wrong_dtype(path: Path) -> None:
    np.save(path, np.load(path).astype(np.float32))


def _cut(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 40])


def _missing(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage", [_nan, _wrong_shape, _wrong_dtype, _cut, _missing])
def test_a_damaged_chunk_is_found_and_repaired(index, capsys, damage):
    chunk = _chunk_file(index)
    damage(chunk)
    capsys.readouterr()
    assert main(["index", "check", str(index)]) == 1
    out = capsys.readouterr().out
    assert "DAMAGED" in out and chunk.name in out
    for command in (["search", str(index), "a red square"], _update(index)):  # never a false success
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"feature chunk '{FEATURES_DIR}/{chunk.name}'" in err and "--repair" in err
    assert main(["index", "check", str(index), "--repair", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "dropped 1 damaged chunk(s) and their 6 item(s)" in out and "embedded 6 image(s)" in out
    _healthy_and_searchable(index, 6, capsys)


def test_repair_without_the_checkpoint_says_to_update(index, capsys, tmp_path):
    _nan(_chunk_file(index))
    db = sqlite3.connect(index / MANIFEST_NAME)
    db.execute("UPDATE meta SET value = ? WHERE key = 'checkpoint'", ('"' + str(tmp_path / "gone.pt") + '"',))
    db.commit()
    db.close()
    capsys.readouterr()
    assert main(["index", "check", str(index), "--repair"]) == 0  # consistent again, with 6 images fewer
    out = capsys.readouterr().out
    assert f"run `simla index update {index} --checkpoint C` to embed the 6 dropped image(s) again" in out


# ------------------------------------------------------------------------------------------------ confinement
def _point_outside(index: Path, victim: Path, how: str) -> None:
    np.save(victim, np.load(_chunk_file(index)))
    if how == "absolute":
        file = str(victim)
    elif how == "dotdot":
        file = os.path.relpath(victim, index)
    else:  # a registered name that is a symbolic link leading out of the index
        link = _chunk_file(index)
        link.unlink()
        link.symlink_to(victim)
        return
    db = sqlite3.connect(index / MANIFEST_NAME)
    db.execute("UPDATE chunks SET file = ?", (file,))
    db.commit()
    db.close()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_a_chunk_path_outside_the_index_is_never_touched(index, tmp_path, capsys, how):
    victim = tmp_path / "victim.npy"
    _point_outside(index, victim, how)
    _write(index.parent / "photos" / "p0.png", 99)  # a changed image: the update would rewrite the chunks
    capsys.readouterr()
    assert main(_update(index)) == 2
    assert "outside the index folder" in capsys.readouterr().err or how != "symlink"
    manifest = Manifest(index / MANIFEST_NAME)
    with pytest.raises(CorruptIndexError):
        compact(index, manifest)
    manifest.close()
    assert main(["index", "check", str(index)]) == 1
    assert main(["index", "check", str(index), "--repair", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    assert victim.exists() and np.load(victim).shape[0] == 6
    _healthy_and_searchable(index, 6, capsys)


# ------------------------------------------------------------------------------------------------ refresh
def test_refresh_sees_another_processs_update(index, checkpoint):
    reader = Index.open(index)
    before = reader.search("a red square", k=10)
    assert len(before) == 6 and reader.refresh() is False
    gone = next(h for h in before if h.key == "p3.png")
    (index.parent / "photos" / "p3.png").unlink()
    writer = Index.open(index)
    writer.update(num_workers=0, progress=False)
    writer.close()
    assert reader.refresh() is True and reader.refresh() is False
    after = reader.search("a red square", k=10)
    assert len(after) == 5 and "p3.png" not in {h.key for h in after}
    with pytest.raises(ItemNotFoundError, match=f"no item with id {gone.item_id}") as caught:
        reader.item(gone.item_id)
    assert isinstance(caught.value, SimlaError) and isinstance(caught.value, LookupError)
    assert not isinstance(caught.value, KeyError)
    reader.close()


def test_repair_rebuilds_a_truncated_manifest_whose_meta_survives(index, capsys):
    db = sqlite3.connect(index / MANIFEST_NAME)
    meta_pages = max(page for name, page in db.execute("SELECT name, rootpage FROM sqlite_master")
                     if "meta" in name)
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    data = (index / MANIFEST_NAME).read_bytes()
    (index / MANIFEST_NAME).write_bytes(data[:page_size * (meta_pages + 1)])  # cut after the meta table
    capsys.readouterr()
    assert main(["index", "check", str(index)]) == 1
    assert main(["index", "check", str(index), "--repair", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "set the damaged manifest aside as manifest.sqlite.damaged" in out and "rebuilt the index from" in out
    assert (index / f"{MANIFEST_NAME}.damaged").exists()
    _healthy_and_searchable(index, 6, capsys)
