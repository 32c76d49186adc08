"""The `simla` command. It only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence


def _count_parameters(name: str) -> dict[str, int]:
    """Parameter counts of a preset, built on the meta device (no memory, no weights)."""
    import torch

    from .config import get_config
    from .factory import build_model

    with torch.device("meta"):
        model = build_model(get_config(name), task="pretrain")
    online = model.num_parameters(trainable_only=True)
    momentum = sum(p.numel() for name, p in model.named_parameters() if name.split(".", 1)[0].endswith("_m"))
    return {
        "online": online,
        "momentum": momentum,
        "vision_encoder": sum(p.numel() for p in model.visual_encoder.parameters()),
        "shared_encoder": sum(p.numel() for p in model.text_encoder.parameters()),
    }


def cmd_models(args: argparse.Namespace) -> int:
    from .config import get_config, list_models

    rows = []
    for name in list_models():
        config = get_config(name)
        counts = _count_parameters(name)
        rows.append({"name": name, "image_size": config.vision.image_size, "params": counts})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<12} {'image':>5} {'online params':>15} {'ViT':>12} {'shared encoder':>15} {'momentum':>12}")
    for row in rows:
        p = row["params"]
        print(f"{row['name']:<12} {row['image_size']:>5} {p['online']:>15,} {p['vision_encoder']:>12,} "
              f"{p['shared_encoder']:>15,} {p['momentum']:>12,}")
    print("online = trainable parameters of the pretraining model (momentum copies and queues excluded)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .checkpoint import load_checkpoint, save_checkpoint, save_pretrained

    model = load_checkpoint(args.checkpoint, task=args.task, trust_pickle=args.trust_pickle,
                            strict=not args.non_strict)
    out = save_checkpoint(model, args.output)
    print(f"wrote {out}")
    if args.export:
        print(f"wrote {save_pretrained(model, args.export)}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import run_pretraining
    from .train.recipe import load_recipe

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"resume={args.resume}")
    recipe = load_recipe(args.config, overrides)  # every check happens here, before any work
    result = run_pretraining(recipe)
    print(f"finished at step {result.state.step}; run folder: {recipe.output_dir}")
    return 0


def cmd_finetune_retrieval(args: argparse.Namespace) -> int:
    from .train.finetune_retrieval import RetrievalRecipe, run_retrieval_finetune
    from .train.recipe import load_recipe

    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    recipe = load_recipe(args.config, overrides, cls=RetrievalRecipe)
    results = run_retrieval_finetune(recipe)
    print(json.dumps(results, indent=2))
    return 0


def cmd_evaluate_retrieval(args: argparse.Namespace) -> int:
    """Evaluate retrieval; under torchrun the ITM re-ranking rows are split across the processes."""
    from pathlib import Path

    from .checkpoint import load_checkpoint
    from .data.retrieval import read_retrieval_eval
    from .distributed import evaluation_group, get_rank
    from .eval.metrics import format_table
    from .eval.retrieval import evaluate_retrieval
    from .tokenizers.text import get_tokenizer

    with evaluation_group(args.device) as device:
        rank0 = get_rank() == 0
        overrides = {"image_size": args.image_size} if args.image_size else {}
        model = load_checkpoint(args.checkpoint, task="base", trust_pickle=args.trust_pickle, **overrides)
        tokenizer = get_tokenizer(args.tokenizer) if args.tokenizer else model.tokenizer
        model.to(device)
        data = read_retrieval_eval(args.data, args.image_root)
        metrics = evaluate_retrieval(model, data, k=args.k, itc_only=args.itc_only, tokenizer=tokenizer,
                                     batch_size=args.batch_size, num_workers=args.num_workers, progress=rank0)
        if rank0:  # every rank holds the gathered scores and the same metrics; one writes them
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            print(format_table(metrics))
            print(f"wrote {out / 'results.json'}")
    return 0


def cmd_finetune_vqa(args: argparse.Namespace) -> int:
    from .train.finetune_vqa import VQARecipe, run_vqa_finetune
    from .train.recipe import load_recipe

    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    recipe = load_recipe(args.config, overrides, cls=VQARecipe)
    results = run_vqa_finetune(recipe)
    print(json.dumps(results, indent=2))
    return 0


def cmd_finetune_task(args: argparse.Namespace) -> int:
    """finetune nlvr-ta | nlvr | ve: load the task's recipe (every check before work) and run it."""
    from .train.recipe import load_recipe

    recipe_class, run = _task_runner(args.task)
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    recipe = load_recipe(args.config, overrides, cls=recipe_class)
    print(json.dumps(run(recipe), indent=2))
    return 0


