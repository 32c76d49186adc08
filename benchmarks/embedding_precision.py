"""CPU embedding in fp32, int8 (`simla.quantize_int8`) and ONNX Runtime: speed, and what each costs in accuracy.

Speed (default): images/s of `encode_image` and texts/s of `encode_text` for each model: torch fp32 eager,
its int8 copy, and, when the [onnx] extra is installed, ONNX Runtime on the fp32 export and on the int8 one
(`simla export onnx [--int8]`), measured in one process on the same synthetic batch (random weights: the
cost does not depend on them; captions of COCO-like lengths, 8-20 tokens padded to 30). The runs
alternate (fp32, int8, onnx, onnx_int8, fp32, ...) so that a change in the machine's load hits all alike;
each figure is the median of `--iters` timed runs after `--warmup` untimed ones, the ratio is against fp32's
median, and the smallest cosine of each variant's features to fp32's is reported beside it.

Accuracy (`--checkpoint C --eval-json J`): `evaluate_retrieval` of the checkpoint in fp32 and in int8 (ITC
then ITM re-ranking of the top k); then the ITC-only recall of every variant, ONNX Runtime included, from
the same pixels; with `--search-demo` (a `simla demo` checkpoint) also the search demo's precision@10:
by ITC for every variant, and from an fp32 and an int8 index with ITM re-ranking.

Run: python benchmarks/embedding_precision.py --models simla_base simla_tiny --iters 10
     python benchmarks/embedding_precision.py --checkpoint runs/demo/pretrain/checkpoints/last.pt \
         --eval-json runs/demo/test.json --search-demo
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import simla
from simla.data.retrieval import read_retrieval_eval
from simla.eval.metrics import retrieval_metrics
from simla.eval.retrieval import evaluate_retrieval

PADDED_LENGTH = 30
RECALL_KEYS = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")


def _all_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def synthetic_batch(model, batch: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(pixels (B, 3, R, R), (token ids, mask) (B, 30)) with captions of 8-20 tokens."""
    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g) * 0.5 + 2 * torch.rand(batch, 3, 1, 1, generator=g) - 1
    ids = torch.randint(1000, 5000, (batch, PADDED_LENGTH), generator=g)
    ids[:, 0] = model.config.text.cls_token_id
    lengths = torch.randint(8, 21, (batch,), generator=g)
    mask = (torch.arange(PADDED_LENGTH)[None] < lengths[:, None]).long()
    return pixels, (ids * mask, mask)


def onnx_runtime_variants(model, folder: Path, threads: int) -> tuple[dict, str]:
    """ONNX Runtime models exported from ``model`` ({"onnx": fp32, "onnx_int8": int8}), or ({}, why not)."""
    if importlib.util.find_spec("onnxruntime") is None:
        return {}, "onnxruntime is not installed"
    try:
        module = importlib.import_module("simla.onnx_runtime")
    except ModuleNotFoundError:
        return {}, "simla.onnx_runtime does not exist in this simla"
    variants = {}
    for name, int8 in (("onnx", False), ("onnx_int8", True)):
        module.export_onnx(model, folder / name, int8=int8)
        variants[name] = module.OnnxModel.load(folder / name, threads=threads)
    return variants, ""


def _timed(fn) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - started


def measure_speed(name: str, batch: int, iters: int, warmup: int, onnx: bool, work: Path, threads: int) -> dict:
    """Median images/s and texts/s of each variant of model ``name``, runs alternating across variants."""
    torch.manual_seed(0)
    model = simla.create_model(name, task="base").eval()
    pixels, (ids, mask) = synthetic_batch(model, batch)
    variants = {"fp32": model, "int8": simla.quantize_int8(model)}
    onnx_note = "not asked (--no-onnx)"
    if onnx:
        onnx_models, onnx_note = onnx_runtime_variants(model, work / f"{name}-onnx", threads)
        variants.update(onnx_models)
    jobs = {"images": lambda m: m.encode_image(pixels), "texts": lambda m: m.encode_text((ids, mask))}
    times: dict[tuple[str, str], list[float]] = {(v, j): [] for v in variants for j in jobs}
    for round_ in range(warmup + iters):
        for job, run in jobs.items():
            for variant, m in variants.items():
                seconds = _timed(lambda: run(m))
                if round_ >= warmup:
                    times[(variant, job)].append(seconds)
    with torch.no_grad():
        reference = {"images": model.encode_image(pixels), "texts": model.encode_text((ids, mask))}
        cosine = {variant: {job: float(F.cosine_similarity(reference[job], run(m)).min()) for job, run in jobs.items()}
                  for variant, m in variants.items() if variant != "fp32"}
    row = {"model": name, "image_size": model.config.vision.image_size, "batch_size": batch, "iters": iters,
           "onnx": "measured" if "onnx" in variants else onnx_note, "variants": {}}
    for variant in variants:
        row["variants"][variant] = {f"{job}_per_s": batch / statistics.median(times[(variant, job)]) for job in jobs}
        row["variants"][variant].update({f"{job}_seconds": times[(variant, job)] for job in jobs})
    for variant in variants:
        if variant != "fp32":
            row[f"{variant}_vs_fp32"] = {f"{job}_per_s": row["variants"][variant][f"{job}_per_s"]
                                         / row["variants"]["fp32"][f"{job}_per_s"] for job in jobs}
    row["min_cosine_to_fp32"] = cosine
    return row


