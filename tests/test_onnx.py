"""ONNX export (`simla.onnx_runtime.export_onnx`, `simla export onnx`) and `OnnxModel` on ONNX Runtime: the
graphs compute what the torch model computes, at any batch size and caption length."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import simla
from simla.cli import main
from simla.errors import CheckpointError, MissingExtraError
from simla.onnx_runtime import DESCRIPTION_FILE, GRAPHS, OnnxModel, _cpu_copy, export_onnx
from simla.search.fingerprint import model_fingerprint

from conftest import one_line_error

TEXTS = ["a red circle", "two blue squares next to a small green triangle on a white page", "x"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", task="base").eval()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """The tiny model exported once in fp32 and once in int8."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("onnx")
    return {"fp32": export_onnx(model, root / "fp32"), "int8": export_onnx(model, root / "int8", int8=True)}


def _pixels(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 3, 5])
def test_fp32_features_match_torch_at_any_batch_size(model, exports, batch):
    onnx_model = OnnxModel.load(exports["fp32"], threads=1)
    pixels = _pixels(batch)
    texts = (TEXTS * 2)[:batch]
    with torch.no_grad():
        torch.testing.assert_close(onnx_model.encode_image(pixels), model.encode_image(pixels), atol=1e-4, rtol=0)
        torch.testing.assert_close(onnx_model.encode_text(texts), model.encode_text(texts), atol=1e-4, rtol=0)
    assert onnx_model.encode_image(pixels).shape == (batch, model.config.objectives.embed_dim)


def test_token_ids_in_and_padded_lengths_give_the_same_features(model, exports):
    onnx_model = OnnxModel.load(exports["fp32"])
    ids, mask = model.tokenize(TEXTS)
    padded = (torch.cat([ids, torch.zeros(3, 7, dtype=ids.dtype)], 1), torch.cat([mask, torch.zeros_like(mask[:, :7])], 1))
    with torch.no_grad():
        expected = model.encode_text((ids, mask))
    torch.testing.assert_close(onnx_model.encode_text((ids, mask)), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(onnx_model.encode_text(padded), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(onnx_model.encode_text(ids), expected, atol=1e-4, rtol=0)


def test_itm_score_matches_torch_and_pairs_one_to_one(model, exports):
    onnx_model = OnnxModel.load(exports["fp32"])
    pixels = _pixels(3, seed=1)
    with torch.no_grad():
        expected = model.itm_score(pixels, TEXTS)
    scores = onnx_model.itm_score(pixels, TEXTS)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one to one"):
        onnx_model.itm_score(pixels[:2], TEXTS)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\)"):
        onnx_model.encode_image(torch.zeros(2, 3, 32, 32))


def test_pictures_are_prepared_as_the_model_prepares_them(model, exports, tmp_path):
    picture = Image.new("RGB", (90, 50), (200, 30, 40))
    picture.save(tmp_path / "red.png")
    onnx_model = OnnxModel.load(exports["fp32"])
    pixels = onnx_model.prepare_pixels([picture, tmp_path / "red.png"])
    torch.testing.assert_close(pixels, model.prepare_pixels([picture, tmp_path / "red.png"]))
    assert onnx_model.prepare_pixels(picture).shape == (1, 3, 64, 64)


def test_int8_export_keeps_the_features_direction(model, exports):
    onnx_model = OnnxModel.load(exports["int8"])
    assert onnx_model.precision == "int8"
    pixels = _pixels(4, seed=2)
    with torch.no_grad():
        image = torch.cosine_similarity(onnx_model.encode_image(pixels), model.encode_image(pixels))
        text = torch.cosine_similarity(onnx_model.encode_text(TEXTS), model.encode_text(TEXTS))
        scores = onnx_model.itm_score(pixels[:3], TEXTS) - model.itm_score(pixels[:3], TEXTS)
    assert image.min() > 0.98 and text.min() > 0.98
    assert scores.abs().max() < 0.05
    # int8 weights: the graphs are much smaller than the fp32 ones.
    for name in GRAPHS.values():
        assert (exports["int8"] / name).stat().st_size < 0.5 * (exports["fp32"] / name).stat().st_size


def test_only_a_model_with_an_itm_head_exports(tmp_path):
    with pytest.raises(TypeError, match="SimlaModel"):
        export_onnx(simla.create_model("simla_tiny", task="vqa"), tmp_path)


def test_the_description_names_the_model_and_its_weights(model, exports):
    description = json.loads((exports["fp32"] / DESCRIPTION_FILE).read_text())
    assert description["fingerprint"] == model_fingerprint(model)
    assert description["model"] == "simla_tiny" and description["precision"] == "fp32"
    assert description["image_size"] == 64 and description["max_text_length"] == model.config.objectives.max_text_length
    assert description["tokenizer"] == model.config.text.tokenizer and description["simla_version"] == simla.__version__
    assert OnnxModel.load(exports["fp32"]).config.to_dict() == model.config.to_dict()


def test_export_leaves_the_callers_model_as_it_was(tmp_path):
    pytest.importorskip("onnxruntime")
    model = simla.create_model("simla_tiny", task="base").train()
    before = model_fingerprint(model)
    export_onnx(model, tmp_path)
    assert model.training and model_fingerprint(model) == before


@pytest.mark.parametrize("task", ["base", "retrieval"])
def test_a_model_off_the_cpu_is_exported_from_an_equal_cpu_copy(task):
    model = simla.create_model("simla_tiny", task=task)
    copy = _cpu_copy(model)
    assert type(copy) is type(model) and copy is not model
    assert model_fingerprint(copy) == model_fingerprint(model)


def test_the_export_command_writes_a_loadable_export(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    pretrain = simla.create_model("simla_tiny")
    simla.save_checkpoint(pretrain, tmp_path / "last.pt")
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "last.pt"), "--output", str(tmp_path / "out")]) == 0
    assert "simla_onnx.json" in capsys.readouterr().out
    base = simla.load_checkpoint(tmp_path / "last.pt", task="base").eval()
    onnx_model = OnnxModel.load(tmp_path / "out")
    assert onnx_model.description["fingerprint"] == model_fingerprint(base)
    pixels = _pixels(2)
    with torch.no_grad():
        torch.testing.assert_close(onnx_model.encode_image(pixels), base.encode_image(pixels), atol=1e-4, rtol=0)


