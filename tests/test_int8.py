"""int8 inference: `simla.quantize_int8`, int8 search indexes (recorded, never mixed with float features,
queried in int8) and `simla evaluate retrieval --precision int8`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_line_error
from datasets import make_pairs, write_json
from test_search_index import _build, _write
from torch import nn
from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.data.retrieval import read_retrieval_eval
from simla.errors import ConfigError
from simla.eval.pair_scores import itm_pair_scores
from simla.eval.retrieval import evaluate_retrieval
from simla.models.quantize import INFERENCE_MODULES, Int8DeviceError, int8_device, is_int8
from simla.search import Index, ModelMismatchError, PrecisionMismatchError, SearchError, model_fingerprint
from simla.search.build import sync_index
from simla.search.manifest import MANIFEST_NAME
from simla.search.server import model_label
from simla.search.store import load_live_features

TEXTS = ["a red square", "a small green circle on the left", "blue", "two yellow things near a purple box"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", queue_size=8, task="base").eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i in range(10):
        _write(root / ("sub" if i % 3 == 0 else "") / f"img{i:02d}.png", i)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def retrieval_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retrieval")
    pairs = make_pairs(root, 12)
    write_json(root / "test.json", [{"image": p["image"], "caption": [p["caption"]] if isinstance(p["caption"], str)
                                     else p["caption"]} for p in pairs])
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, minilm_dir) -> Path:
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=32, **{"text.tokenizer": minilm_dir})
    return simla.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "pretrain.pt")


@pytest.fixture(scope="module")
def int8(model):
    return simla.quantize_int8(model)


def _pixels(model, n: int = 4, seed: int = 0) -> torch.Tensor:
    size = model.config.vision.image_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g) * 0.5 + 2 * torch.rand(n, 3, 1, 1, generator=g) - 1


# ------------------------------------------------------------------------------------ quantize_int8
def test_the_copy_is_quantized_and_the_original_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy = simla.quantize_int8(model)
    assert copy is not model and is_int8(copy) and copy.inference_precision == "int8" and not is_int8(model)
    assert not copy.training and not any(p.requires_grad for p in copy.parameters())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, (nn.Linear, DynamicQuantizedLinear)))
    for name in INFERENCE_MODULES:
        linears = [m for m in getattr(copy, name).modules() if isinstance(m, (nn.Linear, DynamicQuantizedLinear))]
        assert linears and all(isinstance(m, DynamicQuantizedLinear) for m in linears), name
    assert simla.quantize_int8(copy) is copy  # already int8: returned as it is
    with pytest.raises(TypeError, match="SIMLA model"):
        simla.quantize_int8(nn.Linear(4, 4))


def test_int8_features_are_close_to_fp32_and_itm_works(model, int8):
    pixels = _pixels(model)
    with torch.no_grad():
        assert F.cosine_similarity(model.encode_image(pixels), int8.encode_image(pixels)).min() > 0.98
        assert F.cosine_similarity(model.encode_text(TEXTS), int8.encode_text(TEXTS)).min() > 0.98
        fp32_itm, int8_itm = model.itm_score(pixels, TEXTS), int8.itm_score(pixels, TEXTS)
        assert int8_itm.shape == (4,) and ((int8_itm >= 0) & (int8_itm <= 1)).all()
        assert torch.allclose(int8_itm, fp32_itm, atol=0.05)
        assert int8.similarity(pixels, TEXTS).shape == (4, 4)


def test_int8_is_refused_on_a_gpu(model, photos, tmp_path, checkpoint, capsys):
    assert int8_device("auto") == "cpu" and int8_device("cpu") == "cpu"
    with pytest.raises(Int8DeviceError, match="CPU only"):
        int8_device("cuda:0")
    on_meta = simla.create_model("simla_tiny", queue_size=8, task="base").to("meta")  # not on the CPU
    with pytest.raises(Int8DeviceError, match="model.cpu"):
        simla.quantize_int8(on_meta)
    with pytest.raises(Int8DeviceError):
        Index.build(photos, tmp_path / "gpu", checkpoint=checkpoint, precision="int8", device="cuda")
    assert not (tmp_path / "gpu").exists()
    one_line_error(capsys, ["index", "build", str(photos), "--checkpoint", str(checkpoint), "--output",
                            str(tmp_path / "gpu"), "--precision", "int8", "--device", "cuda"], "CPU only")
    one_line_error(capsys, ["evaluate", "retrieval", "--checkpoint", str(checkpoint), "--data", "x.json",
                            "--output", str(tmp_path / "ev"), "--precision", "int8", "--device", "cuda"], "CPU only")


# ------------------------------------------------------------------------------------ search indexes
def test_an_int8_index_records_it_refuses_float_updates_and_queries_in_int8(photos, tmp_path, checkpoint, model,
                                                                          int8):
    # One image per batch: dynamic quantization scales activations per batch, so a feature depends a little
    # on the other images of its batch.
    index = Index.build(photos, tmp_path / "idx", checkpoint=checkpoint, batch_size=1, num_workers=0,
                        progress=False, precision="int8")
    assert index.precision == "int8" and index.info()["precision"] == "int8"
    assert model_label(index.info(), model).endswith("64-d features, int8)")  # the search page says so
    assert index.manifest.get_meta("fingerprint") == model_fingerprint(model)  # the float weights'
    assert is_int8(index.query_model) and not is_int8(index.model)
    ids, stored = load_live_features(index.path, index.manifest)
    paths = {item.id: item.path for item in index.manifest.items()}
    with torch.no_grad():
        by_int8 = torch.cat([int8.encode_image(int8.prepare_pixels(paths[int(i)])) for i in ids])
        by_float = torch.cat([model.encode_image(model.prepare_pixels(paths[int(i)])) for i in ids])
    to_int8 = F.cosine_similarity(torch.from_numpy(stored).float(), by_int8)
    to_float = F.cosine_similarity(torch.from_numpy(stored).float(), by_float)
    assert to_int8.min() > 0.9999 and to_float.max() < to_int8.min()  # the int8 copy embedded them

    with pytest.raises(PrecisionMismatchError, match=r"idx was built with int8 features.*precision fp32"):
        index.update(num_workers=0, progress=False, precision="fp32")
    _write(photos / "new.png", 30)
    assert index.update(num_workers=0, progress=False).added == 1  # "auto" follows the index: int8

    query = "a red square"
    ids, stored = load_live_features(index.path, index.manifest)
    features = torch.from_numpy(stored).float()
    with torch.no_grad():
        by_int8 = features @ int8.encode_text([query])[0]
        by_float = features @ model.encode_text([query])[0]
    hits = Index.open(index.path).search(query, k=len(ids))
    assert [h.itc for h in hits] == pytest.approx(sorted(by_int8.tolist(), reverse=True), abs=1e-5)
    assert max(abs(h.itc - float(by_float[list(ids).index(h.item_id)])) for h in hits) > 1e-4

    reranked = index.search(query, k=3, rerank=3)
    with torch.no_grad():
        itm = int8.itm_score(int8.prepare_pixels([h.path for h in reranked]), [query] * 3)
    assert [h.itm for h in reranked] == pytest.approx(itm.tolist(), abs=1e-5)


def test_a_float_index_refuses_int8_and_an_old_index_counts_as_float(photos, tmp_path, checkpoint, model):
    index = _build(photos, tmp_path / "idx", checkpoint, precision="fp32")
    assert index.precision == "float" and index.manifest.get_meta("precision") == "float"
    with pytest.raises(PrecisionMismatchError, match="built with float features"):
        index.update(num_workers=0, progress=False, precision="int8")
    index.close()
    db = sqlite3.connect(tmp_path / "idx" / MANIFEST_NAME)
    with db:
        db.execute("DELETE FROM meta WHERE key = 'precision'")
    db.close()
    old = Index.open(tmp_path / "idx")
    assert old.precision == "float" and not is_int8(old.query_model)
    with pytest.raises(PrecisionMismatchError):
        old.update(num_workers=0, progress=False, precision="int8")
    assert old.update(num_workers=0, progress=False, precision="bf16").unchanged == 10  # float: bf16 mixes


def test_the_fingerprint_check_still_guards_an_int8_index(photos, tmp_path, checkpoint, model, int8):
    _build(photos, tmp_path / "idx", checkpoint, precision="int8").close()
    torch.manual_seed(5)
    other = simla.create_model("simla_tiny", queue_size=8, task="base")
    with pytest.raises(ModelMismatchError, match="built with another model"):
        Index.open(tmp_path / "idx", model=other)
    with pytest.raises(ModelMismatchError, match="float model"):
        model_fingerprint(int8)
    with pytest.raises(SearchError, match="float model"):
        Index.open(tmp_path / "idx", model=int8)
    with pytest.raises(SearchError, match="float model"):
        Index.build(photos, tmp_path / "idx2", model=int8, precision="int8")
    index = Index.open(tmp_path / "idx", model=model)
    with pytest.raises(ConfigError, match="int8 copy"):
        sync_index(index.path, index.manifest, None, model, precision="int8")


def test_cli_build_search_update_in_int8(photos, tmp_path, checkpoint, capsys):
    out = tmp_path / "idx"
    assert main(["index", "build", str(photos), "--checkpoint", str(checkpoint), "--output", str(out),
                 "--batch-size", "4", "--num-workers", "0", "--precision", "int8", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "int8"
    assert main(["search", str(out), "a red square", "--k", "3", "--rerank", "3", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert hits == [h.to_dict() for h in Index.open(out).search("a red square", k=3, rerank=3)]
    one_line_error(capsys, ["index", "update", str(out), "--precision", "fp32", "--num-workers", "0", "--quiet"],
                   f"{out} was built with int8 features", "precision fp32")
    assert main(["index", "update", str(out), "--num-workers", "0", "--quiet"]) == 0
    assert "0 new, 0 changed, 10 unchanged" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ evaluation
def test_retrieval_evaluation_in_int8(tmp_path, retrieval_data, pretrained, capsys):
    out = tmp_path / "int8"
    assert main(["evaluate", "retrieval", "--checkpoint", str(pretrained), "--data", str(retrieval_data / "test.json"),
                 "--image-root", str(retrieval_data), "--output", str(out), "--k", "4", "--num-workers", "0",
                 "--precision", "int8"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "R@1" in capsys.readouterr().out and all(0 <= v <= 100 for v in results.values())

    float_model = simla.load_checkpoint(pretrained, task="base")
    data = read_retrieval_eval(str(retrieval_data / "test.json"), str(retrieval_data))
    _, i2t, t2i = evaluate_retrieval(float_model, data, k=4, num_workers=0, precision="int8", return_scores=True)
    assert not is_int8(float_model)  # the evaluation quantized a copy
    copy = simla.quantize_int8(float_model)
    same = evaluate_retrieval(copy, data, k=4, num_workers=0, precision="int8", return_scores=True)
    assert torch.allclose(same[1], i2t) and torch.allclose(same[2], t2i) and same[0] == pytest.approx(results)
    for other in ({"method": "batched"}, {"keep_image_tokens": False}):  # the other scoring paths run in int8 too
        _, o_i2t, o_t2i = evaluate_retrieval(copy, data, k=4, num_workers=0, precision="int8", return_scores=True,
                                             **other)
        # Activations are quantized per call, so other groupings of tokens round a little differently.
        assert torch.equal(o_i2t == -100, i2t == -100) and torch.allclose(o_i2t, i2t, atol=0.1), other
    _, f_i2t, _ = evaluate_retrieval(float_model, data, k=4, num_workers=0, return_scores=True)
    assert not torch.allclose(f_i2t, i2t)  # the int8 copy did the scoring
    with pytest.raises(ValueError, match="precision='int8'"):
        evaluate_retrieval(copy, data, k=4, num_workers=0, precision="fp32")
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="does not match the model"):
        itm_pair_scores(float_model, torch.zeros(1, 2, 8), torch.zeros(1, 3, dtype=torch.long),
                        torch.ones(1, 3, dtype=torch.long), empty, empty, precision="int8")


# ------------------------------------------------------------------------------------ benchmark
def test_the_precision_benchmark_runs(tmp_path):
    out = tmp_path / "speed.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "embedding_precision.py"
    done = subprocess.run([sys.executable, str(script), "--models", "simla_tiny", "--iters", "2", "--warmup", "0",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(out.read_text())["rows"][0]
    assert {"fp32", "int8"} <= set(row["variants"]) and row["int8_vs_fp32"]["images_per_s"] > 0
    assert all(len(row["variants"]["int8"][f"{job}_seconds"]) == 2 for job in ("images", "texts"))
    assert 0.98 < row["min_cosine_to_fp32"]["int8"]["images"] < 0.99999 and "| simla_tiny (64 px) | int8 |" in done.stdout
    assert {"onnx", "onnx_int8"} <= set(row["variants"])  # the [onnx] extra is part of [dev]
    assert row["min_cosine_to_fp32"]["onnx"]["images"] > 0.9999  # the fp32 export computes the same features
    assert 0.98 < row["min_cosine_to_fp32"]["onnx_int8"]["images"] < 0.99999
