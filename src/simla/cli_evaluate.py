"""`simla evaluate TASK`: one sub-command per task; each only parses arguments and calls the task's evaluator."""

from __future__ import annotations

import argparse
import json


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
                                     batch_size=args.batch_size, num_workers=args.num_workers, progress=rank0,
                                     precision=args.precision)
        if rank0:  # every rank holds the gathered scores and the same metrics; one writes them
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
            print(format_table(metrics))
            print(f"wrote {out / 'results.json'}")
    return 0


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


def add_evaluate_commands(sub) -> None:
    """`simla evaluate retrieval | nlvr | ve | grounding | vqa`."""
    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint")
    evaluate_tasks = evaluate.add_subparsers(dest="task", required=True)
    ev = evaluate_tasks.add_parser("retrieval", help="image-text retrieval recall (zero-shot or fine-tuned)")
    ev.add_argument("--checkpoint", required=True, help="ours (.pt), an export directory, or a reference .pth")
    ev.add_argument("--data", required=True, help="eval JSON: [{image, caption: [str, ...]}]")
    ev.add_argument("--image-root", help="directory that relative image paths are joined to")
    ev.add_argument("--output", required=True, help="folder for results.json")
    ev.add_argument("--k", type=int, default=256, help="ITC candidates re-scored by ITM (COCO 256, Flickr 128)")
    ev.add_argument("--itc-only", action="store_true", help="rank by ITC similarity only (fast)")
    ev.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="ITM re-scoring under bf16 autocast (faster on GPUs; scores rounded to bf16)")
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
