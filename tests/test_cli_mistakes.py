"""Issue 26: mistakes that used to half-work now get one `simla: error:` line (exit 2) and write nothing."""

from __future__ import annotations

import pytest

from conftest import one_line_error


@pytest.mark.parametrize("task", ["vqa", "nlvr", "ve", "grounding", "search"])
def test_demo_from_an_unfinished_folder_writes_nothing(tmp_path, capsys, task):
    out = tmp_path / "out"
    one_line_error(capsys, ["demo", task, "--quick", "--from", str(tmp_path / "missing"), "--output", str(out)],
                   "--from", "missing", "no such folder")
    assert not out.exists()
    started = tmp_path / "started"  # a demo that has not finished: no pretrain/checkpoints/last.pt yet
    (started / "pretrain" / "checkpoints").mkdir(parents=True)
    out.mkdir()
    one_line_error(capsys, ["demo", task, "--quick", "--from", str(started), "--output", str(out)],
                   "last.pt is missing")
    assert list(out.iterdir()) == []
