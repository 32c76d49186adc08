"""The `simla` command reports user errors in one line (exit 2); -v shows the traceback; bugs keep theirs."""

from __future__ import annotations

import argparse

import pytest
import torch

import simla
from simla import cli
from simla.cli import main

from conftest import one_line_error
from datasets import make_pairs, write_json


@pytest.fixture
def pairs(tmp_path):
    return write_json(tmp_path / "pairs.json", make_pairs(tmp_path, 8))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    return simla.save_checkpoint(simla.create_model("simla_tiny", queue_size=8, task="base"), tmp_path / "tiny.pt")


def test_pretrain_user_errors(tmp_path, capsys, pairs):
    one_line_error(capsys, ["pretrain", "--config", str(tmp_path / "missing.yaml")], "missing.yaml")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [simla_tiny\n")
    one_line_error(capsys, ["pretrain", "--config", str(bad_yaml)], "bad.yaml", "line")
    one_line_error(capsys, ["pretrain", f"train_file={pairs}", "batch_sise=4"], "batch_sise")
    one_line_error(capsys, ["pretrain", f"train_file={pairs}", "model=simla_huge"], "simla_huge")
    one_line_error(capsys, ["pretrain", f"train_file={pairs}", "model_config.losses=[itc,xyz]"], "losses")
    one_line_error(capsys, ["pretrain", f"train_file={tmp_path / 'nope.json'}", "model=simla_tiny",
                             "text_encoder=null", "vision_encoder=null", "device=cpu",
                             f"output_dir={tmp_path / 'run'}"], "nope.json")
    one_line_error(capsys, ["pretrain", f"train_file={pairs}", "batch_size=64", "model=simla_tiny", "text_encoder=null",
                             "vision_encoder=null", "device=cpu", f"output_dir={tmp_path / 'run'}"], "cannot fill")
    one_line_error(capsys, ["pretrain", f"train_file={pairs}", f"image_root={tmp_path / 'wrong'}", "model=simla_tiny",
                             "batch_size=4",
                             "text_encoder=null", "vision_encoder=null", "device=cpu", "num_workers=0",
                             f"output_dir={tmp_path / 'run'}"], "image_root")
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "a.png"}]')
    one_line_error(capsys, ["pretrain", f"train_file={broken}", "model=simla_tiny", "text_encoder=null",
                             "vision_encoder=null", "device=cpu", f"output_dir={tmp_path / 'run'}"],
                    "broken.json", "caption")


def test_finetune_and_evaluate_user_errors(tmp_path, capsys, pairs, tiny_checkpoint):
    train = tmp_path / "retrieval_train.json"  # a valid training file: the missing checkpoint is the error
    train.write_text('[{"image": "a.png", "caption": "a cat", "image_id": 0}, '
                     '{"image": "b.png", "caption": "a dog", "image_id": 1}]')  # ITM needs two images
    one_line_error(capsys, ["finetune", "retrieval", f"train_file={train}", f"checkpoint={tmp_path / 'no.pt'}",
                             "device=cpu", f"output_dir={tmp_path / 'ft'}"], "no.pt")
    one_line_error(capsys, ["evaluate", "retrieval", "--checkpoint", str(tmp_path / "no.pt"), "--data", str(pairs),
                             "--output", str(tmp_path / "ev")], "no.pt")
    one_line_error(capsys, ["evaluate", "retrieval", "--checkpoint", str(tiny_checkpoint), "--data",
                             str(tmp_path / "no.json"), "--output", str(tmp_path / "ev"), "--device", "cpu"], "no.json")


def test_convert_user_errors(tmp_path, capsys):
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_bytes(b"this is not a checkpoint")
    one_line_error(capsys, ["convert", str(not_a_checkpoint), str(tmp_path / "out.pt")], "notes.pth")
    pickled = tmp_path / "pickled.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "config": argparse.Namespace(lr=1)}, pickled)
    one_line_error(capsys, ["convert", str(pickled), str(tmp_path / "out.pt")], "pickled.pth", "trust")


def test_demo_and_models(capsys, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "easy_vqa" else real_find_spec(name, *a))
    one_line_error(capsys, ["demo", "--quick"], "simla[demo]")
    assert main(["models"]) == 0 and "simla_tiny" in capsys.readouterr().out


def test_verbose_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        main(["-v", "pretrain", "--config", str(tmp_path / "missing.yaml")])


def test_bugs_keep_their_traceback(monkeypatch):
    def broken(args):
        raise ZeroDivisionError("a bug, not a user error")

    parser = cli.build_parser()
    original = parser.parse_args

    def parse(argv=None):
        args = original(argv)
        args.func = broken
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(ZeroDivisionError):
        main(["models"])
