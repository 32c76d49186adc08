"""Issue 26: mistakes that used to half-work now get one `simla: error:` line (exit 2) and write nothing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import simla
from simla.cli import main
from simla.search import Index

from conftest import one_line_error
from datasets import draw


@pytest.mark.parametrize("task", ["vqa", "nlvr", "ve", "grounding", "search"])
def test_demo_from_an_unfinished_folder_writes_nothing(tmp_path, capsys, task):
    out = tmp_path / "out"
    one_line_error(capsys, ["demo", task, "--quick", "--from", str(tmp_path / "missing"), "--output", str(out)],
                   "--from", "missing", "no such folder")
    assert not out.exists()
    started = tmp_path / "started"  # a demo that has not finished: no pretrain/checkpoints/last.pt yet
    (started / "pretrain" / "checkpoints").mkdir(parents=True)
    out.mkdir()
    one_line_error(capsys, ["demo", task, "--quick", "--from", str(started), "--output", str(out)],
                   "last.pt is missing")
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=8, task="base")
    return simla.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_explain_with_no_readable_image_is_one_line_and_writes_nothing(tmp_path, capsys, tiny_checkpoint):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    out = tmp_path / "out"
    one_line_error(capsys, ["explain", str(notes), "a red circle", "--checkpoint", str(tiny_checkpoint),
                             "--output", str(out)],
                   "nothing to explain", "the image cannot be read", "notes.txt (")
    assert not out.exists()
    names = [str(tmp_path / f"gone{i}.png") for i in range(5)]
    err = one_line_error(capsys, ["explain", str(notes), *names, "a red circle", "--checkpoint", str(tiny_checkpoint),
                                  "--output", str(out)], "none of the 6 images can be read", "gone0.png", "and 3 more")
    assert "gone2.png" not in err and not out.exists()


def test_explain_with_some_readable_images_explains_those_and_exits_1(tmp_path, capsys, caplog, tiny_checkpoint):
    draw("red", "circle", size=64).save(tmp_path / "red.png")
    out = tmp_path / "out"
    code = main(["explain", str(tmp_path / "missing.png"), str(tmp_path / "red.png"), "a red circle",
                 "--checkpoint", str(tiny_checkpoint), "--output", str(out), "--concepts", "0"])
    captured = capsys.readouterr()
    assert code == 1, captured.err  # as before issue 26: the readable images are explained, the others listed
    assert "explained 1 of 2 pairs" in captured.out and "missing.png" in caplog.text
    summary = json.loads((out / "explanations.json").read_text())
    assert summary["explained"] == 1 and summary["failed"][0]["image"].endswith("missing.png")


def _index_args(source, out, checkpoint):
    return ["index", "build", str(source), "--checkpoint", str(checkpoint), "--output", str(out), "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu", "--quiet"]


def test_index_build_without_usable_images_is_one_line_and_writes_no_index(tmp_path, capsys, tiny_checkpoint):
    empty, out = tmp_path / "empty", tmp_path / "idx"
    empty.mkdir()
    one_line_error(capsys, _index_args(empty, out, tiny_checkpoint), "no images to index", "the folder holds no files",
                   "no index was written")
    assert not out.exists()

    notes = tmp_path / "notes"
    for i in range(5):
        (notes / f"n{i}.txt").parent.mkdir(exist_ok=True)
        (notes / f"n{i}.txt").write_text("words")
    (notes / ".hidden.png").write_bytes(b"x")
    (notes / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (notes / "empty.jpg").write_bytes(b"")
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")  # an existing --output keeps what it held
    err = one_line_error(capsys, _index_args(notes, out, tiny_checkpoint), "8 files skipped",
                         "5 not named as images", "n0.txt, n1.txt, n2.txt, +2 more", "1 hidden: .hidden.png",
                         "bad.png", "empty.jpg")
    assert "n3.txt" not in err
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_an_emptied_index_updates_warns_and_searches_say_so(tmp_path, capsys, tiny_checkpoint):
    photos, out = tmp_path / "photos", tmp_path / "idx"
    photos.mkdir()
    draw("red", "circle").save(photos / "red.png")
    assert main(_index_args(photos, out, tiny_checkpoint)) == 0
    capsys.readouterr()
    update = ["index", "update", str(out), "--num-workers", "0", "--device", "cpu", "--quiet"]

    shutil.move(photos, tmp_path / "elsewhere")  # an unmounted or moved source must not empty the index
    one_line_error(capsys, update, "source folder", "is gone", "left as it was")
    assert len(Index.open(out)) == 1
    shutil.move(tmp_path / "elsewhere", photos)

    (photos / "red.png").unlink()  # every image deleted on purpose: the update follows, and says so
    assert main(update) == 0
    captured = capsys.readouterr()
    assert "1 deleted" in captured.out and "index: 0 items" in captured.out
    assert captured.err.startswith(f"warning: {out} now holds no images") and captured.err.count("\n") == 1
    one_line_error(capsys, ["search", str(out), "a red circle"], "holds no images", f"simla index update {out}")


def test_loss_curves_label_every_y_axis():
    from simla.demos.plots import LOSS_AXES, loss_figure

    records = [{"step": s, "loss_itc": 9.0 - s, "loss_itm": 0.69, "loss_new": 1.0} for s in range(1, 4)]
    fig = loss_figure(records, "t")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert labels == [LOSS_AXES["itc"], LOSS_AXES["itm"], "loss, nats"] and all("nats" in label for label in labels)


def test_confusion_cells_carry_their_counts_and_labels_lie_flat():
    from simla.demos.plots import confusion_figure
    from simla.demos.retrieval import CLASSES

    matrix = torch.tensor([[5, 0, 2], [1, 7, 0], [0, 3, 4]])
    fig = confusion_figure(matrix, ["contradiction", "neutral", "entailment"])
    ax = fig.axes[0]
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert {key: t.get_text() for key, t in texts.items()} == {
        (r, c): str(int(matrix[r, c])) for r in range(3) for c in range(3)}
    assert texts[(1, 1)].get_color() == "white" and texts[(0, 2)].get_color() == "black"  # dark cell, light cell
    assert all(label.get_rotation() == 0 for label in ax.get_xticklabels() + ax.get_yticklabels())

    retrieval = confusion_figure(torch.eye(24, dtype=torch.long) * 3, CLASSES).axes[0]  # the 24-class demo
    assert len(retrieval.texts) == 24 * 24
    assert all(label.get_rotation() == 0 for label in retrieval.get_xticklabels())
    crowded = confusion_figure(torch.eye(30, dtype=torch.long), [f"class-number-{i:02d}-long" for i in range(30)])
    assert all(label.get_rotation() == 90 for label in crowded.axes[0].get_xticklabels())  # only when they must
