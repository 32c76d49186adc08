"""Issue 26: mistakes that used to half-work now get one `simla: error:` line (exit 2) and write nothing."""

from __future__ import annotations

import json

import pytest
import torch

import simla
from simla.cli import main

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