def _task_runner(task: str):
    from .train.finetune_classify import NLVRRecipe, VERecipe, run_classification_finetune
    from .train.finetune_grounding import GroundingRecipe, run_grounding_finetune
    from .train.finetune_nlvr_ta import TextAssignmentRecipe, run_text_assignment

    return {"nlvr-ta": (TextAssignmentRecipe, run_text_assignment), "nlvr": (NLVRRecipe, run_classification_finetune),
            "ve": (VERecipe, run_classification_finetune), "grounding": (GroundingRecipe, run_grounding_finetune)}[task]


def cmd_evaluate_classifier(args: argparse.Namespace) -> int:
    """evaluate nlvr | ve: accuracy (per class, confusion matrix); under torchrun the examples are split."""
    from pathlib import Path

    from .checkpoint import load_checkpoint
    from .data.classification import read_nlvr, read_ve
    from .distributed import evaluation_group, get_rank
    from .eval.classification import describe, evaluate_classifier
    from .tokenizers.text import get_tokenizer

    records = (read_nlvr if args.task == "nlvr" else read_ve)(args.data, args.image_root)
    with evaluation_group(args.device) as device:
        overrides = {"image_size": args.image_size} if args.image_size else {}
        model = load_checkpoint(args.checkpoint, task=args.task, trust_pickle=args.trust_pickle, **overrides)
        if args.tokenizer:
            model.tokenizer = get_tokenizer(args.tokenizer)
        model.to(device)
        metrics = evaluate_classifier(model, records, args.split or Path(args.data).stem, args.output,
                                      batch_size=args.batch_size, num_workers=args.num_workers,
                                      max_length=args.max_text_length, progress=get_rank() == 0)
        if get_rank() == 0:
            print(describe(metrics))
            print(f"wrote {Path(args.output) / 'results.json'} and metrics.json")
    return 0


def cmd_evaluate_grounding(args: argparse.Namespace) -> int:
    """Ground every expression of --refs; under torchrun the expressions are split across the processes."""
    from pathlib import Path

    from .checkpoint import load_checkpoint
    from .data.grounding import read_detections, read_grounding_refs
    from .distributed import evaluation_group, get_rank
    from .eval.grounding import describe, evaluate_grounding

    refs = read_grounding_refs(args.refs, args.image_root, args.refer_dir)
    dets = read_detections(args.dets)
    with evaluation_group(args.device) as device:
        overrides = {"image_size": args.image_size} if args.image_size else {}
        model = load_checkpoint(args.checkpoint, task="base", trust_pickle=args.trust_pickle, **overrides).to(device)
        metrics = evaluate_grounding(model, refs, dets, args.output, layer=args.layer, batch_size=args.batch_size,
                                     num_workers=args.num_workers, progress=get_rank() == 0)
        if get_rank() == 0:
            print(describe(metrics))
            print(f"wrote {Path(args.output) / 'results.json'} and metrics.json")
    return 0