def test_the_export_command_explains_itself(capsys):
    with pytest.raises(SystemExit):
        main(["export", "onnx", "--help"])
    out = capsys.readouterr().out
    assert "itm.onnx" in out and "--int8" in out and 'simla[onnx]' in out


def test_a_missing_checkpoint_is_one_line(tmp_path, capsys):
    one_line_error(capsys, ["export", "onnx", "--checkpoint", str(tmp_path / "none.pt"), "--output", str(tmp_path)],
                   "none.pt")


def test_a_folder_that_is_not_an_export_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="simla export onnx"):
        OnnxModel.load(tmp_path)


@pytest.mark.parametrize("module", ["onnxruntime", "onnxscript"])
def test_a_missing_extra_names_the_pip_command(module, model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingExtraError, match=r'pip install "simla\[onnx\]"'):
        export_onnx(model, tmp_path / "out", int8=True) if module == "onnxscript" else _load_any(tmp_path)
    simla.save_checkpoint(model, tmp_path / "base.pt")
    if module == "onnxscript":
        one_line_error(capsys, ["export", "onnx", "--checkpoint", str(tmp_path / "base.pt"), "--output",
                                str(tmp_path / "cli")], 'pip install "simla[onnx]"')


def _load_any(folder):
    """Load an export folder (only its description is needed to reach the runtime import)."""
    (folder / DESCRIPTION_FILE).write_text(json.dumps({"format": "simla-onnx", "version": 1, "graphs": {}}))
    return OnnxModel.load(folder)


def test_the_speed_benchmark_runs(tmp_path):
    pytest.importorskip("onnxruntime")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "onnx_runtime.py"
    done = subprocess.run([sys.executable, str(script), "--model", "simla_tiny", "--graphs", "image", "text", "itm",
                           "--batch", "2", "--length", "5", "--threads", "1", "--repeats", "1"],
                          capture_output=True, text=True, timeout=600, check=True)
    report = json.loads(done.stdout)
    assert set(report["graphs"]) == {"image", "text", "itm"}
    for graph in report["graphs"].values():
        assert {row["config"] for row in graph["results"]} == {"torch_fp32", "torch_int8", "ort_fp32", "ort_int8"}
        assert all(row["items_per_s_median"] > 0 for row in graph["results"])
        assert graph["agreement_with_torch_fp32"]["ort_fp32"]["max_abs_diff"] < 1e-4
