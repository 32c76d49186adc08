"""VQA end to end: `simla finetune vqa` (exact resume), `simla evaluate vqa` (EvalAI file, official accuracy,
torchrun, unreadable images, question overlap) and clear errors for bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.factory import build_model

from datasets import COLOURS, draw
from test_distributed import torchrun

ANSWERS = ["red", "green", "blue", "yellow", "yes", "no"]


@pytest.fixture(scope="module")
def vqa_data(tmp_path_factory) -> Path:
    """Images, a 16-question training file, a 5-question test file (one unreadable image), an answer list and
    a pretraining checkpoint of the tiny model."""
    root = tmp_path_factory.mktemp("vqa")
    (root / "images").mkdir()
    colours = list(COLOURS)
    train, test = [], []
    for i in range(8):
        colour = colours[i % 4]
        draw(colour, "dot", size=32, seed=i).save(root / "images" / f"{i}.png")
        train.append({"image": f"images/{i}.png", "question": "What color is the dot?", "answer": [colour] * 3,
                      "dataset": "vqa", "question_id": i})
        train.append({"image": f"images/{i}.png", "question": f"Is the dot {colour}?", "answer": "yes",
                      "dataset": "vg", "question_id": 100 + i})
    for i in range(5):
        image = "images/missing.png" if i == 2 else f"images/{i}.png"
        test.append({"image": image, "question": "what color is the dot", "question_id": 1000 + i,
                     "answer": [colours[i % 4]] * 10, "answer_type": "other"})
    (root / "train.json").write_text(json.dumps(train))
    (root / "test.json").write_text(json.dumps(test))
    (root / "answers.json").write_text(json.dumps(ANSWERS))
    torch.manual_seed(0)
    save_checkpoint(build_model(simla.get_config("simla_tiny", queue_size=16), "pretrain"), root / "pretrain.pt")
    return root


def finetune_args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "vqa", f"checkpoint={root / 'pretrain.pt'}", f"train_file={root / 'train.json'}",
            f"image_root={root}", "image_size=32", "batch_size=4", "max_steps=4", "save_every=2", "log_every=1",
            "warmup_steps=1", "lr=1e-4", "num_workers=0", "device=cpu", "progress=false", "randaugment=false",
            f"output_dir={out}", *extra]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss_vqa"] for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finetuned(vqa_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(finetune_args(vqa_data, out, f"test_file={vqa_data / 'test.json'}",
                              f"answer_list={vqa_data / 'answers.json'}")) == 0
    return out


def test_finetune_writes_the_run_folder_and_scores_its_own_answers(vqa_data, finetuned, tmp_path):
    """Mechanics: 4 steps on 16 questions teach nothing measurable (measured: 0 of 5 right), so the accuracy
    is checked against the answers written (official VQA accuracy; each test question has ten identical
    answers: 100 or 0 each), and again after relabelling the questions with the model's own answers."""
    assert len(losses(finetuned)) == 4 and all(loss > 0 for loss in losses(finetuned))
    results = json.loads((finetuned / "results.json").read_text())
    assert [r["question_id"] for r in results] == [1000 + i for i in range(5)]
    assert all(set(r) == {"question_id", "answer"} and r["answer"] in ANSWERS for r in results)
    metrics = json.loads((finetuned / "metrics.json").read_text())
    assert metrics["questions"] == 5 and metrics["unreadable_images"] == 1  # answered from a blank image
    truth = {q["question_id"]: q["answer"][0] for q in json.loads((vqa_data / "test.json").read_text())}
    right = sum(r["answer"] == truth[r["question_id"]] for r in results)
    assert metrics["accuracy"] == pytest.approx(100 * right / 5, abs=0.01)
    assert set(metrics["per_answer_type"]) == {"other"}
    assert metrics["per_answer_type"]["other"]["accuracy"] == pytest.approx(metrics["accuracy"], abs=0.01)
    # The same model scored on questions whose answers are its own (and, for two, another answer): 60%.
    relabelled = json.loads((vqa_data / "test.json").read_text())
    given = {r["question_id"]: r["answer"] for r in results}
    for i, question in enumerate(relabelled):
        own = given[question["question_id"]]
        question["answer"] = [own if i < 3 else next(a for a in ANSWERS if a != own)] * 10
    (tmp_path / "relabelled.json").write_text(json.dumps(relabelled))
    assert main(["evaluate", "vqa", "--checkpoint", str(finetuned / "checkpoints" / "last.pt"), "--data",
                 str(tmp_path / "relabelled.json"), "--image-root", str(vqa_data), "--answers",
                 str(vqa_data / "answers.json"), "--output", str(tmp_path / "eval"), "--num-workers", "0",
                 "--device", "cpu"]) == 0
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results  # the same answers
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["accuracy"] == pytest.approx(60.0)
    assert (finetuned / "checkpoints" / "last.pt").is_file() and (finetuned / "config.yaml").is_file()