def cmd_evaluate_vqa(args: argparse.Namespace) -> int:
    """Answer every question of --data; under torchrun the questions are split across the processes."""
    from .train.finetune_vqa import evaluate_vqa_checkpoint

    metrics, text = evaluate_vqa_checkpoint(
        args.checkpoint, args.data, args.answers, args.output, image_root=args.image_root, k=args.k,
        answer_scoring=args.answer_scoring, image_size=args.image_size, tokenizer=args.tokenizer,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
        trust_pickle=args.trust_pickle, train_files=args.train_file, allow_overlap=args.allow_overlap)
    if text:
        print(text)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Explain (image, text) pairs: PNG sheets and explanations.json in --output."""
    from .checkpoint import load_checkpoint
    from .distributed import evaluation_group
    from .errors import ConfigError
    from .explain.run import explain_pairs, read_pairs

    if args.pairs:
        if args.inputs:
            raise ConfigError("give either --pairs FILE or IMAGE ... TEXT, not both")
        pairs = read_pairs(args.pairs)
    else:
        if len(args.inputs) < 2:
            raise ConfigError("give one or more images followed by the text: simla explain IMAGE [IMAGE ...] \"TEXT\" "
                              "(or --pairs FILE.json)")
        *images, text = args.inputs
        pairs = [(image, text) for image in images]
    with evaluation_group(args.device) as device:
        model = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle).to(device)
        summary = explain_pairs(model, pairs, args.output, layer=args.layer, target=args.target,
                                top_concepts=args.concepts, batch_size=args.batch_size)
    for record in summary["explanations"]:
        tags = ", ".join(word for word, _ in record.get("concepts", [])[:5])
        print(f"{record['sheet']}: score {record['score']:.3f}" + (f"; tags: {tags}" if tags else ""))
    print(f"explained {summary['explained']} of {summary['pairs']} pairs into {args.output} "
          f"({len(summary['failed'])} unreadable images)")
    return 0 if not summary["failed"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from .demos import run_demo
    from .errors import ConfigError

    options = {"output": args.output or ("runs/demo" if args.task == "retrieval" else f"runs/demo_{args.task}"),
               "quick": args.quick, "steps": args.steps}
    if args.ablation:
        if args.task != "retrieval":
            raise ConfigError("--ablation belongs to the retrieval demo (simla demo --ablation)")
        options["ablation"] = True
    if args.source:
        if args.task == "retrieval":
            raise ConfigError("--from belongs to the task demos (e.g. simla demo vqa --from runs/demo)")
        options["source"] = args.source
    report = run_demo(args.task, **options)
    print(report["summary"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simla", description="SIMLA vision-language pretraining and evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log at INFO level and show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list the model presets with their parameter counts")
    models.add_argument("--json", action="store_true", help="print machine-readable JSON")
    models.set_defaults(func=cmd_models)

    from .train.recipe import recipe_help

    pretrain = sub.add_parser(
        "pretrain",
        help="pretrain SIMLA on image-caption pairs (same command under torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain with a YAML recipe plus key=value overrides, e.g.\n"
        "  simla pretrain --config configs/pretrain_tiny.yaml train_file=pairs.json image_root=images/\n"
        "  torchrun --nproc_per_node 8 -m simla.cli pretrain --config configs/pretrain_4m.yaml",
        epilog="recipe fields (key = default):\n" + recipe_help(),
    )
    pretrain.add_argument("--config", help="YAML recipe (fields below); omitted = all defaults")
    pretrain.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint ('auto': the run's last.pt)")
    pretrain.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (values parsed as YAML)")
    pretrain.set_defaults(func=cmd_pretrain)

    finetune = sub.add_parser("finetune", help="fine-tune a pretrained SIMLA on a downstream task")
    finetune_tasks = finetune.add_subparsers(dest="task", required=True)
    from .train.finetune_retrieval import RetrievalRecipe
    from .train.finetune_vqa import VQARecipe

    retrieval = finetune_tasks.add_parser(
        "retrieval", help="image-text retrieval (ITC + ITM with image-id-aware targets)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="simla finetune retrieval --config configs/retrieval_coco.yaml checkpoint=runs/pretrain/checkpoints/last.pt",
        epilog="recipe fields (key = default):\n" + recipe_help(RetrievalRecipe))
    retrieval.add_argument("--config", help="YAML recipe")
    retrieval.add_argument("--resume", metavar="PATH|auto", help="continue an interrupted fine-tuning run")
    retrieval.add_argument("overrides", nargs="*", metavar="key=value")
    retrieval.set_defaults(func=cmd_finetune_retrieval)

    vqa = finetune_tasks.add_parser(
        "vqa", help="visual question answering (answer decoder; ranking over an answer list)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="simla finetune vqa --config configs/vqa.yaml checkpoint=runs/pretrain/checkpoints/last.pt",
        epilog="recipe fields (key = default):\n" + recipe_help(VQARecipe))
    vqa.add_argument("--config", help="YAML recipe")
    vqa.add_argument("--resume", metavar="PATH|auto", help="continue an interrupted fine-tuning run")
    vqa.add_argument("overrides", nargs="*", metavar="key=value")
    vqa.set_defaults(func=cmd_finetune_vqa)

    from .train.finetune_classify import NLVRRecipe, VERecipe
    from .train.finetune_grounding import GroundingRecipe
    from .train.finetune_nlvr_ta import TextAssignmentRecipe

    for name, recipe_class, text, example in (
            ("nlvr-ta", TextAssignmentRecipe, "NLVR2 stage 1: text assignment on image-caption pairs",
             "simla finetune nlvr-ta --config configs/nlvr_ta.yaml checkpoint=runs/pretrain/checkpoints/last.pt"),
            ("nlvr", NLVRRecipe, "NLVR2: is the sentence true of the image pair (deepened, tied encoder)",
             "simla finetune nlvr --config configs/nlvr.yaml checkpoint=runs/nlvr_ta/checkpoints/last.pt"),
            ("ve", VERecipe, "SNLI-VE: does the image entail, contradict or not decide the sentence",
             "simla finetune ve --config configs/ve.yaml checkpoint=runs/pretrain/checkpoints/last.pt"),
            ("grounding", GroundingRecipe, "weakly supervised grounding (RefCOCO+): ITC + ITM on referring expressions",
             "simla finetune grounding --config configs/grounding.yaml checkpoint=runs/pretrain/checkpoints/last.pt")):
        task = finetune_tasks.add_parser(name, help=text, description=example,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog="recipe fields (key = default):\n" + recipe_help(recipe_class))
        task.add_argument("--config", help="YAML recipe")
        task.add_argument("--resume", metavar="PATH|auto", help="continue an interrupted fine-tuning run")
        task.add_argument("overrides", nargs="*", metavar="key=value")
        task.set_defaults(func=cmd_finetune_task)

    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint")
    evaluate_tasks = evaluate.add_subparsers(dest="task", required=True)
    ev = evaluate_tasks.add_parser("retrieval", help="image-text retrieval recall (zero-shot or fine-tuned)")
    ev.add_argument("--checkpoint", required=True, help="ours (.pt), an export directory, or a reference .pth")
    ev.add_argument("--data", required=True, help="eval JSON: [{image, caption: [str, ...]}]")
    ev.add_argument("--image-root", help="directory that relative image paths are joined to")
    ev.add_argument("--output", required=True, help="folder for results.json")
    ev.add_argument("--k", type=int, default=256, help="ITC candidates re-scored by ITM (COCO 256, Flickr 128)")
    ev.add_argument("--itc-only", action="store_true", help="rank by ITC similarity only (fast)")
    ev.add_argument("--image-size", type=int, help="evaluation resolution (default: the checkpoint's; paper: 384)")
    ev.add_argument("--tokenizer", help="text tokenizer dir or hub name (default: the checkpoint's)")
    ev.add_argument("--batch-size", type=int, default=64, help="images per forward")
    ev.add_argument("--num-workers", type=int, default=2, help="image loading workers")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ev.add_argument("--trust-pickle", action="store_true", help="allow unpickling reference checkpoints")
    ev.set_defaults(func=cmd_evaluate_retrieval)

    for name, text, form in (("nlvr", "NLVR2 accuracy", "[{images: [left, right], sentence, label: True|False}]"),
                             ("ve", "SNLI-VE accuracy, per class and confusion matrix",
                              "[{image: flickr id, sentence, label: entailment|neutral|contradiction}]")):
        ev_task = evaluate_tasks.add_parser(name, help=text)
        ev_task.add_argument("--checkpoint", required=True, help=f"a {name} checkpoint (ours, an export dir or a reference .pth)")
        ev_task.add_argument("--data", required=True, help=f"eval JSON: {form}")
        ev_task.add_argument("--image-root", help="directory that relative image paths are joined to")
        ev_task.add_argument("--output", required=True, help="folder for results.json (predictions) and metrics.json")
        ev_task.add_argument("--split", help="the split's name in metrics.json (default: the data file's stem)")
        ev_task.add_argument("--max-text-length", type=int, default=40, help="sentence tokens incl. [CLS]")
        ev_task.add_argument("--image-size", type=int, help="evaluation resolution (default: the checkpoint's)")
        ev_task.add_argument("--tokenizer", help="text tokenizer dir or hub name (default: the checkpoint's)")
        ev_task.add_argument("--batch-size", type=int, default=32, help="examples per forward")
        ev_task.add_argument("--num-workers", type=int, default=2, help="image loading workers")
        ev_task.add_argument("--device", default="auto", help="auto, cpu or cuda")
        ev_task.add_argument("--trust-pickle", action="store_true", help="allow unpickling reference checkpoints")
        ev_task.set_defaults(func=cmd_evaluate_classifier)

    ev_grd = evaluate_tasks.add_parser(
        "grounding", help="weakly supervised grounding: Grad-CAM picks a detector proposal per expression; "
        "accuracy (IoU >= 0.5) per split")
    ev_grd.add_argument("--checkpoint", required=True, help="a grounding/retrieval checkpoint (ours, an export dir "
                        "or a reference .pth)")
    ev_grd.add_argument("--refs", required=True, help="expressions JSON: [{image, text, ref_id[, bbox, split, "
                        "image_id, height, width]}] (the reference's refcoco+_val/test.json)")
    ev_grd.add_argument("--dets", required=True, help="detections JSON: {image_id: [[x, y, w, h], ...]}")
    ev_grd.add_argument("--refer-dir", help="folder with REFER's refs(unc).p and instances.json (boxes, splits and "
                        "image ids of records that lack them)")
    ev_grd.add_argument("--image-root", help="directory that relative image paths are joined to")
    ev_grd.add_argument("--output", required=True, help="folder for results.json (chosen boxes) and metrics.json")
    ev_grd.add_argument("--layer", type=int, help="explained cross-attention layer (default: the config's "
                        "explain.gradcam_layer, 8 of 12)")
    ev_grd.add_argument("--image-size", type=int, help="evaluation resolution (default: the checkpoint's)")
    ev_grd.add_argument("--batch-size", type=int, default=16, help="expressions per forward")
    ev_grd.add_argument("--num-workers", type=int, default=2, help="image loading workers")
    ev_grd.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ev_grd.add_argument("--trust-pickle", action="store_true", help="allow unpickling reference checkpoints")
    ev_grd.set_defaults(func=cmd_evaluate_grounding)

    ev_vqa = evaluate_tasks.add_parser(
        "vqa", help="answer questions by ranking an answer list; EvalAI results.json and, with ground truth, "
        "the official VQA accuracy")
    ev_vqa.add_argument("--checkpoint", required=True, help="a VQA checkpoint (ours, an export dir or a reference .pth)")
    ev_vqa.add_argument("--data", required=True, help="eval JSON: [{image, question, question_id[, answer: [...]]}]")
    ev_vqa.add_argument("--answers", required=True, help="JSON list of candidate answers (answer_list.json)")
    ev_vqa.add_argument("--image-root", help="directory that relative image paths are joined to")
    ev_vqa.add_argument("--output", required=True, help="folder for results.json and metrics.json")
    ev_vqa.add_argument("--k", type=int, help="candidates re-scored with the whole answer (default: the model's "
                        "vqa.k_test, paper 128)")
    ev_vqa.add_argument("--answer-scoring", choices=("simla", "reference"),
                        help="'reference' counts the first token's log-probability twice, as the authors' code "
                        "(default: the model's, 'simla')")
    ev_vqa.add_argument("--train-file", action="append",
                        help="training JSON to check for question overlap (default: the checkpoint's recipe)")
    ev_vqa.add_argument("--allow-overlap", action="store_true",
                        help="evaluate even when questions of --data were trained on")
    ev_vqa.add_argument("--image-size", type=int, help="evaluation resolution (default: the checkpoint's)")
    ev_vqa.add_argument("--tokenizer", help="text tokenizer dir or hub name (default: the checkpoint's)")
    ev_vqa.add_argument("--batch-size", type=int, default=32, help="questions per forward")
    ev_vqa.add_argument("--num-workers", type=int, default=2, help="image loading workers")
    ev_vqa.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ev_vqa.add_argument("--trust-pickle", action="store_true", help="allow unpickling reference checkpoints")
    ev_vqa.set_defaults(func=cmd_evaluate_vqa)

    from .demos import DEMOS

    explain = sub.add_parser(
        "explain", help="Grad-CAM maps per word and per caption, and concept tags, as PNG sheets + JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="simla explain photo.jpg \"a dog catching a frisbee\" --checkpoint C --output explain/\n"
        "simla explain a.jpg b.jpg \"a red circle\" --checkpoint C   (the same text for each image)\n"
        "simla explain --pairs pairs.json --checkpoint C               ([{image, text}, ...])\n\n"
        "Each pair gets a sheet: the image, the whole-text map, one map per word (ITM Grad-CAM of one "
        "cross-attention layer) and, for a pretraining checkpoint with a PSL head, the image's concept tags.")
    explain.add_argument("inputs", nargs="*", metavar="IMAGE ... TEXT", help="images, then the text")
    explain.add_argument("--pairs", metavar="FILE", help="JSON list of {image, text} (relative to the file)")
    explain.add_argument("--checkpoint", required=True, help="ours (.pt), an export directory, or a reference .pth")
    explain.add_argument("--output", default="explain", help="folder for the PNG sheets and explanations.json")
    explain.add_argument("--target", choices=("itm", "itc"), default="itm",
                         help="itm: cross-attention Grad-CAM per word (default); itc: ViT [CLS] attention map")
    explain.add_argument("--layer", type=int, help="explained layer (itm: shared encoder, default the config's "
                         "explain.gradcam_layer, 8 of 12; itc: ViT block)")
    explain.add_argument("--concepts", type=int, default=10, help="concept tags per image (0: none)")
    explain.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    explain.add_argument("--device", default="auto", help="auto, cpu or cuda")
    explain.add_argument("--trust-pickle", action="store_true", help="allow unpickling reference checkpoints")
    explain.set_defaults(func=cmd_explain)

    demo = sub.add_parser("demo", help="offline end-to-end demos on easy-VQA shapes (pretrain, fine-tune, evaluate, report)",
                          description="simla demo [TASK]: 'retrieval' (the default) pretrains a small SIMLA on the "
                          "easy-VQA images for five minutes (about six with evaluation), evaluates zero-shot "
                          "accuracy and retrieval on held-out images and writes report.md with its pictures. "
                          "'vqa', 'nlvr' and 've' fine-tune that pretrained model (--from a finished demo folder, "
                          "or they pretrain one first) to answer easy-VQA's questions, judge statements about two "
                          "images, or tell entailed, contradicted and neutral statements apart, and report accuracy.")
    demo.add_argument("task", nargs="?", default="retrieval", choices=sorted(DEMOS), help="which demo (default retrieval)")
    demo.add_argument("--output", help="report folder (default runs/demo, runs/demo_vqa for vqa)")
    demo.add_argument("--quick", action="store_true", help="a reduced run of about a minute (for CI)")
    demo.add_argument("--steps", type=int, help="training steps (default: the demo's; retrieval 60 quick, 600 full)")
    demo.add_argument("--ablation", action="store_true",
                      help="retrieval: also pretrain the paper's ablation rows (ITC+ITM; +MLM; +MIM; +PSL) and tabulate them")
    demo.add_argument("--from", dest="source", metavar="DEMO_DIR",
                      help="task demos: start from the pretrained model of this finished `simla demo` folder")
    demo.set_defaults(func=cmd_demo)

    convert = sub.add_parser("convert", help="import a reference SIMLA/ALBEF .pth (or re-save one of ours)")
    convert.add_argument("checkpoint", help="path of the checkpoint to read")
    convert.add_argument("output", help="our .pt checkpoint to write")
    convert.add_argument("--export", metavar="DIR", help="also write model.safetensors + config.json into DIR")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow arbitrary unpickling (reference files pickle their config); trusted files only")
    convert.add_argument("--task", choices=("pretrain", "retrieval", "vqa", "nlvr_ta", "nlvr", "ve", "base"),
                         help="model to convert into; 'retrieval' keeps a retrieval/ALBEF checkpoint's momentum "
                              "teachers and queues, 'base' keeps the online weights only (default: the checkpoint's "
                              "own task; for a reference file 'pretrain' when it has MIM/PSL heads, else 'base')")
    convert.add_argument("--non-strict", action="store_true",
                         help="accept missing/unexpected keys and shape mismatches (all listed; mismatched tensors "
                              "keep fresh weights) instead of failing")
    convert.set_defaults(func=cmd_convert)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .errors import USER_OS_ERRORS, SimlaError

    return (SimlaError, *USER_OS_ERRORS)


def _one_line(err: BaseException) -> str:
    """The error's message on one line (multi-line reports are joined with '; ')."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    parts = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(parts) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `simla` command. User errors print `simla: error: ...` and return 2; `-v` shows tracebacks."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except _user_errors() as err:
        if args.verbose:
            raise
        print(f"simla: error: {_one_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
