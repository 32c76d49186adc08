"""NLVR2 and SNLI-VE end to end: text assignment, fine-tuning with per-split scoring and best.pt, exact resume,
evaluation commands (unreadable images count as wrong), and torchrun-safe predictions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import simla
from simla.checkpoint import load_checkpoint, save_checkpoint
from simla.cli import main
from simla.factory import build_model

from datasets import COLOURS, SHAPES, draw

TINY = {"model_config.queue_size": 16}


@pytest.fixture(scope="module")
def task_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    (root / "images").mkdir()
    colours = list(COLOURS)
    for i in range(8):
        draw(colours[i % 4], SHAPES[i % 3], size=32, seed=i).save(root / "images" / f"{i}.png")
    pretraining = [{"image": f"images/{i}.png", "caption": f"a {colours[i % 4]} {SHAPES[i % 3]}"} for i in range(8)]
    nlvr = [{"images": [f"images/{i}.png", f"images/{(i + 1) % 8}.png"], "sentence": f"the left shape is {colours[j % 4]}",
             "label": str(i % 4 == j % 4)} for i in range(8) for j in (i, i + 1)]
    ve = [{"image": f"images/{i}", "sentence": s, "label": label} for i in range(8) for s, label in
          ((f"there is a {colours[i % 4]} shape", "entailment"), ("the shape is made of wood", "neutral"),
           (f"there is a {colours[(i + 1) % 4]} shape", "contradiction"))]
    for i in range(8):  # VE names images by id without an extension: the reference appends .jpg
        draw(colours[i % 4], SHAPES[i % 3], size=32, seed=i).convert("RGB").save(root / "images" / f"{i}.jpg")
    broken_nlvr = nlvr[:4] + [{"images": ["images/missing.png", "images/0.png"], "sentence": "the left shape is red",
                               "label": "True"}]
    files = {"pretrain.json": pretraining, "nlvr_train.json": nlvr, "nlvr_dev.json": nlvr[:6],
             "nlvr_test.json": broken_nlvr, "ve_train.json": ve, "ve_val.json": ve[:9]}
    for name, records in files.items():
        (root / name).write_text(json.dumps(records))
    torch.manual_seed(0)
    save_checkpoint(build_model(simla.get_config("simla_tiny", queue_size=16), "pretrain"), root / "pretrain.pt")
    return root


def common(root: Path, out: Path, steps: int = 4) -> list[str]:
    return [f"image_root={root}", "image_size=32", "batch_size=4", f"max_steps={steps}", "save_every=2", "log_every=1",
            "warmup_steps=1", "num_workers=0", "device=cpu", "progress=false", "randaugment=false",
            f"output_dir={out}", "eval_batch_size=3"]


@pytest.fixture(scope="module")
def text_assignment(task_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ta")
    assert main(["finetune", "nlvr-ta", f"checkpoint={task_data / 'pretrain.pt'}",
                 f"train_file={task_data / 'pretrain.json'}", *common(task_data, out, steps=2)]) == 0
    return out / "checkpoints" / "last.pt"


def nlvr_args(task_data: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "nlvr", f"checkpoint={checkpoint}", f"train_file={task_data / 'nlvr_train.json'}",
            f"eval_files={{dev: {task_data / 'nlvr_dev.json'}, test: {task_data / 'nlvr_test.json'}}}",
            "eval_every=2", *common(task_data, out), *extra]


@pytest.fixture(scope="module")
def nlvr_run(task_data, text_assignment, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nlvr")
    assert main(nlvr_args(task_data, text_assignment, out)) == 0
    return out


def test_text_assignment_checkpoint_has_the_deep_encoder_and_its_head(text_assignment):
    model = load_checkpoint(text_assignment)
    assert model.TASK == "nlvr-ta" and len(model.text_encoder.layers) == 3
    log = [json.loads(line) for line in (text_assignment.parent.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all("loss_ta" in r for r in log)


def test_nlvr_scores_each_split_by_name_and_keeps_the_best_dev_checkpoint(nlvr_run, text_assignment):
    rows = [json.loads(line) for line in (nlvr_run / "eval.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(2, "dev"), (2, "test"), (4, "dev"), (4, "test")]
    best = torch.load(nlvr_run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    dev = [r for r in rows if r["split"] == "dev"]
    assert best["accuracy"] == max(r["accuracy"] for r in dev)
    assert best["step"] == next(r["step"] for r in dev if r["accuracy"] == best["accuracy"])
    test = json.loads((nlvr_run / "test" / "metrics.json").read_text())
    assert test["examples"] == 5 and test["unreadable_examples"] == 1  # counted, as wrong
    assert test["accuracy"] <= 80.0
    # Fine-tuning started from the text-assignment model: its deep encoder, and teachers equal to it.
    ta = load_checkpoint(text_assignment)
    model = load_checkpoint(nlvr_run / "checkpoints" / "last.pt")
    assert model.TASK == "nlvr" and model.text_encoder.layers[1].crossattention.self.key is \
        model.text_encoder.layers[2].crossattention.self.key
    assert not torch.equal(model.text_encoder.layers[0].output.dense.weight, ta.text_encoder.layers[0].output.dense.weight)


def test_the_momentum_teachers_start_from_the_loaded_weights(task_data, text_assignment, tmp_path):
    from simla.train.finetune_classification import NLVRRecipe
    from simla.train.recipe import load_recipe
    from simla.train.runner import TaskRun, load_task_model

    recipe = load_recipe(None, nlvr_args(task_data, text_assignment, tmp_path)[2:], cls=NLVRRecipe)
    model = load_task_model(recipe, TaskRun(torch.device("cpu"), 0, 1, tmp_path, None))
    ta = load_checkpoint(text_assignment)
    assert torch.equal(model.text_encoder_m.layers[2].attention.self.query.weight,
                       ta.text_encoder.layers[2].attention.self.query.weight)
    assert torch.equal(model.visual_encoder_m.pos_embed, model.visual_encoder.pos_embed)


def test_an_interrupted_nlvr_run_resumes_exactly(task_data, text_assignment, nlvr_run, tmp_path):
    from simla.train.finetune_classification import NLVRRecipe, run_classification_finetune
    from simla.train.recipe import load_recipe

    class Stop(Exception):
        pass

    def stop(model, step):
        if step == 2:
            raise Stop

    with pytest.raises(Stop):
        run_classification_finetune(load_recipe(None, nlvr_args(task_data, text_assignment, tmp_path)[2:],
                                                cls=NLVRRecipe), on_step=stop)
    assert main(nlvr_args(task_data, text_assignment, tmp_path, "resume=auto")) == 0

    def losses(run):
        return [json.loads(line)["loss_cls"] for line in (run / "log.jsonl").read_text().splitlines()]

    assert losses(tmp_path) == pytest.approx(losses(nlvr_run), rel=1e-6)
    assert (tmp_path / "eval.jsonl").read_text() == (nlvr_run / "eval.jsonl").read_text()


def test_evaluate_nlvr_and_ve_commands(task_data, nlvr_run, tmp_path, capsys):
    assert main(["evaluate", "nlvr", "--checkpoint", str(nlvr_run / "checkpoints" / "best.pt"), "--data",
                 str(task_data / "nlvr_test.json"), "--image-root", str(task_data), "--output", str(tmp_path / "n"),
                 "--num-workers", "0"]) == 0
    metrics = json.loads((tmp_path / "n" / "metrics.json").read_text())
    assert metrics["split"] == "nlvr_test" and metrics["unreadable_examples"] == 1
    results = json.loads((tmp_path / "n" / "results.json").read_text())
    assert len(results) == 5 and results[4]["unreadable"] and results[4]["label_name"] == "True"

    ve_out = tmp_path / "ve"
    assert main(["finetune", "ve", f"checkpoint={task_data / 'pretrain.pt'}", f"train_file={task_data / 've_train.json'}",
                 f"eval_files={{val: {task_data / 've_val.json'}}}", *common(task_data, ve_out, steps=2)]) == 0
    assert main(["evaluate", "ve", "--checkpoint", str(ve_out / "checkpoints" / "last.pt"), "--data",
                 str(task_data / "ve_val.json"), "--image-root", str(task_data), "--output", str(tmp_path / "v"),
                 "--num-workers", "0", "--split", "val"]) == 0
    metrics = json.loads((tmp_path / "v" / "metrics.json").read_text())
    assert metrics["split"] == "val" and metrics["examples"] == 9
    assert set(metrics["per_class"]) == {"contradiction", "neutral", "entailment"}
    assert metrics["confusion"]["classes"] == ["contradiction", "neutral", "entailment"]
    assert sum(map(sum, metrics["confusion"]["matrix"])) == 9
    assert "accuracy" in capsys.readouterr().out


def test_bad_files_stop_before_any_work(task_data, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"images": ["a.png", "b.png", "c.png"], "sentence": "x", "label": "True"}]))
    assert main(["finetune", "nlvr", f"checkpoint={task_data / 'pretrain.pt'}", f"train_file={bad}",
                 *common(task_data, tmp_path / "run")]) == 2
    assert "record 0, field 'images': NLVR2 needs exactly two images, got 3" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
