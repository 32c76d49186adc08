"""Grounding data: train pairs, eval refs (inline facts or REFER files), safe pickle reading, detections."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest

from simla.data.grounding import (
    INSTANCES_FILE,
    REFS_FILE,
    GroundingRef,
    UnsafePickleError,
    load_plain_pickle,
    read_detections,
    read_grounding_refs,
    read_grounding_train,
)
from simla.data.readers import DataFormatError


def write(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def refer_folder(root: Path) -> Path:
    """A REFER folder with two refs: 7 (ann 70, image 700) and 8 (ann 80, image 800)."""
    folder = root / "refer"
    folder.mkdir()
    refs = [{"ref_id": 7, "ann_id": 70, "image_id": 700, "split": "testA", "sentences": [{"raw": "x"}]},
            {"ref_id": 8, "ann_id": 80, "image_id": 800, "split": "val", "sent_ids": [1, 2]}]
    (folder / REFS_FILE).write_bytes(pickle.dumps(refs))
    write(folder / INSTANCES_FILE, {
        "images": [{"id": 700, "height": 480, "width": 640, "file_name": "a.jpg"},
                   {"id": 800, "height": 300, "width": 400, "file_name": "b.jpg"}],
        "annotations": [{"id": 70, "bbox": [10, 20, 30, 40], "image_id": 700},
                        {"id": 80, "bbox": [1.5, 2.5, 3.5, 4.5], "image_id": 800}],
        "categories": []})
    return folder


# ---- train ----

def test_train_ids_follow_file_names_in_first_appearance_order(tmp_path):
    path = write(tmp_path / "train.json", [
        {"image": "coco/b.jpg", "text": "left dog", "extra": 1},
        {"image": "coco/a.jpg", "text": "red car"},
        {"image": "coco/b.jpg", "text": "right dog"},
        {"image": "other/a.jpg", "text": "same file name, same id (the reference keys on the name)"},
        {"image": "/abs/c.jpg", "text": "absolute"},
    ])
    records = read_grounding_train(path, image_root="/data")
    assert [r.image_id for r in records] == [0, 1, 0, 1, 2]
    assert records[0].image == os.path.join("/data", "coco/b.jpg") and records[4].image == "/abs/c.jpg"
    assert records[0].captions == ("left dog",) and records[1].origin == f"{path}[1]"
    assert read_grounding_train(path)[0].image == "coco/b.jpg"


@pytest.mark.parametrize("record, field", [
    ({"image": "a.jpg"}, "text"), ({"image": "a.jpg", "text": "  "}, "text"), ({"image": "a.jpg", "text": 3}, "text"),
    ({"text": "x"}, "image"), ({"image": "", "text": "x"}, "image"),
])
def test_train_errors_name_file_record_and_field(tmp_path, record, field):
    path = write(tmp_path / "train.json", [{"image": "ok.jpg", "text": "ok"}, record])
    with pytest.raises(DataFormatError, match=f"record 1, field '{field}'") as err:
        read_grounding_train(path)
    assert (err.value.path, err.value.record, err.value.field) == (str(path), "1", field)
    assert str(path) in str(err.value)


def test_train_file_must_be_a_json_list(tmp_path):
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        read_grounding_train(write(tmp_path / "t.json", {"image": "a.jpg"}))
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DataFormatError, match="invalid JSON"):
        read_grounding_train(tmp_path / "bad.json")


# ---- refs with inline facts ----

def test_refs_with_inline_facts_need_no_refer_files(tmp_path):
    path = write(tmp_path / "refs.json", [
        {"image": "a.jpg", "text": "man", "ref_id": 3, "bbox": [1, 2, 3, 4], "split": "val", "image_id": 12,
         "height": 100, "width": 200},
        {"image": "/abs/b.jpg", "text": "", "ref_id": 4, "bbox": [0.5, 0, 2, 2], "split": "testB", "image_id": "x9"},
    ])
    refs = read_grounding_refs(path, image_root="/img")
    assert refs[0] == GroundingRef(3, os.path.join("/img", "a.jpg"), "man", "12", "val", (1.0, 2.0, 3.0, 4.0), (100, 200))
    assert refs[1] == GroundingRef(4, "/abs/b.jpg", "", "x9", "testB", (0.5, 0.0, 2.0, 2.0), None)
    assert isinstance(refs[0].image_id, str) and all(isinstance(v, float) for v in refs[0].box)
    empty = tmp_path / "empty"  # every fact and size in the file: the REFER files are never opened
    empty.mkdir()
    complete = write(tmp_path / "complete.json", json.loads(path.read_text())[:1])
    assert read_grounding_refs(complete, image_root="/img", refer_dir=empty) == refs[:1]


def test_missing_facts_without_refer_dir_name_the_first_record_and_field(tmp_path):
    path = write(tmp_path / "refs.json", [
        {"image": "a.jpg", "text": "x", "ref_id": 1, "bbox": [0, 0, 1, 1], "split": "val", "image_id": 1},
        {"image": "a.jpg", "text": "y", "ref_id": 2, "bbox": [0, 0, 1, 1], "image_id": 1},
        {"image": "a.jpg", "text": "z", "ref_id": 3},
    ])
    with pytest.raises(DataFormatError, match="record 1, field 'split'.*pass refer_dir") as err:
        read_grounding_refs(path)
    assert (err.value.path, err.value.record, err.value.field) == (str(path), "1", "split")
    assert REFS_FILE in str(err.value) and str(path) in str(err.value) and "add 'split'" in str(err.value)


@pytest.mark.parametrize("change, field, message", [
    ({"text": None}, "text", "missing"),
    ({"ref_id": "7"}, "ref_id", "unexpected str"),
    ({"ref_id": True}, "ref_id", "unexpected bool"),
    ({"bbox": [1, 2, 3]}, "bbox", "expected 4 numbers"),
    ({"bbox": [1, 2, 0, 4]}, "bbox", "positive"),
    ({"bbox": [1, 2, 3, -4]}, "bbox", "positive"),
    ({"bbox": [1, 2, float("nan"), 4]}, "bbox", "finite"),
    ({"bbox": [1, "2", 3, 4]}, "bbox", "finite"),
    ({"split": ""}, "split", "empty"),
    ({"image_id": 1.5}, "image_id", "unexpected float"),
    ({"height": 10}, "width", "missing"),
    ({"height": 0, "width": 5}, "height", "positive"),
    ({"image": ""}, "image", "empty"),
])
def test_ref_field_errors(tmp_path, change, field, message):
    good = {"image": "a.jpg", "text": "x", "ref_id": 1, "bbox": [0, 0, 1, 1], "split": "val", "image_id": 1}
    bad = {**good, "ref_id": 2, **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    path = write(tmp_path / "refs.json", [good, bad])
    with pytest.raises(DataFormatError, match=f"record 1, field '{field}': .*{message}") as err:
        read_grounding_refs(path)
    assert (err.value.path, err.value.record, err.value.field) == (str(path), "1", field)


def test_duplicate_ref_id_names_both_records(tmp_path):
    rec = {"image": "a.jpg", "text": "x", "bbox": [0, 0, 1, 1], "split": "val", "image_id": 1}
    path = write(tmp_path / "refs.json", [{**rec, "ref_id": 5}, {**rec, "ref_id": 6}, {**rec, "ref_id": 5}])
    with pytest.raises(DataFormatError, match=r"record 2, field 'ref_id': duplicate ref_id 5 \(also record 0\)"):
        read_grounding_refs(path)


# ---- refs completed from REFER ----

def test_refer_files_fill_in_what_records_lack(tmp_path):
    folder = refer_folder(tmp_path)
    path = write(tmp_path / "refs.json", [
        {"image": "a.jpg", "text": "the man", "ref_id": 7},
        {"image": "b.jpg", "text": "", "ref_id": 8, "split": "mine", "height": 9, "width": 9},  # record wins
    ])
    refs = read_grounding_refs(path, image_root="/img", refer_dir=folder)
    assert refs[0] == GroundingRef(7, os.path.join("/img", "a.jpg"), "the man", "700", "testA",
                                   (10.0, 20.0, 30.0, 40.0), (480, 640))
    assert refs[1] == GroundingRef(8, os.path.join("/img", "b.jpg"), "", "800", "mine", (1.5, 2.5, 3.5, 4.5), (9, 9))


def test_refer_only_for_the_size(tmp_path):
    folder = refer_folder(tmp_path)
    path = write(tmp_path / "refs.json", [{"image": "b.jpg", "text": "x", "ref_id": 99, "bbox": [0, 0, 2, 2],
                                           "split": "val", "image_id": 800}])
    (folder / REFS_FILE).unlink()  # not needed: every fact but the size is in the record
    assert read_grounding_refs(path, refer_dir=folder)[0].size == (300, 400)


def test_unknown_ref_id_is_named(tmp_path):
    folder = refer_folder(tmp_path)
    path = write(tmp_path / "refs.json", [{"image": "a.jpg", "text": "x", "ref_id": 7},
                                          {"image": "a.jpg", "text": "x", "ref_id": 12345}])
    with pytest.raises(DataFormatError, match=r"record 1, field 'ref_id': ref_id 12345 is not in .*refs\(unc\)\.p"):
        read_grounding_refs(path, refer_dir=folder)


def test_refer_annotation_problems_name_instances_json(tmp_path):
    folder = refer_folder(tmp_path)
    instances = json.loads((folder / INSTANCES_FILE).read_text())
    instances["annotations"][0]["bbox"] = [10, 20, 0, 40]
    del instances["annotations"][1]
    write(folder / INSTANCES_FILE, instances)
    path = write(tmp_path / "refs.json", [{"image": "a.jpg", "text": "x", "ref_id": 7}])
    with pytest.raises(DataFormatError, match=f"{INSTANCES_FILE}, annotation id 70, field 'bbox': .*positive"):
        read_grounding_refs(path, refer_dir=folder)
    path = write(tmp_path / "refs.json", [{"image": "a.jpg", "text": "x", "ref_id": 8}])
    with pytest.raises(DataFormatError, match="no annotation with id 80 \\(ann_id of ref_id 8\\)"):
        read_grounding_refs(path, refer_dir=folder)


def test_bad_refs_pickle_record_is_named(tmp_path):
    folder = refer_folder(tmp_path)
    (folder / REFS_FILE).write_bytes(pickle.dumps([{"ref_id": 7, "ann_id": 70, "image_id": 700}]))
    path = write(tmp_path / "refs.json", [{"image": "a.jpg", "text": "x", "ref_id": 7}])
    with pytest.raises(DataFormatError, match=r"refs\(unc\)\.p, record 0, field 'split': missing"):
        read_grounding_refs(path, refer_dir=folder)


def test_missing_refer_folder_or_file(tmp_path):
    path = write(tmp_path / "refs.json", [{"image": "a.jpg", "text": "x", "ref_id": 7}])
    with pytest.raises(FileNotFoundError, match="no such REFER folder"):
        read_grounding_refs(path, refer_dir=tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p"):
        read_grounding_refs(path, refer_dir=tmp_path / "empty")


# ---- safe pickle ----

class Payload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


class Plain:
    pass


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_pickle_loads_containers(tmp_path, protocol):
    data = [{"ref_id": 1, "split": "val", "box": (1.5, 2), "ok": True, "none": None, "big": 2**70}]
    (tmp_path / "p.p").write_bytes(pickle.dumps(data, protocol=protocol))
    assert load_plain_pickle(tmp_path / "p.p") == data


def test_python2_style_pickle_with_non_ascii_str_loads(tmp_path):
    # protocol 0 as Python 2 writes it: str objects are bytes ('S' opcode), here with a latin-1 byte
    (tmp_path / "py2.p").write_bytes(b"(lp0\n(dp1\nS'ref_id'\np2\nI7\nsS'raw'\np3\nS'caf\\xe9'\np4\nsa.")
    assert load_plain_pickle(tmp_path / "py2.p") == [{"ref_id": 7, "raw": "caf\xe9"}]


@pytest.mark.parametrize("obj, name", [(Plain(), "Plain"), ([{"f": os.system}], "system")])
def test_pickle_with_globals_is_refused(tmp_path, obj, name):
    (tmp_path / "evil.p").write_bytes(pickle.dumps(obj))
    with pytest.raises(UnsafePickleError, match=f"{re.escape(str(tmp_path / 'evil.p'))}: refusing to load .*{name}"):
        load_plain_pickle(tmp_path / "evil.p")


def test_reduce_payload_never_runs(tmp_path):
    target = tmp_path / "pwned"
    folder = refer_folder(tmp_path)
    (folder / REFS_FILE).write_bytes(pickle.dumps([{"ref_id": 7, "x": Payload(str(target))}]))
    path = write(tmp_path / "refs.json", [{"image": "a.jpg", "text": "x", "ref_id": 7}])
    with pytest.raises(pickle.UnpicklingError, match=r"refs\(unc\)\.p: refusing to load .*mkdir"):
        read_grounding_refs(path, refer_dir=folder)
    assert not target.exists()


def test_broken_pickle_names_the_file(tmp_path):
    (tmp_path / "cut.p").write_bytes(pickle.dumps([{"a": 1}] * 10)[:-7])
    with pytest.raises(pickle.UnpicklingError, match="cut.p: not a readable pickle"):
        load_plain_pickle(tmp_path / "cut.p")


# ---- detections ----

def test_detections_keep_the_first_four_numbers(tmp_path):
    path = write(tmp_path / "dets.json", {"700": [[1, 2, 3, 4, 0.9], [0.5, 1.5, 2, 2]], "800": []})
    assert read_detections(path) == {"700": [(1.0, 2.0, 3.0, 4.0), (0.5, 1.5, 2.0, 2.0)], "800": []}


@pytest.mark.parametrize("boxes, message", [
    ([[1, 2, 3, 4], [1, 2, 3]], "at least 4 numbers"), ([[1, 2, 3, 4], "box"], "at least 4 numbers"),
    ([[1, 2, 3, 4], [1, 2, None, 4]], "finite"), ([[1, 2, 3, 4], [1, 2, 3, float("inf")]], "finite"),
])
def test_bad_detection_names_image_and_box(tmp_path, boxes, message):
    path = write(tmp_path / "dets.json", {"5": [[0, 0, 1, 1]], "12": boxes})
    with pytest.raises(DataFormatError, match=f"image '12', box 1: .*{message}") as err:
        read_detections(path)
    assert (err.value.path, err.value.record, err.value.field) == (str(path), "12", "box 1")


def test_detections_must_be_an_object_of_lists(tmp_path):
    with pytest.raises(DataFormatError, match="expected a JSON object"):
        read_detections(write(tmp_path / "d.json", [[1, 2, 3, 4]]))
    with pytest.raises(DataFormatError, match="image '3': expected a list of boxes"):
        read_detections(write(tmp_path / "d.json", {"3": {"box": 1}}))
    with pytest.raises(FileNotFoundError):
        read_detections(tmp_path / "missing.json")
