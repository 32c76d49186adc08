"""The `simla` command. It only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any


def _count_parameters(name: str) -> dict[str, int]:
    """Parameter counts of a preset, built on the meta device (no memory, no weights)."""
    import torch

    from .config import get_config
    from .factory import build_model
    from .models.momentum import is_teacher_key

    with torch.device("meta"):
        model = build_model(get_config(name), task="pretrain")
    online = model.num_parameters(trainable_only=True)
    momentum = sum(p.numel() for name, p in model.named_parameters() if is_teacher_key(name))
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


def _training_recipe(args: argparse.Namespace, cls: type | None = None) -> Any:
    """Load a training command's recipe (every check happens here, before any work). When `simla` is the
    process's entry point and the recipe names a malloc to preload (cpu_allocator=tcmalloc, ...), the
    process restarts under it here, before anything heavy has been built."""
    from .train.cpu_allocator import restart_under_allocator
    from .train.recipe import PretrainRecipe, load_recipe

    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    recipe = load_recipe(args.config, overrides, cls=cls or PretrainRecipe)
    if getattr(args, "entry_point", False):
        restart_under_allocator(recipe.cpu_allocator)
    return recipe


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train.pretrain import run_pretraining

    recipe = _training_recipe(args)
    result = run_pretraining(recipe)
    print(f"finished at step {result.state.step}; run folder: {recipe.output_dir}")
    return 0


def cmd_finetune_retrieval(args: argparse.Namespace) -> int:
    from .train.finetune_retrieval import RetrievalRecipe, run_retrieval_finetune

    results = run_retrieval_finetune(_training_recipe(args, RetrievalRecipe))
    print(json.dumps(results, indent=2))
    return 0


def cmd_finetune_vqa(args: argparse.Namespace) -> int:
    from .train.finetune_vqa import VQARecipe, run_vqa_finetune

    results = run_vqa_finetune(_training_recipe(args, VQARecipe))
    print(json.dumps(results, indent=2))
    return 0


def cmd_finetune_task(args: argparse.Namespace) -> int:
    """finetune nlvr-ta | nlvr | ve | grounding: load the task's recipe (every check before work) and run it."""
    recipe_class, run = _task_runner(args.task)
    print(json.dumps(run(_training_recipe(args, recipe_class)), indent=2))
    return 0


def _task_runner(task: str):
    from .train.finetune_classify import NLVRRecipe, VERecipe, run_classification_finetune
    from .train.finetune_grounding import GroundingRecipe, run_grounding_finetune
    from .train.finetune_nlvr_ta import TextAssignmentRecipe, run_text_assignment

    return {"nlvr-ta": (TextAssignmentRecipe, run_text_assignment), "nlvr": (NLVRRecipe, run_classification_finetune),
            "ve": (VERecipe, run_classification_finetune), "grounding": (GroundingRecipe, run_grounding_finetune)}[task]


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

    from .cli_evaluate import add_evaluate_commands

    add_evaluate_commands(sub)

    from .cli_search import add_search_commands

    add_search_commands(sub)

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

    from .demos import DEMOS

    demo = sub.add_parser("demo", help="offline end-to-end demos on easy-VQA shapes (pretrain, fine-tune, evaluate, report)",
                          description="simla demo [TASK]: 'retrieval' (the default) pretrains a small SIMLA on the "
                          "easy-VQA images for five minutes (about six with evaluation), evaluates zero-shot "
                          "accuracy and retrieval on held-out images and writes report.md with its pictures. "
                          "'vqa', 'nlvr' and 've' fine-tune that pretrained model (--from a finished demo folder, "
                          "or they pretrain one first) to answer easy-VQA's questions, judge statements about two "
                          "images, or tell entailed, contradicted and neutral statements apart, and report accuracy; "
                          "'grounding' finds the shape an expression names on canvases of four shapes from Grad-CAM "
                          "alone (weakly supervised) and draws explain sheets; "
                          "'search' indexes the easy-VQA test images with that model and reports the precision@10 "
                          "of class queries with and without ITM re-ranking, with an HTML results page.")
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
    # Only a process that `simla` started may restart itself (under a preloaded malloc); never a caller's.
    args.entry_point = argv is None
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
