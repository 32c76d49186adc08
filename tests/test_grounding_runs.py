"""Grounding end to end: the evaluator's scoring path, counted misses (never a previous box), the
`simla finetune grounding` and `simla evaluate grounding` commands, and recipe checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.data.grounding import GroundingRef
from simla.eval import grounding as grounding_eval
from simla.eval.grounding import evaluate_grounding
from simla.explain.gradcam import Explanation
from simla.factory import build_model

from datasets import draw
from test_distributed import torchrun


def _canvas(left: str, right: str, seed: int) -> Image.Image:
    canvas = Image.new("RGB", (96, 48), "white")
    canvas.paste(draw(left, "circle", size=48, seed=seed), (0, 0))
    canvas.paste(draw(right, "square", size=48, seed=seed + 1), (48, 0))
    return canvas


@pytest.fixture(scope="module")
def grounding_data(tmp_path_factory) -> Path:
    """Four canvases (a circle left, a square right), expressions for both shapes, proposals per canvas,
    and one expression each with a missing image, an empty text and an image without proposals."""
    root = tmp_path_factory.mktemp("grounding")
    (root / "images").mkdir()
    colours = [("red", "blue"), ("green", "yellow"), ("blue", "red"), ("yellow", "green")]
    train, refs, dets = [], [], {}
    for i, (left, right) in enumerate(colours):
        _canvas(left, right, i).save(root / "images" / f"c{i}.png")
        left_box, right_box = [4, 4, 40, 40], [52, 4, 40, 40]
        dets[f"c{i}"] = [[0, 0, 96, 48], right_box, left_box, [40, 10, 16, 16]]
        for j, (text, box) in enumerate(((f"the {left} circle", left_box), (f"the {right} square", right_box))):
            train.append({"image": f"images/c{i}.png", "text": text})
            refs.append({"image": f"images/c{i}.png", "text": text, "ref_id": 10 * i + j, "image_id": f"c{i}",
                         "bbox": box, "split": "val" if i < 2 else "testA"})
    refs.append({"image": "images/missing.png", "text": "the red circle", "ref_id": 90, "image_id": "c0",
                 "bbox": [4, 4, 40, 40], "split": "val"})
    refs.append({"image": "images/c1.png", "text": "  ", "ref_id": 91, "image_id": "c1", "bbox": [4, 4, 40, 40],
                 "split": "val"})
    refs.append({"image": "images/c2.png", "text": "the blue circle", "ref_id": 92, "image_id": "no_dets",
                 "bbox": [4, 4, 40, 40], "split": "testA"})
    (root / "train.json").write_text(json.dumps(train))
    (root / "refs.json").write_text(json.dumps(refs))
    (root / "dets.json").write_text(json.dumps(dets))
    torch.manual_seed(0)
    save_checkpoint(build_model(simla.get_config("simla_tiny", queue_size=16), "pretrain"), root / "pretrain.pt")
    return root


def _refs(root: Path) -> list[GroundingRef]:
    from simla.data.grounding import read_grounding_refs

    return read_grounding_refs(root / "refs.json", str(root))


def test_a_known_map_picks_its_box_and_misses_are_counted(grounding_data, monkeypatch):
    """With Grad-CAM replaced by a map that is hot on the left half, every left-circle expression is a hit,
    every right-square one a miss; the three broken expressions are counted misses with their reasons."""
    calls = []

    def left_half(model, pixels, texts, layer=None, batch_size=16):
        calls.append(list(texts))
        grid = torch.zeros(4, 4)
        grid[:, :2] = 1.0
        return [Explanation(t, t.split(), "itm", 0, 0.5, grid, None, (48, 48)) for t in texts]

    monkeypatch.setattr(grounding_eval, "gradcam", left_half)
    root = grounding_data
    dets = json.loads((root / "dets.json").read_text())
    model = simla.load_checkpoint(root / "pretrain.pt", task="base")
    metrics = evaluate_grounding(model, _refs(root), dets, root / "eval_known", num_workers=0, batch_size=4)
    rows = json.loads((root / "eval_known" / "results.json").read_text())
    assert [r["ref_id"] for r in rows] == [0, 1, 10, 11, 20, 21, 30, 31, 90, 91, 92]  # every expression, in order
    for row in rows[:8]:
        assert row["hit"] == ("circle" in row["text"]) and row["miss"] is None
        if row["hit"]:
            assert row["pred_box"] == [4, 4, 40, 40] and row["iou"] == 1.0
    reasons = {row["ref_id"]: row["miss"] for row in rows[8:]}
    assert reasons == {90: "missing_image", 91: "empty_text", 92: "no_proposals"}
    assert all(row["pred_box"] is None and not row["hit"] for row in rows[8:])  # never a previous box
    assert sum(len(c) for c in calls) == 8  # broken expressions are never explained
    val, test_a = metrics["splits"]["val"], metrics["splits"]["testA"]
    assert (val["correct"], val["total"], test_a["correct"], test_a["total"]) == (2, 6, 2, 5)
    assert val["misses"] == {"no_proposals": 0, "empty_text": 1, "missing_image": 1}
    assert metrics["accuracy"] == round(100 * 4 / 11, 2) and metrics["total"] == 11
    # A random proposal: 1 of 4 boxes hits for the 8 good expressions and the two with proposals.
    assert metrics["chance"] == round(100 * (10 * 0.25) / 11, 2)
    saved = json.loads((root / "eval_known" / "metrics.json").read_text())
    assert saved["splits"] == metrics["splits"]


def test_finetune_then_evaluate_commands(grounding_data, tmp_path, capsys):
    root = grounding_data
    run = tmp_path / "run"
    assert main(["finetune", "grounding", f"checkpoint={root / 'pretrain.pt'}", f"train_file={root / 'train.json'}",
                 f"image_root={root}", f"test_file={root / 'refs.json'}", f"dets_file={root / 'dets.json'}",
                 "image_size=32", "batch_size=4", "max_steps=3", "save_every=3", "log_every=1", "warmup_steps=1",
                 "num_workers=0", "device=cpu", "progress=false", "randaugment=false", f"output_dir={run}"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["step"] == 3 and results["grounding"]["total"] == 11
    assert (run / "grounding" / "metrics.json").is_file()
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["evaluate", "grounding", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--refs",
                 str(root / "refs.json"), "--dets", str(root / "dets.json"), "--image-root", str(root),
                 "--output", str(out), "--num-workers", "0", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "val" in printed and "testA" in printed and "a random proposal" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["expressions"] == 11 and metrics["layer"] == 0
    assert len(json.loads((out / "results.json").read_text())) == 11


def test_recipe_and_file_errors(grounding_data, tmp_path, capsys):
    root = grounding_data
    assert main(["finetune", "grounding", f"checkpoint={root / 'pretrain.pt'}", f"train_file={root / 'train.json'}",
                 f"test_file={root / 'refs.json'}", f"output_dir={tmp_path}"]) == 2
    assert "dets_file" in capsys.readouterr().err
    bad = tmp_path / "refs.json"
    bad.write_text(json.dumps([{"image": "a.png", "text": "x", "ref_id": 1}]))
    assert main(["evaluate", "grounding", "--checkpoint", str(root / "pretrain.pt"), "--refs", str(bad), "--dets",
                 str(root / "dets.json"), "--output", str(tmp_path / "o")]) == 2
    assert "record 0" in capsys.readouterr().err


def test_torchrun_evaluation_grounds_every_expression_once(grounding_data, tmp_path):
    root = grounding_data
    args = ["evaluate", "grounding", "--checkpoint", str(root / "pretrain.pt"), "--refs", str(root / "refs.json"),
            "--dets", str(root / "dets.json"), "--image-root", str(root), "--batch-size", "2", "--num-workers", "0",
            "--device", "cpu"]
    proc = torchrun(["-m", "simla.cli", *args, "--output", str(tmp_path / "ddp")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ddp" / "results.json").read_text())
    assert [r["ref_id"] for r in rows] == [0, 1, 10, 11, 20, 21, 30, 31, 90, 91, 92]  # once each, in file order
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    single = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [(r["ref_id"], r["pred_box"], r["hit"]) for r in rows] == [(r["ref_id"], r["pred_box"], r["hit"])
                                                                     for r in single]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["total"] == 11 and metrics["splits"]["val"]["misses"]["missing_image"] == 1
