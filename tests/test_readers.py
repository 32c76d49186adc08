"""Annotation readers: good files of every kind, and malformed ones named by file, record and field."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from simla.data.readers import (
    CaptionRecord,
    DataFormatError,
    is_shard_pattern,
    read_csv_records,
    read_json_records,
    read_records,
)


def write_json(path: Path, data: object) -> str:
    path.write_text(json.dumps(data), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------
# JSON list (the reference format) and JSON Lines
# ---------------------------------------------------------------------------------------------

def test_json_str_and_list_captions_with_image_root(tmp_path: Path) -> None:
    absolute = str(tmp_path / "abs.jpg")
    path = write_json(tmp_path / "train.json", [
        {"image": "a/1.jpg", "caption": "a dog"},
        {"image": absolute, "caption": ["one", "two"], "image_id": 7},  # extra keys are fine
    ])
    records = read_json_records(path, image_root="/data/coco")
    assert records == [
        CaptionRecord(image=os.path.join("/data/coco", "a/1.jpg"), captions=("a dog",), origin=f"{path}[0]"),
        CaptionRecord(image=absolute, captions=("one", "two"), origin=f"{path}[1]"),
    ]


def test_json_without_image_root_keeps_relative_paths(tmp_path: Path) -> None:
    path = write_json(tmp_path / "train.json", [{"image": "rel/1.jpg", "caption": ""}])
    (record,) = read_json_records(path)
    assert record.image == "rel/1.jpg"
    assert record.captions == ("",)  # empty captions are the dataset's business, not a format error


def test_json_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"image": "a.jpg", "caption": "x"},\n  {"image": "b.jpg" "caption": "y"}\n]\n')
    with pytest.raises(DataFormatError, match=r"broken\.json: invalid JSON at line 3, column \d+") as info:
        read_json_records(path)
    assert info.value.path == str(path)


def test_json_top_level_must_be_a_list(tmp_path: Path) -> None:
    path = write_json(tmp_path / "obj.json", {"image": "a.jpg", "caption": "x"})
    with pytest.raises(DataFormatError, match=r"obj\.json: expected a JSON list .* got dict"):
        read_json_records(path)


@pytest.mark.parametrize(("record", "field", "expected"), [
    ("just a string", None, "expected an object"),
    ({"caption": "x"}, "image", "missing"),
    ({"image": "a.jpg"}, "caption", "missing"),
    ({"image": 3, "caption": "x"}, "image", "non-empty string path, got int"),
    ({"image": "", "caption": "x"}, "image", "non-empty string path"),
    ({"image": "a.jpg", "caption": 5}, "caption", "got int 5"),
    ({"image": "a.jpg", "caption": None}, "caption", "got NoneType"),
    ({"image": "a.jpg", "caption": []}, "caption", "empty list"),
    ({"image": "a.jpg", "caption": ["ok", 1]}, "caption[1]", "expected a string, got int"),
])
def test_json_bad_record_names_file_index_and_field(tmp_path: Path, record: object, field: str | None,
                                                     expected: str) -> None:
    good = {"image": "ok.jpg", "caption": "fine"}
    path = write_json(tmp_path / "ann.json", [good, good, record])
    with pytest.raises(DataFormatError) as info:
        read_json_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}, record 2")
    assert expected in message
    if field is not None:
        assert f"field {field!r}" in message
    assert (info.value.record, info.value.field) == ("record 2", field)


def test_jsonl_reads_one_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "1.jpg", "caption": "a"}\n\n{"image": "2.jpg", "caption": ["b", "c"]}\n')
    records = read_json_records(path, image_root=tmp_path)
    assert [r.image for r in records] == [str(tmp_path / "1.jpg"), str(tmp_path / "2.jpg")]
    assert [r.captions for r in records] == [("a",), ("b", "c")]
    assert [r.origin for r in records] == [f"{path}:1", f"{path}:3"]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "1.jpg", "caption": "a"}\n{"image": "2.jpg", "caption": 4}\n')
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl, line 2, field 'caption'"):
        read_json_records(path)
    path.write_text('{"image": "1.jpg", "caption": "a"}\n{"image": "2.jpg",\n')
    with pytest.raises(DataFormatError, match=r"pairs\.jsonl, line 2: invalid JSON at column \d+"):
        read_json_records(path)


# ---------------------------------------------------------------------------------------------
# CSV / TSV
# ---------------------------------------------------------------------------------------------

def test_csv_default_columns_and_image_root(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    absolute = str(tmp_path / "abs.jpg")
    path.write_text(f'filepath,title,extra\nimgs/1.jpg,"a dog, running",x\n{absolute},,y\n', encoding="utf-8")
    records = read_csv_records(path, image_root="/root")
    assert records == [
        CaptionRecord(image=os.path.join("/root", "imgs/1.jpg"), captions=("a dog, running",), origin=f"{path}:2"),
        CaptionRecord(image=absolute, captions=("",), origin=f"{path}:3"),  # empty caption kept
    ]


def test_csv_with_bom_and_quoted_newline_reports_physical_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text('\ufefffilepath,title\n1.jpg,"two\nlines"\n\n2.jpg,b\n', encoding="utf-8")
    records = read_csv_records(path)
    assert [r.captions for r in records] == [("two\nlines",), ("b",)]
    assert [r.origin for r in records] == [f"{path}:3", f"{path}:5"]


def test_tsv_uses_tab_and_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "cc3m.tsv"
    path.write_text("caption\turl\nthe sky, at night\tx/1.jpg\n", encoding="utf-8")
    (record,) = read_csv_records(path, image_key="url", caption_key="caption")
    assert record == CaptionRecord(image="x/1.jpg", captions=("the sky, at night",), origin=f"{path}:2")
    semicolons = tmp_path / "pairs.txt.csv"
    semicolons.write_text("filepath;title\n1.jpg;hi\n")
    assert read_csv_records(semicolons, delimiter=";")[0].captions == ("hi",)


def test_csv_missing_column_lists_columns_found(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("path,caption\n1.jpg,a\n")
    with pytest.raises(DataFormatError) as info:
        read_csv_records(path)
    message = str(info.value)
    assert str(path) in message and "'filepath' not found" in message and "['path', 'caption']" in message
    assert info.value.field == "filepath"


def test_csv_empty_image_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\n1.jpg,a\n  ,b\n")
    with pytest.raises(DataFormatError, match=r"pairs\.csv, line 3, field 'filepath': empty image path"):
        read_csv_records(path)


def test_csv_wrong_field_count_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("filepath,title\n1.jpg,a\n2.jpg,an, unquoted comma\n")
    with pytest.raises(DataFormatError, match=r"pairs\.csv, line 3: expected 2 fields .* found 3"):
        read_csv_records(path)
    path.write_text("filepath,title\n1.jpg\n")
    with pytest.raises(DataFormatError, match=r"pairs\.csv, line 2: expected 2 fields .* found 1"):
        read_csv_records(path)


def test_csv_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    with pytest.raises(DataFormatError, match=r"empty\.csv: empty file"):
        read_csv_records(path)


# ---------------------------------------------------------------------------------------------
# read_records and is_shard_pattern
# ---------------------------------------------------------------------------------------------

def test_read_records_concatenates_in_order_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = write_json(tmp_path / "a.json", [{"image": "1.jpg", "caption": "one"}])
    b = tmp_path / "b.tsv"
    b.write_text("filepath\ttitle\n2.jpg\ttwo\n3.jpg\tthree\n")
    c = tmp_path / "c.jsonl"
    c.write_text('{"image": "4.jpg", "caption": ["four"]}\n')
    with caplog.at_level(logging.INFO, logger="simla.data.readers"):
        records = read_records([a, str(b), c], image_root="/r")
    assert [r.captions[0] for r in records] == ["one", "two", "three", "four"]
    assert [r.image for r in records] == [os.path.join("/r", f"{i}.jpg") for i in range(1, 5)]
    assert f"read 2 records from {b}" in caplog.text
    assert read_records(a, "/r") == records[:1]  # a single str path


def test_read_records_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("img,text\n1.jpg,hello\n")
    assert read_records(path, image_key="img", caption_key="text")[0].captions == ("hello",)


def test_read_records_checks_every_file_before_reading(tmp_path: Path) -> None:
    bad = write_json(tmp_path / "bad.json", "not a list")
    missing = str(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records([bad, missing])  # the missing file is reported before bad.json is parsed
    with pytest.raises(DataFormatError, match=r"ann\.yaml: unknown annotation file extension"):
        read_records([bad, str(tmp_path / "ann.yaml")])
    with pytest.raises(DataFormatError, match="tar shards"):
        read_records([bad, str(tmp_path / "00000.tar")])
    with pytest.raises(DataFormatError, match="no annotation files"):
        read_records([])


@pytest.mark.parametrize(("spec", "expected"), [
    ("data/{00000..00009}.tar", True),
    ("data/000.tar", True),
    ("a/{0..3}.tar::b/{0..1}.TAR", True),
    (["a/0.tar", "b/{1,2}.tar"], True),
    ("data/x.tar.gz", True),
    ("train.json", False),
    (["a.tar", "b.json"], False),
    ("", False),
    ([], False),
    (Path("s/0.tar"), True),
])
def test_is_shard_pattern(spec: object, expected: bool) -> None:
    assert is_shard_pattern(spec) is expected  # type: ignore[arg-type]
