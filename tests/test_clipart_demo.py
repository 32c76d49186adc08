"""`simla demo clipart`: the held-out split, the collections' checks, the ablation's arithmetic, and (where
Debian's pictures are installed) the quick demo end to end on the real pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import one_line_error
from simla.data.records import CaptionRecord
from simla.demos.clipart import ARMS, QUICK, chance, run_clipart_demo, summarise_arms
from simla.demos.clipart_data import MissingCollectionError, find_collections, split_stamps, stamp_folder


def _records(root: Path, folders: dict[str, int]) -> list[CaptionRecord]:
    return [CaptionRecord(str(root / folder / f"{i}.png"), (f"a thing {i}",), f"{folder}/{i}.png")
            for folder, count in folders.items() for i in range(count)]


def test_the_split_is_fixed_by_image(tmp_path):
    folders = {f"cat{c}/sub{s}": 3 + (c * 7 + s) % 9 for c in range(6) for s in range(5)}
    records = _records(tmp_path, folders)
    train, test = split_stamps(records, tmp_path, min_test=40)
    assert len(test) == 40 and len(train) + len(test) == len(records)
    assert {r.image for r in test}.isdisjoint(r.image for r in train)
    # The split depends on the paths only: shuffling the records, or another root, changes nothing.
    _, again = split_stamps(list(reversed(records)), tmp_path, min_test=40)
    assert {r.image for r in again} == {r.image for r in test}
    _, elsewhere = split_stamps(_records(tmp_path / "moved", folders), tmp_path / "moved", min_test=40)
    assert {r.origin for r in elsewhere} == {r.origin for r in test}
    assert len({stamp_folder(r, tmp_path) for r in test}) > 10  # spread over the folders, not a block


def _stamp(folder: Path, name: str, caption: str | None, svg_only: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if svg_only:
        (folder / f"{name}.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>')
    else:
        Image.new("RGBA", (20, 12), (200, 30, 30, 128)).save(folder / f"{name}.png")
    if caption is not None:
        (folder / f"{name}.txt").write_text(f"{caption}\nfr.utf8=Une chose.\n", encoding="utf-8")


def test_collections_are_read_as_the_demo_uses_them(tmp_path, monkeypatch):
    stamps, clipart = tmp_path / "stamps", tmp_path / "clipart"
    _stamp(stamps / "animals" / "birds", "robin", "A robin.")
    _stamp(stamps / "food", "pear", "A green pear.")
    _stamp(stamps / "food", "cheese", "A piece of cheese.", svg_only=True)
    _stamp(clipart / "recreation" / "sports", "table_tennis_omar_abo-na_01", None)
    monkeypatch.setenv("SIMLA_TUXPAINT_STAMPS", str(stamps))
    monkeypatch.setenv("SIMLA_OPENCLIPART", str(clipart))
    found = find_collections()
    assert sorted(r.captions for r in found.stamps) == [("A green pear.",), ("A robin.",)]  # English first lines
    assert found.svg_only_stamps == 1  # left out so that figures never depend on the SVG extra
    assert [r.captions for r in found.openclipart] == [("recreation sports table tennis omar abo na",)]


def test_a_missing_collection_is_one_line_saying_how_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SIMLA_TUXPAINT_STAMPS", str(tmp_path / "nowhere"))
    with pytest.raises(MissingCollectionError, match="apt install tuxpaint-stamps-default openclipart-png"):
        find_collections()
    one_line_error(capsys, ["demo", "clipart", "--quick", "--output", str(tmp_path / "out")],
                   "tuxpaint-stamps-default", "SIMLA_TUXPAINT_STAMPS")
    assert not (tmp_path / "out").exists()  # checked before any work


def test_chance_and_the_ablation_summary(tmp_path):
    class Set:
        images, texts = ["a"] * 200, ["t"] * 250
    base = chance(Set())
    assert base["img_r10"] == pytest.approx(5.0) and base["txt_r1"] == pytest.approx(0.4)
    metrics = lambda r10: {k: 0.0 for k in ("img_r1", "img_r5", "txt_r1", "txt_r5", "txt_r10")} | {"img_r10": r10}
    runs = [{"arm": ARMS[0][0], "seed": s, "zero_shot": {"itc": metrics(v)}} for s, v in enumerate((10.0, 20.0, 30.0))]
    row = summarise_arms(runs)[0]
    assert row["runs"] == 3 and row["itc_img_r10"] == pytest.approx(20.0) and row["itc_img_r10_std"] == pytest.approx(10.0)
    assert "itm_img_r10" not in row  # ITC alone has no ITM head to re-rank with


def test_quick_demo_on_the_real_pictures(real_collections, tmp_path):
    report = run_clipart_demo(tmp_path / "demo", quick=True)
    assert report["test_stamps"] >= 150 and report["pretraining_pairs"]["openclipart"] > 7000
    assert report["steps"] == QUICK.steps
    # Twelve steps learn no retrieval, but they do learn: on this fixed seed the summed loss falls (27.8 -> 19.6).
    assert sum(report["final_losses"].values()) < sum(report["first_losses"].values()) - 4.0
    assert set(report["zero_shot"]) == {"itc", "itm"} and report["images"]["transparent"] > 0
    assert report["chance"]["img_r10"] == pytest.approx(1000.0 / report["test_stamps"])
    assert report["search"]["images"] >= 700 and len(report["search"]["queries"]) == 12
    assert report["skipped"].get("too_large", 0) <= 20  # OpenClipart's few posters of > 89 megapixels
    for name in ("report.md", "examples.png", "recall_curve.png", "loss_curves.png", "results.html"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert len(report["explain_sheets"]) == QUICK.explain_count
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["summary"] == report["summary"]
    assert "checks that every stage works, not that the model learns" in report["summary"]


def test_the_clipart_demo_pretrains_its_own_model(tmp_path, capsys):
    one_line_error(capsys, ["demo", "clipart", "--from", str(tmp_path), "--output", str(tmp_path / "out")],
                   "--from belongs to the task demos", "clipart demo pretrains its own model")


def test_an_unknown_demo_is_one_line_naming_the_demos(capsys):
    one_line_error(capsys, ["demo", "foo"], "unknown demo 'foo'", "clipart", "retrieval", "vqa")
