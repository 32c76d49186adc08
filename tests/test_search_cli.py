"""`simla index build | update | info`, `simla search` (table, JSON lines, HTML) and a torchrun build."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from test_distributed import torchrun
from test_search_index import _write

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.search import Index
from simla.search.store import load_live_features


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=8, task="base")
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    for i in range(9):
        _write(root / f"{'ab'[i % 2]}/p{i}.png", i)
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _build_args(photos, out, checkpoint):
    return ["index", "build", str(photos), "--checkpoint", str(checkpoint), "--output", str(out), "--batch-size", "4",
            "--num-workers", "0", "--device", "cpu", "--quiet"]


def test_build_search_update_info(photos, tmp_path, checkpoint, capsys):
    out = tmp_path / "idx"
    assert main(_build_args(photos, out, checkpoint)) == 0
    printed = capsys.readouterr().out
    assert "9 items, 1 files in the error table" in printed and "skipped bad.png" in printed

    assert main(["search", str(out), "a red square", "--k", "4", "--rerank", "4", "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and all(h["itm"] is not None for h in hits)
    assert hits == [h.to_dict() for h in Index.open(out).search("a red square", k=4, rerank=4)]

    html = tmp_path / "page.html"
    assert main(["search", str(out), "a red square", "--k", "5", "--html", str(html), "--explain"]) == 0
    table = capsys.readouterr().out
    assert table.count(".png") == 5 and f"wrote {html}" in table
    page = html.read_text()
    shown = re.findall(r'data-item-id="(\d+)"', page)
    expected = [str(h.item_id) for h in Index.open(out).search("a red square", k=5)]
    assert sorted(set(shown)) == sorted(expected)
    assert page.count("data:image/png;base64") >= 5  # the five Grad-CAM overlays
    assert "http://" not in page and "https://" not in page

    assert main(["search", str(out), "--image", str(photos / "a/p0.png"), "--k", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == "a/p0.png"

    _write(photos / "c" / "new.png", 20)
    (photos / "b" / "p1.png").unlink()
    assert main(["index", "update", str(out), "--num-workers", "0", "--device", "cpu", "--quiet"]) == 0
    assert "1 new, 0 changed, 8 unchanged, 1 deleted" in capsys.readouterr().out

    assert main(["index", "info", str(out), "--errors", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["items"] == 9 and info["errors"] == 1 and info["error_list"][0]["key"] == "bad.png"
    assert info["complete"] is True and info["model"] == "simla_tiny"


def test_user_errors_are_one_line(photos, tmp_path, checkpoint, capsys):
    assert main(["search", str(tmp_path), "x"]) == 2
    assert "no simla index here" in capsys.readouterr().err
    out = tmp_path / "idx"
    assert main(_build_args(photos, out, checkpoint)) == 0
    assert main(_build_args(photos, out, checkpoint)) == 2
    assert "already holds an index" in capsys.readouterr().err
    torch.manual_seed(5)
    other = save_checkpoint(simla.create_model("simla_tiny", queue_size=8, task="base"), tmp_path / "other.pt")
    assert main(["search", str(out), "x", "--checkpoint", str(other)]) == 2
    assert "built with another model" in capsys.readouterr().err
    assert main(["search", str(out)]) == 2
    assert "give a text query" in capsys.readouterr().err
    assert main(["index", "build", str(tmp_path / "missing"), "--checkpoint", str(checkpoint), "--output",
                 str(tmp_path / "x")]) == 2
    assert "source not found" in capsys.readouterr().err


def test_torchrun_build_embeds_each_image_once(photos, tmp_path, checkpoint):
    proc = torchrun(["-m", "simla.cli", *_build_args(photos, tmp_path / "ddp", checkpoint)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(_build_args(photos, tmp_path / "one", checkpoint)) == 0
    ddp, one = Index.open(tmp_path / "ddp"), Index.open(tmp_path / "one")
    assert [i.key for i in ddp.manifest.items()] != []  # items are committed by two ranks, in any order
    assert sorted(i.key for i in ddp.manifest.items()) == sorted(i.key for i in one.manifest.items())
    assert [e.key for e in ddp.errors()] == ["bad.png"] and ddp.manifest.get_meta("complete") is True
    by_key = {}
    for index in (ddp, one):
        ids, features = load_live_features(index.path, index.manifest)
        keys = {item.id: item.key for item in index.manifest.items()}
        by_key[index.path.name] = {keys[int(i)]: f for i, f in zip(ids, features.astype(np.float32))}
    for key, feature in by_key["one"].items():
        assert np.allclose(by_key["ddp"][key], feature, atol=2e-3), key
    assert len(ddp.manifest.chunks()) == 1


def test_http_api_round_trip_on_a_real_index(photos, tmp_path, checkpoint):
    """The server on a real Index (its SQLite manifest is read from the server's worker threads)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from simla.search.server import create_app

    index = Index.build(photos, tmp_path / "idx", checkpoint=checkpoint, batch_size=4, num_workers=0, progress=False)
    with TestClient(create_app(index), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/info").json()["items"] == 9
        got = client.get("/api/search", params={"q": "a red square", "k": 3, "rerank": 3, "offset": 1}).json()
        assert got["hits"] == [h.to_dict() for h in index.search("a red square", k=3, rerank=3, offset=1)]
        image = (photos / "a/p2.png").read_bytes()
        import base64

        posted = client.post("/api/search", json={"image": "data:image/png;base64," + base64.b64encode(image).decode(),
                                                  "k": 1}).json()
        assert posted["hits"][0]["key"] == "a/p2.png"
        thumb = client.get(f"/api/thumb/{posted['hits'][0]['item_id']}")
        assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
        assert client.get("/api/image/99999").status_code == 404
        (photos / "a/p2.png").unlink()  # moved away since it was indexed
        gone = client.get(f"/api/thumb/{posted['hits'][0]['item_id']}?size=64")
        assert gone.status_code == 404 and "unreadable" in gone.json()["detail"]
        # A re-ranked search still answers: the missing candidate keeps its ITC place without an ITM score.
        hits = client.get("/api/search", params={"q": "a blue square", "k": 9, "rerank": 9}).json()["hits"]
        assert [h["itm"] is None for h in hits].count(True) == 1 and hits[-1]["key"] == "a/p2.png"
