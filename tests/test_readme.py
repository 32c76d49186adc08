"""The README as a newcomer uses it: every Python block runs as written, every demo figure it quotes is
what the demo's full run measured (the references shipped in simla/demos/reference/)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import simla
from simla.demos.reference import HEADLINES, add_quick_notice, full_run, quick_notice
from simla.tasks import demos

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)


def test_the_readme_has_its_python_blocks():
    # The extraction itself: a changed fence style must not silently leave nothing to run.
    assert len(PYTHON_BLOCKS) >= 4
    assert "simla.create_model" in PYTHON_BLOCKS[0]


@pytest.fixture(scope="module")
def demo_outputs(tmp_path_factory) -> Path:
    """A working folder holding what the blocks read: the files `simla demo` and `simla demo vqa` leave in
    runs/ (tiny random models stand in for the demo's trained ones; the blocks only need them to load)."""
    pytest.importorskip("easy_vqa")
    root = tmp_path_factory.mktemp("readme")
    simla.save_checkpoint(simla.create_model("simla_tiny"), root / "runs/demo/pretrain/checkpoints/last.pt")
    simla.save_checkpoint(simla.create_model("simla_tiny", task="vqa"),
                          root / "runs/demo_vqa/vqa/checkpoints/last.pt")
    (root / "runs/demo_vqa/answer_list.json").write_text(json.dumps(["circle", "rectangle", "triangle", "red"]))
    return root


@pytest.mark.parametrize("number", range(len(PYTHON_BLOCKS)))
def test_python_block_runs_as_written(number, demo_outputs):
    block = PYTHON_BLOCKS[number]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", block], cwd=demo_outputs, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"README Python block {number + 1} failed:\n{block}\n{done.stderr[-3000:]}"


def test_every_demo_has_a_full_run_reference():
    assert set(HEADLINES) == set(demos())
    for demo in demos():
        report = full_run(demo)
        assert report["mode"] == "full", demo
        assert "/tmp/" not in json.dumps(report), f"{demo}: a machine path in the shipped reference"


def test_a_quick_report_says_what_it_checks_and_quotes_the_full_run():
    report = {"mode": "quick", "summary": "simla demo vqa (quick): 40 steps\nVQA accuracy: 5.00%"}
    add_quick_notice(report, "vqa")
    full = full_run("vqa")
    assert report["summary"].startswith("simla demo vqa (quick)")
    assert "not that the model learns" in report["summary"]
    assert f"VQA accuracy {full['accuracy']:.1f}%" in report["summary"]
    assert report["full_run"]["seconds"] == full["seconds"]["total"]
    # A full run is its own figure: nothing added.
    report = {"mode": "full", "summary": "x"}
    add_quick_notice(report, "vqa")
    assert report == {"mode": "full", "summary": "x"}


def test_quick_notice_names_the_command_of_the_full_run():
    assert "`simla demo grounding --from runs/demo`" in quick_notice("grounding")
    assert "`simla demo`" in quick_notice("retrieval")


# ------------------------------------------------------------------------ the README's figures
def _pct(value: float) -> str:
    return f"{value:.1f}%"


def _clipart_figures() -> list[str]:
    r = full_run("clipart")
    arms = {arm["arm"]: arm for arm in r["ablation"]["arms"]}

    def arm(name: str) -> str:
        return f"{arms[name]['itc_img_r10']:.1f} ± {arms[name]['itc_img_r10_std']:.1f}"

    return [
        f"{r['steps']} steps of {r['batch_size']} pairs, {r['seconds']['total']:.0f} s in all",
        f"zero-shot\ntext-to-image R@10 {_pct(r['zero_shot']['itc']['img_r10'])} (chance "
        f"{_pct(r['chance']['img_r10'])}), {_pct(r['finetuned']['img_r10'])} after fine-tuning",
        f"category precision@10 {r['search']['precision_at_10']['itc']:.2f} (random "
        f"{r['search']['precision_at_10']['chance']:.2f})",
        f"{r['zero_shot']['itc']['img_r10'] / r['chance']['img_r10']:.1f}x chance",
        f"ITC alone {arm('ITC (CLIP-like)')}, ALBEF's ITC+ITM+MLM {arm('ITC+ITM+MLM (ALBEF)')}",
        f"SIMLA's five objectives {arm('SIMLA (all five)')}",
    ]


def _search_figures() -> list[str]:
    r = full_run("search")
    worse = [q for q in r["queries"] if q["itm"] < q["itc"]]
    return [
        f"| ITC alone | {r['precision_itc']:.3f} | {r['query_ms_itc']:.1f} ms |",
        f"| ITC top {r['rerank']} re-ranked by ITM | {r['precision_itm']:.3f} | {r['query_ms_itm']:.0f} ms |",
        *[f"\"{q['query']}\" {q['itc']:.1f} -> {q['itm']:.1f}" for q in worse],
        f"On the easy-VQA test images ({r['images']} images",
    ]


FIGURES = {"clipart": _clipart_figures, "search": _search_figures}


@pytest.mark.parametrize("demo", sorted(FIGURES))
def test_readme_figures_are_the_full_runs(demo):
    # Each figure the README quotes, formatted from the shipped full-run report (line breaks as in the README).
    flat = " ".join(README.split())
    missing = [figure for figure in FIGURES[demo]() if " ".join(figure.split()) not in flat]
    assert not missing, f"README figures of `{demo}` that differ from its full run: {missing}"
