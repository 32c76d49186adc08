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


def _retrieval_figures() -> list[str]:
    r = full_run("retrieval")
    itm, itc, pair = r["zero_shot_accuracy_itm"], r["zero_shot_accuracy_itc"], r["itm_pair_accuracy"]
    curve = {point["step"]: point for point in r["accuracy_curve"]}
    rows = {row["row"]: row for row in r["ablation"]}
    figures = [
        f"| zero-shot accuracy, ITM ranking | {_pct(itm['image_to_text'])} | {_pct(itm['text_to_image'])} |",
        f"| zero-shot accuracy, ITC ranking | {_pct(itc['image_to_text'])} | {_pct(itc['text_to_image'])} |",
        f"ITM accuracy against near misses: {_pct(pair['accuracy'])} (own caption {_pct(pair['positives'])}, "
        f"colour-only negatives {_pct(pair['colour_negatives'])}, shape-only negatives "
        f"{_pct(pair['shape_negatives'])})",
        f"the ITM loss falls from {r['first_losses']['loss_itm']:.3f} (a constant guess scores 0.636) to "
        f"{r['final_losses']['loss_itm']:.3f}",
        f"Time: {r['seconds']['pretraining']:.0f} s of pretraining plus {r['seconds']['evaluation']:.0f} s of "
        f"evaluation",
        f"climbs from {curve[50]['image_to_text']:.0f}% / {curve[50]['text_to_image']:.0f}% (image to text / text "
        f"to image, step 50) to {curve[250]['image_to_text']:.0f}% / {curve[250]['text_to_image']:.0f}% at step 250",
        f"the {r['labelling']['train']['labelled']:,} training images",
    ]
    for name, label in (("ITC+ITM", "ITC+ITM"), ("+MLM", "+MLM"), ("+MIM", "+MIM"), ("+PSL", "+PSL (all five)")):
        row = rows[name]
        figures.append(f"| {label} | {_pct(row['zero_shot_accuracy_itm']['image_to_text'])} | "
                       f"{_pct(row['zero_shot_accuracy_itm']['text_to_image'])} | "
                       f"{_pct(row['itm_pair_accuracy']['accuracy'])} | {row['seconds']:.0f} s |")
    return figures


def _task_figures() -> list[str]:
    vqa, nlvr, ve, grounding = (full_run(name) for name in ("vqa", "nlvr", "ve", "grounding"))
    types = vqa["per_question_type"]
    return [
        f"| vqa | {vqa['steps']:,} ({vqa['batch_size']}), ViT fixed | {_pct(vqa['accuracy'])} (all "
        f"{vqa['questions']['test']:,} test questions) | | | {vqa['seconds']['total']:.0f} s |",
        f"| nlvr | {nlvr['text_assignment_steps']} text assignment + {nlvr['steps']:,} ({nlvr['batch_size']}), ViT "
        f"fixed | {_pct(nlvr['accuracy'])} | {_pct(nlvr['dev_accuracy'])} | {_pct(nlvr['majority_class_accuracy'])} | "
        f"{nlvr['seconds']['total']:.0f} s |",
        f"| ve | {ve['steps']:,} ({ve['batch_size']}) | {_pct(ve['accuracy'])} | {_pct(ve['dev_accuracy'])} | "
        f"{_pct(ve['majority_class_accuracy'])} | {ve['seconds']['total']:.0f} s |",
        f"| grounding | {grounding['steps']:,} ({grounding['batch_size']}) at {grounding['image_size']} px | "
        f"{_pct(grounding['accuracy'])} ({grounding['test_expressions']:,} expressions) | | "
        f"{_pct(grounding['chance'])} (random proposal) | {grounding['seconds']['total']:.0f} s |",
        f"what colour {_pct(types['colour']['accuracy'])}, what shape {_pct(types['shape']['accuracy'])}, yes/no "
        f"about a colour {_pct(types['yes/no colour']['accuracy'])}, yes/no about a shape "
        f"{_pct(types['yes/no shape']['accuracy'])}",
        f"{_pct(nlvr['per_class']['True']['accuracy'])} on true statements, "
        f"{_pct(nlvr['per_class']['False']['accuracy'])} on false ones",
        f"neutral {_pct(ve['per_class']['neutral']['accuracy'])}, entailment "
        f"{_pct(ve['per_class']['entailment']['accuracy'])}, contradiction "
        f"{_pct(ve['per_class']['contradiction']['accuracy'])}",
        f"Grounding: {_pct(grounding['zero_shot_accuracy'])} before fine-tuning",
    ]


def _pointing_figures() -> list[str]:
    r = full_run("grounding")
    p = r["pointing"]
    tuned, before = p["fine_tuned"], p["before_fine_tuning"]
    return [
        f"on the grounding demo's {p['expressions']:,} test expressions the whole-text map's peak falls inside "
        f"the named shape's box {tuned['whole_text']['rate']:.1f}% of the time after fine-tuning "
        f"({before['whole_text']['rate']:.1f}% before; a random one of the canvas's four shapes: "
        f"{p['baselines']['random_shape']:.0f}%, a random point: {p['baselines']['random_point']:.1f}%, the image "
        f"centre: {p['baselines']['image_centre']['rate']:.0f}%)",
        f"colour words {tuned['groups']['colour words']['rate']:.1f}% and shape words "
        f"{tuned['groups']['shape words']['rate']:.1f}%",
    ]


FIGURES = {"clipart": _clipart_figures, "search": _search_figures, "retrieval": _retrieval_figures,
           "tasks": _task_figures, "pointing": _pointing_figures}


@pytest.mark.parametrize("demo", sorted(FIGURES))
def test_readme_figures_are_the_full_runs(demo):
    # Each figure the README quotes, formatted from the shipped full-run report (line breaks as in the README).
    flat = " ".join(README.split())
    missing = [figure for figure in FIGURES[demo]() if " ".join(figure.split()) not in flat]
    assert not missing, f"README figures of `{demo}` that differ from its full run: {missing}"