def test_an_interrupted_finetune_resumes_exactly(vqa_data, finetuned, tmp_path):
    from simla.train.finetune_vqa import VQARecipe, run_vqa_finetune
    from simla.train.recipe import load_recipe

    class Stop(Exception):
        pass

    def stop_at_two(model, step):
        if step == 2:
            raise Stop

    recipe = load_recipe(None, finetune_args(vqa_data, tmp_path)[2:], cls=VQARecipe)
    with pytest.raises(Stop):
        run_vqa_finetune(recipe, on_step=stop_at_two)
    assert len(losses(tmp_path)) == 2
    assert main(finetune_args(vqa_data, tmp_path, "resume=auto")) == 0
    assert losses(tmp_path) == pytest.approx(losses(finetuned), rel=1e-6)


def test_evaluate_under_torchrun_answers_every_question_once(vqa_data, finetuned, tmp_path):
    args = ["-m", "simla.cli", "evaluate", "vqa", "--checkpoint", str(finetuned / "checkpoints" / "last.pt"),
            "--data", str(vqa_data / "test.json"), "--image-root", str(vqa_data),
            "--answers", str(vqa_data / "answers.json"), "--output", str(tmp_path), "--batch-size", "2",
            "--num-workers", "0", "--device", "cpu"]
    proc = torchrun(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["question_id"] for r in results] == [1000 + i for i in range(5)]  # once each, in file order
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["questions"] == 5 and metrics["unreadable_images"] == 1
    single = tmp_path / "single"
    assert main([*args[2:-8], "--output", str(single), "--num-workers", "0", "--device", "cpu"]) == 0
    assert json.loads((single / "results.json").read_text()) == results  # the same answers in one process


def test_evaluation_refuses_questions_that_were_trained_on(vqa_data, finetuned, tmp_path, capsys):
    leaked = json.loads((vqa_data / "train.json").read_text())[:3]
    for record in leaked:
        record["answer"] = [record["answer"]] * 10 if isinstance(record["answer"], str) else record["answer"] * 4
    path = tmp_path / "leaked.json"
    path.write_text(json.dumps(leaked))
    args = ["evaluate", "vqa", "--checkpoint", str(finetuned / "checkpoints" / "last.pt"), "--data", str(path),
            "--image-root", str(vqa_data), "--answers", str(vqa_data / "answers.json"), "--output", str(tmp_path),
            "--num-workers", "0"]
    assert main(args) == 2
    assert "3 question(s) also occur in the training data" in capsys.readouterr().err
    assert main([*args, "--allow-overlap"]) == 0


def test_a_malformed_training_file_is_a_one_line_error_before_any_work(vqa_data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "images/0.png", "question": "what?", "answer": [], "dataset": "vqa"}]))
    args = finetune_args(vqa_data, tmp_path / "run")
    args[3] = f"train_file={bad}"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{bad}, record 0, field 'answer': empty answer list" in err
    assert not (tmp_path / "run").exists()
