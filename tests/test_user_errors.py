"""Issue 24: errors that used to escape as tracebacks (or were misreported) are one `simla: error:` line, exit 2."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import simla
from simla import checkpoint as checkpoint_module
from simla.cli import main
from simla.data.images import BadSampleError, load_image
from simla.errors import DiskFullError, SimlaError
from simla.train.recipe import load_recipe

from conftest import one_line_error
from datasets import draw, make_pairs, write_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=8, task="base")
    return simla.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _gadget(tmp_path: Path, name: str) -> Path:
    """A torch checkpoint whose pickle calls os.system on load (never loaded with trust here)."""

    class Gadget:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"w": torch.zeros(1)}, "config": Gadget()}, path)
    return path


# 1 ------------------------------------------------------------------------------------------------
def test_bad_query_image_and_non_utf8_query_are_one_line(tmp_path, tiny_checkpoint, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        draw(colour, "square", seed=i).save(photos / f"p{i}.png")
    index = tmp_path / "idx"
    assert main(["index", "build", str(photos), "--checkpoint", str(tiny_checkpoint), "--output", str(index),
                 "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((photos / "p0.png").read_bytes()[:60])
    one_line_error(capsys, ["search", str(index), "--image", str(truncated), "--device", "cpu"], "cut.png")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("just text")
    one_line_error(capsys, ["search", str(index), "--image", str(not_image), "--device", "cpu"], "notes.jpg")
    # 2: a non-UTF-8 argument, as Python hands it over (surrogateescape)
    query = os.fsdecode(b"caf\xe9 square")
    one_line_error(capsys, ["search", str(index), query, "--device", "cpu"], "not valid Unicode", "0xE9")


def test_bad_samples_stay_catchable_and_picklable(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(BadSampleError) as info:
        load_image(bad)
    assert isinstance(info.value, SimlaError)
    copy = pickle.loads(pickle.dumps(info.value))  # DataLoader workers send it back pickled
    assert (copy.source, copy.kind) == (info.value.source, info.value.kind)


# 2 ------------------------------------------------------------------------------------------------
def _raw_json(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_lone_surrogates_in_annotation_files_name_file_record_field(tmp_path, tiny_checkpoint, capsys):
    ve = _raw_json(tmp_path / "ve.json", '[{"image": "a.jpg", "sentence": "ok", "label": "entailment"},'
                                         ' {"image": "b.jpg", "sentence": "bad \\udcff text", "label": "neutral"}]')
    one_line_error(capsys, ["evaluate", "ve", "--checkpoint", str(tiny_checkpoint), "--data", str(ve),
                             "--output", str(tmp_path / "ev"), "--device", "cpu"],
                    "ve.json", "record 1", "'sentence'", "not valid Unicode")
    vqa = _raw_json(tmp_path / "vqa.json", '[{"image": "a.jpg", "question": "what \\ud800?", "question_id": 1,'
                                           ' "answer": ["x"]}]')
    answers = write_json(tmp_path / "answers.json", ["x", "y"])
    one_line_error(capsys, ["evaluate", "vqa", "--checkpoint", str(tiny_checkpoint), "--data", str(vqa),
                             "--answers", str(answers), "--output", str(tmp_path / "ev"), "--device", "cpu"],
                    "vqa.json", "record 0", "'question'", "not valid Unicode")
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'[{"image": "a.jpg", "sentence": "caf\xe9", "label": "neutral"}]')
    one_line_error(capsys, ["evaluate", "ve", "--checkpoint", str(tiny_checkpoint), "--data", str(latin1),
                             "--output", str(tmp_path / "ev"), "--device", "cpu"], "latin1.json", "not UTF-8")


def test_tokenizer_refuses_a_lone_surrogate_by_name():
    tokenizer = simla.get_tokenizer("bert-base-uncased")
    with pytest.raises(SimlaError, match="texts\\[1\\].*not valid Unicode"):
        tokenizer(["fine", "bad \udcff"])
    with pytest.raises(ValueError, match="not valid Unicode"):
        tokenizer.tokenize_words("bad \ud800", 8)


# 3 ------------------------------------------------------------------------------------------------
def test_refused_refer_pickle_is_one_line(tmp_path, tiny_checkpoint, capsys):
    refer = tmp_path / "refer"
    refer.mkdir()
    (refer / "refs(unc).p").write_bytes(pickle.dumps([{"ref_id": 1, "mkdir": os.mkdir}]))
    (refer / "instances.json").write_text('{"annotations": [], "images": []}')
    refs = write_json(tmp_path / "refs.json", [{"image": "a.jpg", "text": "the left one", "ref_id": 1}])
    dets = tmp_path / "dets.json"
    dets.write_text("{}")
    one_line_error(capsys, ["evaluate", "grounding", "--checkpoint", str(tiny_checkpoint), "--refs", str(refs),
                             "--dets", str(dets), "--refer-dir", str(refer), "--output", str(tmp_path / "ev"),
                             "--device", "cpu"], "refs(unc).p", "refusing to load")


def test_demo_from_a_folder_with_a_malicious_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    demo = tmp_path / "demo"
    _gadget(tmp_path, "demo/pretrain/checkpoints/last.pt")
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command) or 0)
    one_line_error(capsys, ["demo", "ve", "--quick", "--from", str(demo), "--output", str(tmp_path / "out")],
                    "last.pt", "needs trust")
    assert ran == []


# 4 ------------------------------------------------------------------------------------------------
def test_os_system_gadget_needs_trust_not_a_new_copy(tmp_path, capsys, monkeypatch):
    gadget = _gadget(tmp_path, "gadget.pth")
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command) or 0)
    err = one_line_error(capsys, ["convert", str(gadget), str(tmp_path / "out.pt")],
                          "gadget.pth", "needs trust (--trust-pickle)", "system")
    assert "corrupt" not in err and "fetch" not in err
    assert ran == []


# 5 ------------------------------------------------------------------------------------------------
def test_itm_needs_two_images_per_batch_checked_before_any_work(tmp_path, tiny_checkpoint, capsys):
    records = make_pairs(tmp_path, 4)
    train = write_json(tmp_path / "train.json", [{"image": r["image"], "text": "a shape"} for r in records])
    for task in ("retrieval", "grounding"):
        one_line_error(capsys, ["finetune", task, f"train_file={train}", f"checkpoint={tiny_checkpoint}",
                                 "batch_size=1", "device=cpu", f"output_dir={tmp_path / task}"],
                        "batch_size", ">= 2")
    one_image = write_json(tmp_path / "one.json", [{"image": "images/img000.png", "text": t}
                                                    for t in ("a red square", "the square is red")])
    run = tmp_path / "one_run"
    one_line_error(capsys, ["finetune", "grounding", f"train_file={one_image}", f"checkpoint={tiny_checkpoint}",
                             f"image_root={tmp_path}", "batch_size=2", "device=cpu", f"output_dir={run}"],
                    "one.json", "2 distinct images")
    assert not run.exists()  # refused before the run folder (and the model load)
    one_line_error(capsys, ["pretrain", f"train_file={train}", "model=simla_tiny", "batch_size=1", "device=cpu",
                             f"output_dir={tmp_path / 'pretrain'}"], "batch_size", ">= 2 with ITM")
    assert not (tmp_path / "pretrain").exists()
    assert load_recipe(None, [f"train_file={train}", "batch_size=1", "model_config.losses=[itc, mlm]"]).batch_size == 1


# 6 ------------------------------------------------------------------------------------------------
def test_non_finite_weights_stop_pretraining_in_one_line(tmp_path, capsys):
    write_json(tmp_path / "pairs.json", make_pairs(tmp_path, 8))
    one_line_error(capsys, ["pretrain", f"train_file={tmp_path / 'pairs.json'}", f"image_root={tmp_path}",
                             "model=simla_tiny", "text_encoder=null", "vision_encoder=null", "device=cpu",
                             "num_workers=0", "batch_size=4", "save_every=1", "log_every=100",
                             "kmeans_fit_images=8", "progress=false", "model_config.queue_size=8",
                             "lr=1e38", "warmup_lr=1e38", "warmup_steps=1", "min_lr=1e38", "max_steps=2",
                             f"output_dir={tmp_path / 'run'}"],
                    "non-finite weights", "last checkpoint", "Lower the learning rate")


# 7 ------------------------------------------------------------------------------------------------
def test_empty_annotation_files_are_refused_before_any_work(tmp_path, tiny_checkpoint, capsys):
    empty = write_json(tmp_path / "empty.json", [])
    for task in ("ve", "nlvr"):
        one_line_error(capsys, ["evaluate", task, "--checkpoint", str(tiny_checkpoint), "--data", str(empty),
                                 "--output", str(tmp_path / "ev"), "--device", "cpu"], "empty.json", "holds no records")
    dets = tmp_path / "dets.json"
    dets.write_text("{}")
    one_line_error(capsys, ["evaluate", "grounding", "--checkpoint", str(tiny_checkpoint), "--refs", str(empty),
                             "--dets", str(dets), "--output", str(tmp_path / "ev"), "--device", "cpu"],
                    "empty.json", "holds no records")
    for task in ("ve", "vqa", "retrieval", "grounding"):
        run = tmp_path / f"ft_{task}"
        one_line_error(capsys, ["finetune", task, f"train_file={empty}", f"checkpoint={tiny_checkpoint}",
                                 "device=cpu", f"output_dir={run}"], "empty.json", "holds no records")
        assert not run.exists()


# 8 ------------------------------------------------------------------------------------------------
def _fill_the_disk(monkeypatch, folder: Path, failure: BaseException) -> None:
    def save(obj, path):
        Path(path).write_bytes(b"\0" * 4096)  # a partial write, then the failure torch reports
        raise failure

    real_usage = shutil.disk_usage
    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: real_usage(p)._replace(free=0) if Path(p) == folder else real_usage(p))


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"),
                                     OSError(errno.ENOSPC, "No space left on device")])
def test_disk_full_keeps_the_last_checkpoint_and_says_so(tmp_path, tiny_checkpoint, monkeypatch, capsys, failure):
    out = tmp_path / "out"
    out.mkdir()
    last = out / "last.pt"
    shutil.copy(tiny_checkpoint, last)
    before = last.read_bytes()
    _fill_the_disk(monkeypatch, out, failure)
    one_line_error(capsys, ["convert", str(tiny_checkpoint), str(last)], "No space left on device", "last.pt")
    assert last.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["last.pt"]  # the partial last.pt.tmp is gone


def test_other_save_failures_keep_their_error_and_drop_the_temporary_file(tmp_path, monkeypatch):
    model = simla.create_model("simla_tiny", queue_size=8, task="base")

    def save(obj, path):
        Path(path).write_bytes(b"\0" * 16)
        raise RuntimeError("a bug")

    monkeypatch.setattr(checkpoint_module.torch, "save", save)
    with pytest.raises(RuntimeError, match="a bug") as info:
        simla.save_checkpoint(model, tmp_path / "m.pt")
    assert not isinstance(info.value, DiskFullError)
    assert list(tmp_path.iterdir()) == []


# 9 ------------------------------------------------------------------------------------------------
def test_a_recipe_file_cannot_trust_pickles(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "shared.yaml"
    recipe.write_text("device: cpu\ntrust_pickle: true\n")
    pairs = write_json(tmp_path / "pairs.json", make_pairs(tmp_path, 4))
    one_line_error(capsys, ["pretrain", "--config", str(recipe), f"train_file={pairs}"],
                    "shared.yaml", "trust_pickle", "--trust-pickle")
    one_line_error(capsys, ["finetune", "retrieval", "--config", str(recipe), f"train_file={pairs}",
                             "checkpoint=x.pt"], "shared.yaml", "--trust-pickle")
    recipe.write_text("device: cpu\ntrust_pickle: false\n")
    assert load_recipe(recipe, [f"train_file={pairs}"]).trust_pickle is False
    # typed by the user: an override, the flag, or the environment variable
    assert load_recipe(recipe, [f"train_file={pairs}", "trust_pickle=true"]).trust_pickle is True
    seen = []
    monkeypatch.setattr(simla.tasks, "train", lambda name, recipe: seen.append(recipe.trust_pickle) or {})
    assert main(["finetune", "retrieval", "--trust-pickle", f"train_file={pairs}", "checkpoint=x.pt",
                 "device=cpu"]) == 0
    assert main(["finetune", "retrieval", f"train_file={pairs}", "checkpoint=x.pt", "device=cpu"]) == 0
    monkeypatch.setenv("SIMLA_TRUST_PICKLE", "1")
    assert main(["finetune", "retrieval", f"train_file={pairs}", "checkpoint=x.pt", "device=cpu"]) == 0
    assert seen == [True, False, True]


def test_shipped_recipes_do_not_trust_pickles():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        assert "\ntrust_pickle: true" not in path.read_text(), path


def test_trust_flag_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    assert "--trust-pickle" in capsys.readouterr().out


def test_export_on_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    model = simla.create_model("simla_tiny", queue_size=8, task="base")

    def save_file(tensors, path):
        Path(path).write_bytes(b"\0" * 64)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    with pytest.raises(DiskFullError, match="No space left on device.*model.safetensors") as info:
        simla.save_pretrained(model, tmp_path / "export")
    assert info.value.errno == errno.ENOSPC
    copy = pickle.loads(pickle.dumps(info.value))
    assert (type(copy), copy.errno, str(copy)) == (DiskFullError, errno.ENOSPC, str(info.value))
    assert list((tmp_path / "export").iterdir()) == []