def print_speed(rows: list[dict], threads: int) -> None:
    print(f"{threads} threads (torch and ONNX Runtime), batch {rows[0]['batch_size']}, median of {rows[0]['iters']} alternating runs")
    print("| model | variant | images/s | vs fp32 | texts/s | vs fp32 | min cosine to fp32 (img / txt) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        for variant, v in r["variants"].items():
            ratio = r.get(f"{variant}_vs_fp32", {"images_per_s": 1.0, "texts_per_s": 1.0})
            c = r["min_cosine_to_fp32"].get(variant)
            cos = f"{c['images']:.4f} / {c['texts']:.4f}" if c else ""
            print(f"| {r['model']} ({r['image_size']} px) | {variant} | {v['images_per_s']:.1f} | "
                  f"{ratio['images_per_s']:.2f}x | {v['texts_per_s']:.1f} | {ratio['texts_per_s']:.2f}x | {cos} |")
    for r in rows:
        if "onnx" not in r["variants"]:
            print(f"{r['model']}: ONNX Runtime was not available ({r['onnx']})")


def measure_accuracy(args: argparse.Namespace) -> dict:
    model = simla.load_checkpoint(args.checkpoint, task="base").eval()
    data = read_retrieval_eval(args.eval_json, args.image_root)
    report = {"checkpoint": args.checkpoint, "eval_json": args.eval_json, "k": args.k, "images": len(data.images),
              "texts": len(data.texts), "precisions": {}}
    for precision in ("fp32", "int8"):
        started = time.perf_counter()
        metrics = evaluate_retrieval(model, data, k=args.k, batch_size=args.batch_size, num_workers=args.workers,
                                     precision=precision)
        report["precisions"][precision] = {**metrics, "seconds": time.perf_counter() - started}
    return report


def measure_search_precision(args: argparse.Namespace, work: Path) -> dict:
    """`simla demo search`'s precision@10 (24 class queries over the easy-VQA test images) of an fp32 index and of
    an int8 index built with the same checkpoint."""
    from simla.demos.easy_vqa import label_easy_vqa, write_retrieval_json
    from simla.demos.search import RERANK, class_query_precision
    from simla.search import Index

    items, _ = label_easy_vqa("test")
    annotations = write_retrieval_json(items, work / "test.json", seed=0)
    label_of = {str(Path(item.image).resolve()): f"{item.colour} {item.shape}" for item in items}
    image_root = os.path.commonpath([item.image for item in items])
    found = {}
    for precision in ("fp32", "int8"):
        started = time.perf_counter()
        index = Index.build(annotations, work / f"index_{precision}", checkpoint=args.checkpoint, image_root=image_root,
                            num_workers=0, progress=False, precision=precision, device="cpu")
        _, mean = class_query_precision(index, label_of, RERANK["full"])
        found[precision] = {**mean, "images": len(index), "seconds": time.perf_counter() - started}
        index.close()
    return {"rerank": RERANK["full"], "precisions": found}


def measure_itc_accuracy(args: argparse.Namespace, model, data, work: Path) -> dict:
    """ITC-only figures of every variant (torch fp32, torch int8, ONNX Runtime fp32 and int8) on the same pixels:
    recall from the feature similarities, and with --search-demo the class queries' precision@10."""
    variants = {"fp32": model, "int8": simla.quantize_int8(model)}
    onnx_models, note = onnx_runtime_variants(model, work, args.threads)
    variants.update(onnx_models)
    paths = [str(Path(args.image_root or "", image)) if not os.path.isabs(image) else image for image in data.images]
    pixels = [model.prepare_pixels(paths[i:i + 64]) for i in range(0, len(paths), 64)]
    labels, queries = None, []
    if args.search_demo:
        from simla.demos.easy_vqa import COLOURS, SHAPES, label_easy_vqa

        label_of = {str(Path(item.image).resolve()): f"{item.colour} {item.shape}" for item in label_easy_vqa("test")[0]}
        labels = [label_of.get(str(Path(p).resolve())) for p in paths]
        queries = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
    found = {}
    with torch.no_grad():
        for name, m in variants.items():
            images = torch.cat([m.encode_image(batch) for batch in pixels])
            texts = torch.cat([m.encode_text(data.texts[i:i + 64]) for i in range(0, len(data.texts), 64)])
            sim = images @ texts.t()
            found[name] = retrieval_metrics(sim, sim.t(), data.txt2img, data.img2txt)
            if labels is not None:
                top = (m.encode_text([f"a {q}" for q in queries]) @ images.t()).topk(10, dim=1).indices
                found[name]["search_p10_itc"] = sum(labels[i] == q for q, row in zip(queries, top.tolist())
                                                    for i in row) / (10 * len(queries))
    return {"variants": found, "onnx": note or "measured"}


def print_accuracy(report: dict) -> None:
    print(f"{report['checkpoint']} on {report['eval_json']}: {report['images']} images, {report['texts']} texts, "
          f"k={report['k']}")
    print("| precision | " + " | ".join(RECALL_KEYS) + " | seconds |")
    print("|---|" + "---:|" * (len(RECALL_KEYS) + 1))
    for precision, m in report["precisions"].items():
        print(f"| {precision} | " + " | ".join(f"{m[key]:.2f}" for key in RECALL_KEYS) + f" | {m['seconds']:.1f} |")
    fp32, int8 = report["precisions"]["fp32"], report["precisions"]["int8"]
    print("| int8 - fp32 | " + " | ".join(f"{int8[key] - fp32[key]:+.2f}" for key in RECALL_KEYS)
          + f" | x{int8['seconds'] / fp32['seconds']:.2f} |")
    if "itc" in report:
        itc = report["itc"]["variants"]
        keys = RECALL_KEYS + (("search_p10_itc",) if "search_p10_itc" in itc["fp32"] else ())
        print("\nITC ranking only (no ITM re-ranking), the same pixels for every variant:")
        print("| variant | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
        for variant, m in itc.items():
            print(f"| {variant} | " + " | ".join(f"{m[key]:.3f}" if key == "search_p10_itc" else f"{m[key]:.2f}"
                                              for key in keys) + " |")
        if report["itc"]["onnx"] != "measured":
            print(f"ONNX Runtime was not available ({report['itc']['onnx']})")
    if "search" in report:
        search = report["search"]
        print(f"\nsearch demo, {search['precisions']['fp32']['images']} easy-VQA test images, 24 class queries:")
        print(f"| precision | P@10 ITC | P@10 ITM re-rank {search['rerank']} | build + queries (s) |\n|---|---:|---:|---:|")
        for precision, m in search["precisions"].items():
            print(f"| {precision} | {m['itc']:.3f} | {m['itm']:.3f} | {m['seconds']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["simla_base", "simla_tiny"],
                        help="speed: model presets, random weights (default simla_base simla_tiny)")
    parser.add_argument("--batch-size", type=int, default=16, help="speed: images or texts per call (default 16); "
                        "accuracy: images per forward")
    parser.add_argument("--iters", type=int, default=10, help="speed: timed runs per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="speed: untimed runs first (default 2)")
    parser.add_argument("--no-onnx", action="store_true", help="speed: leave ONNX Runtime out even if available")
    parser.add_argument("--threads", type=int, default=_all_cores(), help="torch threads (default: all cores)")
    parser.add_argument("--checkpoint", help="accuracy mode: the checkpoint to evaluate in fp32 and int8")
    parser.add_argument("--eval-json", help="accuracy mode: retrieval evaluation file [{image, caption: [...]}]")
    parser.add_argument("--image-root", help="accuracy mode: folder relative image paths are joined to")
    parser.add_argument("--k", type=int, default=16, help="accuracy mode: ITC candidates re-scored by ITM")
    parser.add_argument("--workers", type=int, default=2, help="accuracy mode: image loading workers")
    parser.add_argument("--search-demo", action="store_true",
                        help="accuracy mode: also the search demo's precision@10 (a `simla demo` checkpoint)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    if (args.checkpoint is None) != (args.eval_json is None):
        parser.error("accuracy mode needs both --checkpoint and --eval-json")
    torch.set_num_threads(args.threads)

    if args.checkpoint:
        report = measure_accuracy(args)
        with tempfile.TemporaryDirectory() as tmp:
            model = simla.load_checkpoint(args.checkpoint, task="base").eval()
            report["itc"] = measure_itc_accuracy(args, model, read_retrieval_eval(args.eval_json, args.image_root),
                                                 Path(tmp))
            if args.search_demo:
                report["search"] = measure_search_precision(args, Path(tmp))
        print_accuracy(report)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = [measure_speed(name, args.batch_size, args.iters, args.warmup, not args.no_onnx, Path(tmp),
                                  args.threads) for name in args.models]
        print_speed(rows, args.threads)
        report = {"threads": args.threads, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
