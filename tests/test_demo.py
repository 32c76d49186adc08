"""`simla demo --quick`: the offline main job end to end (pretrain, zero-shot evaluation, pictures, report)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
import torch

from simla.cli import main
from simla.demos.evaluation import CLASSES, confusion_matrix, hard_negative_classes, itm_pair_accuracy, zero_shot_accuracy


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """The quick retrieval demo with its ablation rows, run once: (folder, printed output)."""
    folder = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        printed = io.StringIO()
        patch.setattr("sys.stdout", printed)
        assert main(["demo", "--quick", "--steps", "30", "--ablation", "--output", str(folder)]) == 0
    return folder, printed.getvalue()


def test_quick_demo_with_ablation_writes_a_report(quick_demo):
    tmp_path, printed = quick_demo
    report = json.loads((tmp_path / "report.json").read_text())
    images = len(json.loads((tmp_path / "test.json").read_text()))
    for ranking in ("zero_shot_accuracy_itm", "zero_shot_accuracy_itc"):
        assert set(report[ranking]) == {"image_to_text", "text_to_image"}
        # percentages of the test images: a whole number of them each
        assert all(v * images / 100 == pytest.approx(round(v * images / 100), abs=1e-3) for v in report[ranking].values())
    assert set(report["itm_pair_accuracy"]) == {"accuracy", "positives", "colour_negatives", "shape_negatives"}
    # Even 30 steps learn something with ITC, but not much and not reliably: measured 22.5% (image to text) and
    # 9.5% (text to image) of 200 test images against a chance of 1/24 = 4.2% (seeds 1 and 2: 18/6 and 10/6; the
    # previous loader: 23/27, 19/6 and 6/6). Asserted: the better direction at three times chance. (ITM does
    # not learn yet: it answers "no" to every pair.)
    assert max(report["zero_shot_accuracy_itc"].values()) > 12.5
    assert [point["step"] for point in report["accuracy_curve"]] == [10, 20, 30]
    rows = report["ablation"]
    assert [row["row"] for row in rows] == ["ITC+ITM", "+MLM", "+MIM", "+PSL"]
    assert rows[-1]["zero_shot_accuracy_itm"] == report["zero_shot_accuracy_itm"]  # the main run is the last row
    assert (tmp_path / "ablation" / "itc+itm" / "log.jsonl").is_file()
    logged = json.loads((tmp_path / "ablation" / "itc+itm" / "log.jsonl").read_text().splitlines()[-1])
    assert {k for k in logged if k.startswith("loss_")} == {"loss_itc", "loss_itm"}  # only what the row computes
    for picture in ("loss_curves.png", "accuracy_curve.png", "confusion.png", "examples.png"):
        assert (tmp_path / picture).stat().st_size > 10_000, picture
    assert report["final_losses"]["loss_itc"] < report["first_losses"]["loss_itc"]
    assert set(report["final_losses"]) == {f"loss_{n}" for n in ("itc", "itm", "mlm", "mim", "psl")}
    assert "ITM accuracy" in printed and "| +MLM |" in printed
    assert "accuracy_curve.png" in (tmp_path / "report.md").read_text()


def test_quick_vqa_demo_fine_tunes_and_reports_what_its_answers_score(quick_demo, tmp_path, capsys):
    """The mechanics only: the quick run's 40 steps do not learn to answer (measured 5.0%, below always
    answering "yes"), so its accuracy is checked against its own answers file, not against chance."""
    folder, _ = quick_demo
    assert main(["demo", "vqa", "--quick", "--steps", "40", "--from", str(folder), "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["pretrained_checkpoint"] == str(folder / "pretrain" / "checkpoints" / "last.pt")
    assert report["questions"] == {"train": 4000, "test": 500}
    assert set(report["per_question_type"]) == {"colour", "shape", "yes/no colour", "yes/no shape"}
    assert sum(row["questions"] for row in report["per_question_type"].values()) == 500
    assert report["final_loss"] < report["first_loss"] / 2  # the decoder learns the answer vocabulary fast
    assert report["questions_per_second"] > 0
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert len(results) == 500 and len({r["question_id"] for r in results}) == 500
    questions = {q["question_id"]: q for q in json.loads((tmp_path / "vqa_test.json").read_text())}
    candidates = set(json.loads((tmp_path / "answer_list.json").read_text()))
    assert len(candidates) == 13 and all(r["answer"] in candidates for r in results)
    # easy-VQA has one answer per question (repeated for ten annotators): the accuracy is the plain one.
    right = [r["answer"] == questions[r["question_id"]]["answer"][0] for r in results]
    assert report["accuracy"] == pytest.approx(100 * sum(right) / 500, abs=0.01)
    for kind, row in report["per_question_type"].items():
        of_kind = [ok for r, ok in zip(results, right) if questions[r["question_id"]]["question_type"] == kind]
        assert row["questions"] == len(of_kind) and row["accuracy"] == pytest.approx(100 * sum(of_kind) / len(of_kind),
                                                                                    abs=0.01)
    assert (tmp_path / "confusion.png").stat().st_size > 10_000
    assert "VQA accuracy" in capsys.readouterr().out


def test_zero_shot_accuracy_and_itm_pairs_on_known_scores():
    labels = torch.tensor([0, 1, 2, 2])
    scores = torch.full((4, len(CLASSES)), -1.0)
    scores[0, 0] = scores[1, 1] = scores[2, 2] = 1.0  # images 0-2 rank their own caption first
    scores[3, 5] = 1.0  # image 3 prefers another caption ...
    scores[3, 2] = 0.5  # ... but is the second-best image for its own caption
    accuracy = zero_shot_accuracy(scores, labels)
    assert accuracy["image_to_text"] == 75.0
    # Caption 2's best image is image 2 (right class); pairs 0, 1, 2, 3 all have a right best image.
    assert accuracy["text_to_image"] == 100.0
    swapped = zero_shot_accuracy(scores.flip(0), labels)  # scores belong to other images now
    assert swapped["image_to_text"] < 75.0

    colour_swap, shape_swap = hard_negative_classes(labels)
    for label, colour, shape in zip(labels.tolist(), colour_swap.tolist(), shape_swap.tolist()):
        c, s = CLASSES[label].split()
        assert CLASSES[colour].split()[1] == s and CLASSES[colour].split()[0] != c
        assert CLASSES[shape].split()[0] == c and CLASSES[shape].split()[1] != s
    probabilities = torch.full((4, len(CLASSES)), 0.1)
    probabilities[torch.arange(4), labels] = 0.9
    assert itm_pair_accuracy(probabilities, labels)["accuracy"] == 100.0
    probabilities[torch.arange(4), shape_swap] = 0.8  # says yes to a wrong shape
    result = itm_pair_accuracy(probabilities, labels)
    assert result["shape_negatives"] == 0.0 and result["colour_negatives"] == 100.0
    assert round(result["accuracy"], 4) == round(200 / 3, 4)
    matrix = confusion_matrix(scores, labels)
    assert matrix[2, 2] == 1 and matrix[2, 5] == 1 and matrix.sum() == 4


def test_quick_nlvr_and_ve_demos_report_consistently_and_ve_beats_the_majority_class(quick_demo, tmp_path, capsys):
    """NLVR's quick run does not learn (measured 48.0% test accuracy against a 52.0% majority class): for it
    the report's figures are checked against each other. VE's does (below)."""
    folder, _ = quick_demo
    for task, classes in (("nlvr", {"False", "True"}), ("ve", {"contradiction", "neutral", "entailment"})):
        out = tmp_path / task
        assert main(["demo", task, "--quick", "--from", str(folder), "--output", str(out)]) == 0
        report = json.loads((out / "report.json").read_text())
        assert report["task"] == task and set(report["per_class"]) == classes
        assert report["examples"] == {"train": 1000, "dev": 100, "test": 100}
        per_class = report["per_class"]
        assert sum(row["examples"] for row in per_class.values()) == 100
        # accuracy = the class accuracies weighted by their examples (each rounded to 2 decimals in the report,
        # hence the tolerance); majority = the largest class's share
        weighted = sum(r["accuracy"] * r["examples"] for r in per_class.values()) / 100
        assert report["accuracy"] == pytest.approx(weighted, abs=0.01)
        assert report["majority_class_accuracy"] == max(r["examples"] for r in per_class.values())
        assert report["majority_class_accuracy"] == pytest.approx(100 / len(classes), abs=3)  # balanced classes
        evaluations = report["evaluations"]
        assert [(r["step"], r["split"]) for r in evaluations] == [(15, "dev"), (15, "test"), (30, "dev"), (30, "test")]
        assert (report["accuracy"], report["dev_accuracy"]) == (evaluations[-1]["accuracy"], evaluations[-2]["accuracy"])
        assert report["best"] == max((r for r in evaluations if r["split"] == "dev"), key=lambda r: r["accuracy"])
        assert (out / task / "checkpoints" / "best.pt").is_file()
        assert (out / "confusion.png").stat().st_size > 5_000
    assert (tmp_path / "nlvr" / "nlvr_ta" / "checkpoints" / "last.pt").is_file()  # the text-assignment stage ran
    # Neutral statements are recognisable from their words: even 30 steps learn that much.
    ve = json.loads((tmp_path / "ve" / "report.json").read_text())
    assert ve["per_class"]["neutral"]["accuracy"] > 50
    # VE learns: measured 67.0% test accuracy against a 34.0% majority class; asserted: half that gain.
    assert ve["accuracy"] > ve["majority_class_accuracy"] + 16
    assert "test accuracy" in capsys.readouterr().out


def test_quick_grounding_demo_grounds_every_expression_on_a_proposal_and_counts_hits(quick_demo, tmp_path, capsys):
    """The mechanics only: the quick run does not learn to ground (measured 15.0% against a random
    proposal's 12.5%: 2.5 expressions of 100), so its accuracy is checked against its own results."""
    folder, _ = quick_demo
    assert main(["demo", "grounding", "--quick", "--from", str(folder), "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["test_expressions"] == 100 and report["train_pairs"] == 480
    assert report["chance"] == pytest.approx(12.5)  # one of 8 proposals per canvas
    assert report["misses"] == {"no_proposals": 0, "empty_text": 0, "missing_image": 0}
    results = json.loads((tmp_path / "evaluation" / "results.json").read_text())
    assert len(results) == 100 and len({r["ref_id"] for r in results}) == 100
    proposals = json.loads((tmp_path / "data" / "test_dets.json").read_text())
    for r in results:  # the predicted box is one of the canvas's proposals; a hit is IoU >= 0.5
        assert r["pred_box"] in proposals[Path(r["image"]).stem], r
        assert r["hit"] == (r["iou"] >= 0.5) and r["miss"] is None
    assert report["accuracy"] == pytest.approx(sum(r["hit"] for r in results))  # percent of 100 expressions
    assert len(report["sheets"]) == 2 and all((tmp_path / s).stat().st_size > 5_000 for s in report["sheets"])
    # The sheets are chosen from the results: one hit and one miss (the quick run has both: 15 hits of 100).
    assert sorted(e["hit"] for e in report["sheet_examples"]) == [False, True]
    by_id = {r["ref_id"]: r for r in results}
    assert all(by_id[e["ref_id"]]["hit"] == e["hit"] and by_id[e["ref_id"]]["text"] == e["text"]
               for e in report["sheet_examples"])
    # The pointing game on every test expression, before and after fine-tuning, with its two baselines.
    pointing = report["pointing"]
    assert pointing["expressions"] == 100
    for model in ("fine_tuned", "before_fine_tuning"):
        figures = pointing[model]
        assert figures["whole_text"]["total"] == 100 and 0 <= figures["whole_text"]["hits"] <= 100
        # Two content words (a colour, a shape) per expression, never "the", "a", "that" or "is".
        assert figures["content_words"]["total"] == 200
        assert figures["groups"]["colour words"]["total"] == figures["groups"]["shape words"]["total"] == 100
        assert not {"the", "a", "that", "is"} & set(figures["by_word"])
    # On 2x2 canvases the centre is where four tiles meet: a shape rarely reaches it; a random point hits a
    # shape's box in proportion to its area (easy-VQA shapes fill a few percent of a canvas).
    assert pointing["baselines"]["image_centre"]["total"] == 100
    assert 0.5 < pointing["baselines"]["random_point"] < 25
    printed = capsys.readouterr().out
    assert "pointing game" in printed and "a random point" in printed
    assert "pointing game" in (tmp_path / "report.md").read_text() and "Miss:" in (tmp_path / "report.md").read_text()
    config = yaml.safe_load((tmp_path / "grounding" / "config.yaml").read_text())
    assert config["model"]["objectives"]["itm_negatives"] == "random"
    assert "grounding accuracy" in printed


def test_quick_search_demo_indexes_and_reranks(quick_demo, tmp_path, capsys):
    folder, _ = quick_demo
    assert main(["demo", "search", "--quick", "--from", str(folder), "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["images"] == 888 and report["index_errors"] == 0 and len(report["queries"]) == 24
    assert all(0 <= row["itc"] <= 1 and 0 <= row["itm"] <= 1 for row in report["queries"])
    # Even the 30-step model finds images of the queried class far above chance (about 1/24).
    assert report["precision_itc"] > 0.2
    page = (tmp_path / "results.html").read_text()
    assert page.count("data-item-id=") == 10
    assert "precision@10" in capsys.readouterr().out
    # Run again: the index is brought up to date, nothing is embedded twice.
    assert main(["demo", "search", "--quick", "--from", str(folder), "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["indexing_images_per_second"] == 0
