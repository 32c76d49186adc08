"""`simla demo --quick`: the offline main job end to end (pretrain, zero-shot retrieval, report)."""

from __future__ import annotations

import json

from simla.cli import main


def test_quick_demo_writes_a_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("txt_r1", "img_r1", "r_mean"):
        assert 0 <= report["zero_shot_retrieval"][key] <= 100
    for direction in ("image_to_text", "text_to_image"):
        assert set(report["class_level_recall"][direction]) == {"r1", "r5", "r10"}
    assert (tmp_path / "loss_curves.png").stat().st_size > 10_000
    assert report["seconds"]["total"] > 0
    # Pretraining on real images moves the losses: the contrastive loss falls from its start.
    assert report["final_losses"]["loss_itc"] < report["first_losses"]["loss_itc"]
    assert "R@1" in capsys.readouterr().out
