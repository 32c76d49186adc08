"""What each demo's full run measured, shipped with simla, so that nothing quotes a stale figure.

A quick run (`simla demo ... --quick`) takes a few dozen steps: it checks that every stage works end to end,
not that the model learns, and its figures are often at chance. Its report therefore quotes the full run's
headline figure and time beside its own. The files in `reference/` are the full runs' report.json files
(with the machine's paths taken out); the project's tests check the figures the README quotes against them.
Refresh them after re-running the full demos:

    python scripts/store_demo_references.py retrieval=runs/demo vqa=runs/demo_vqa grounding=runs/demo_grounding ...
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE_DIR = Path(__file__).with_name("reference")


@dataclass(frozen=True)
class Headline:
    command: str  # how the full run is made
    figure: Callable[[dict[str, Any]], str]  # its headline result, from its report
    seconds: Callable[[dict[str, Any]], float] | None = None  # its time, when not report["seconds"]["total"]


def _classification(report: dict[str, Any]) -> str:
    return (f"test accuracy {report['accuracy']:.1f}% (majority class {report['majority_class_accuracy']:.1f}%)")


HEADLINES: dict[str, Headline] = {
    "retrieval": Headline("simla demo", lambda r: (
        f"zero-shot accuracy by ITM {r['zero_shot_accuracy_itm']['image_to_text']:.1f}% image->text and "
        f"{r['zero_shot_accuracy_itm']['text_to_image']:.1f}% text->image (chance 4.2%)"),
        # Without --ablation's further runs, which the reference run also made.
        lambda r: r["seconds"]["pretraining"] + r["seconds"]["evaluation"]),
    "vqa": Headline("simla demo vqa --from runs/demo", lambda r: (
        f"VQA accuracy {r['accuracy']:.1f}% on {r['questions']['test']:,} test questions")),
    "nlvr": Headline("simla demo nlvr --from runs/demo", _classification),
    "ve": Headline("simla demo ve --from runs/demo", _classification),
    "grounding": Headline("simla demo grounding --from runs/demo", lambda r: (
        f"grounding accuracy {r['accuracy']:.1f}% (a random proposal {r['chance']:.1f}%)")),
    "search": Headline("simla demo search --from runs/demo", lambda r: (
        f"precision@10 {r['precision_itc']:.3f} by ITC, {r['precision_itm']:.3f} re-ranked by ITM")),
    "clipart": Headline("simla demo clipart", lambda r: (
        f"zero-shot text->image R@10 {r['zero_shot']['itc']['img_r10']:.1f}% by ITC "
        f"(chance {r['chance']['img_r10']:.1f}%)")),
}


def full_run(demo: str) -> dict[str, Any]:
    """The report of demo `demo`'s full run, as shipped (KeyError for a demo without one)."""
    if demo not in HEADLINES:
        raise KeyError(f"no full-run reference for demo {demo!r}; known: {sorted(HEADLINES)}")
    return json.loads((REFERENCE_DIR / f"{demo}.json").read_text(encoding="utf-8"))


def total_seconds(demo: str, report: dict[str, Any]) -> float:
    """The time of the demo itself (a search demo's report holds one number, the others a breakdown)."""
    if HEADLINES[demo].seconds is not None:
        return float(HEADLINES[demo].seconds(report))
    seconds = report["seconds"]
    return float(seconds["total"] if isinstance(seconds, dict) else seconds)


def quick_notice(demo: str) -> str:
    """The line a quick report carries: what a quick run shows, and what the full run measured."""
    headline = HEADLINES[demo]
    full = full_run(demo)
    conditions = f", {full['measured_under']}" if full.get("measured_under") else ""
    return (f"quick run: it checks that every stage works, not that the model learns (too few steps). The full "
            f"run (`{headline.command}`, seed 0, 2-core CPU): {headline.figure(full)}, "
            f"in {total_seconds(demo, full):.0f} s{conditions}.")


def add_quick_notice(report: dict[str, Any], demo: str) -> None:
    """For a quick run: the notice goes into report["summary"] and the full run's figure into report["full_run"]."""
    if report.get("mode") != "quick":
        return
    full = full_run(demo)
    report["full_run"] = {"command": HEADLINES[demo].command, "result": HEADLINES[demo].figure(full),
                          "seconds": total_seconds(demo, full)}
    report["summary"] = f"{report['summary']}\n{quick_notice(demo)}"


def _without_paths(value: Any, prefix: str) -> Any:
    """A report with every path under `prefix` made relative to it (the machine's paths mean nothing elsewhere)."""
    if isinstance(value, dict):
        return {key: _without_paths(item, prefix) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_paths(item, prefix) for item in value]
    if isinstance(value, str):
        return value.replace(prefix.rstrip("/") + "/", "")
    return value


def save_reference(demo: str, folder: str | Path, measured_under: str | None = None) -> Path:
    """Copy a finished full run's report.json into the shipped references; `measured_under` says what else
    ran on the machine when its time is not that of an idle one."""
    if demo not in HEADLINES:
        raise KeyError(f"no headline defined for demo {demo!r}; known: {sorted(HEADLINES)}")
    folder = Path(folder).resolve()
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    if report.get("mode") != "full":
        raise ValueError(f"{folder / 'report.json'}: mode {report.get('mode')!r}; only a full run is a reference")
    if measured_under:
        report["measured_under"] = measured_under
    parent = str(folder.parent)
    target = REFERENCE_DIR / f"{demo}.json"
    target.write_text(json.dumps(_without_paths(report, parent), indent=1) + "\n", encoding="utf-8")
    return target
