"""The `simla` command. It only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from . import tasks
from .checkpoint import load_checkpoint, save_checkpoint, save_pretrained
from .cli_evaluate import add_evaluate_commands
from .cli_export import add_export_commands
from .cli_search import add_search_commands
from .config import get_config, list_models
from .distributed import evaluation_group
from .data.images import BadSampleError, load_image
from .errors import USER_OS_ERRORS, ConfigError, SimlaError, UnusableDataError
from .explain.concepts import DEFAULT_MIN_MARGIN, DEFAULT_MIN_PROBABILITY
from .explain.run import explain_pairs, read_pairs
from .models.momentum import is_teacher_key
from .models.registry import build_model, model_tasks
from .train.cpu_allocator import configure_cpu_allocator, restart_under_allocator
from .train.recipe import TrainingRecipe, load_recipe, recipe_help

logger = logging.getLogger(__name__)

#: Set to 1 to trust pickled code in a training run's files, like `--trust-pickle`.
TRUST_PICKLE_ENV = "SIMLA_TRUST_PICKLE"


def _count_parameters(name: str) -> dict[str, int]:
    """Parameter counts of a preset, built on the meta device (no memory, no weights)."""
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
    model = load_checkpoint(args.checkpoint, task=args.task, trust_pickle=args.trust_pickle,
                            strict=not args.non_strict)
    out = save_checkpoint(model, args.output)
    print(f"wrote {out}")
    if args.export:
        print(f"wrote {save_pretrained(model, args.export)}")
    return 0


def _training_recipe(args: argparse.Namespace, cls: type[TrainingRecipe]) -> TrainingRecipe:
    """Load a training command's recipe (every check happens here, before any work), then decide the
    process's malloc: only the command does that, never the library. When `simla` is the process's entry
    point and the recipe names a malloc to preload (cpu_allocator=tcmalloc, ...), the process restarts under
    it here, before anything heavy has been built; on a CPU run glibc's policy is set (keep or release)."""
    overrides = list(args.overrides) + ([f"resume={args.resume}"] if args.resume else [])
    if args.trust_pickle or os.environ.get(TRUST_PICKLE_ENV) == "1":
        overrides.append("trust_pickle=true")  # typed or exported by the user, never carried by a recipe file
    recipe = load_recipe(args.config, overrides, cls=cls)
    if args.entry_point:
        restart_under_allocator(recipe.cpu_allocator)
    if _runs_on_cpu(recipe.device):
        configure_cpu_allocator(recipe.cpu_allocator, recipe.grad_checkpointing)
    else:
        logger.info("cpu_allocator=%s: not applied, the run uses %s", recipe.cpu_allocator, recipe.device)
    return recipe


def _runs_on_cpu(device: str) -> bool:
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def cmd_pretrain(args: argparse.Namespace) -> int:
    spec = tasks.get_task(tasks.PRETRAIN)
    recipe = _training_recipe(args, spec.recipe)
    result = tasks.train(spec.name, recipe)
    print(f"finished at step {result.state.step}; run folder: {recipe.output_dir}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    """simla finetune TASK: load the task's recipe (every check before work) and run it."""
    spec = tasks.get_task(args.task)
    print(json.dumps(tasks.train(spec.name, _training_recipe(args, spec.recipe)), indent=2))
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    rows = [{"task": spec.name, "model": spec.model.__name__, "recipe": spec.recipe.__name__ if spec.recipe else None,
             "train": "simla pretrain" if spec.name == tasks.PRETRAIN else ("simla finetune" if spec.train else None),
             "evaluate": spec.evaluation is not None, "demo": spec.demo is not None,
             "seed_stream": spec.seed_stream, "help": spec.help} for spec in tasks.all_tasks()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'task':<10} {'model':<27} {'train':<15} {'evaluate':<9} {'demo':<5} {'seed':>4}  help")
    for row in rows:
        print(f"{row['task']:<10} {row['model']:<27} {row['train'] or '-':<15} {'yes' if row['evaluate'] else '-':<9} "
              f"{'yes' if row['demo'] else '-':<5} {row['seed_stream'] if row['seed_stream'] is not None else '-':>4}  "
              f"{row['help']}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Explain (image, text) pairs: PNG sheets and explanations.json in --output."""
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
    _require_an_image(pairs)
    with evaluation_group(args.device) as device:
        model = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle).to(device)
        summary = explain_pairs(model, pairs, args.output, layer=args.layer, target=args.target,
                                top_concepts=args.concepts, batch_size=args.batch_size,
                                min_concept_probability=args.concept_threshold,
                                min_concept_margin=args.concept_margin)
    for record in summary["explanations"]:
        tags = ", ".join(word for word, _ in record.get("concepts", [])[:5])
        print(f"{record['sheet']}: score {record['score']:.3f}" + (f"; tags: {tags}" if tags else ""))
    print(f"explained {summary['explained']} of {summary['pairs']} pairs into {args.output} "
          f"({len(summary['failed'])} unreadable images)")
    return 0 if not summary["failed"] else 1


#: How `simla explain` names an unreadable image's problem, by BadSampleError kind (else its full reason).
_SHORT_IMAGE_PROBLEMS = {"missing": "no such file", "corrupt": "not an image, or a damaged one",
                         "truncated": "empty or truncated"}


def _require_an_image(pairs: Sequence[tuple[str, str]]) -> None:
    """Refuse, before the model is loaded and before anything is written, when no image of `pairs` can be
    read. When some can, `explain_pairs` explains those and lists the others (the command then exits 1)."""
    problems = []
    for path in dict.fromkeys(image for image, _ in pairs):
        try:
            load_image(path)
        except BadSampleError as err:
            problems.append(f"{path} ({_SHORT_IMAGE_PROBLEMS.get(err.kind, err.reason)})")
        else:
            return
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    which = "the image cannot" if len(problems) == 1 else f"none of the {len(problems)} images can"
    raise UnusableDataError(f"nothing to explain: {which} be read: {shown}")


def cmd_demo(args: argparse.Namespace) -> int:
    options = {"output": args.output or ("runs/demo" if args.task == "retrieval" else f"runs/demo_{args.task}"),
               "quick": args.quick, "steps": args.steps}
    if args.ablation:
        if args.task not in ("retrieval", "clipart"):
            raise ConfigError("--ablation belongs to the retrieval and clipart demos (simla demo clipart --ablation)")
        options["ablation"] = True
    if args.source:
        if args.task in ("retrieval", "clipart"):
            raise ConfigError(f"--from belongs to the task demos (e.g. simla demo vqa --from runs/demo); the "
                              f"{args.task} demo pretrains its own model")
        options["source"] = args.source
    # The demos train on the CPU: the command gives them the malloc policy every CPU training run gets.
    configure_cpu_allocator("auto")
    report = tasks.run_demo(args.task, **options)
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
    listing = sub.add_parser("tasks", help="list the tasks: model class, training command, evaluation, demo")
    listing.add_argument("--json", action="store_true", help="print machine-readable JSON")
    listing.set_defaults(func=cmd_tasks)

    _add_training_commands(sub)
    add_evaluate_commands(sub)
    add_search_commands(sub)
    _add_explain_command(sub)
    _add_demo_command(sub)
    _add_convert_command(sub)
    add_export_commands(sub)
    return parser


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML recipe (fields below); omitted = all defaults")
    parser.add_argument("--resume", metavar="PATH|auto", help="continue from a checkpoint ('auto': the run's last.pt)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow unpickling the files the recipe names (reference .pth checkpoints, a DALL-E "
                             f"encoder.pkl): runs their code, trusted files only ({TRUST_PICKLE_ENV}=1 does the "
                             "same); a recipe file cannot set trust_pickle: true")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides (values parsed as YAML)")


def _add_training_commands(sub: Any) -> None:
    """`simla pretrain` and one `simla finetune TASK` per trainable task of the registry."""
    spec = tasks.get_task(tasks.PRETRAIN)
    pretrain = sub.add_parser(
        "pretrain", help="pretrain SIMLA on image-caption pairs (same command under torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Pretrain with a YAML recipe plus key=value overrides, e.g.\n  " + spec.example + "\n"
        "  torchrun --nproc_per_node 8 -m simla.cli pretrain --config configs/pretrain_4m.yaml",
        epilog="recipe fields (key = default):\n" + recipe_help(spec.recipe))
    _add_recipe_arguments(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)

    finetune = sub.add_parser("finetune", help="fine-tune a pretrained SIMLA on a downstream task")
    finetune_tasks = finetune.add_subparsers(dest="task", required=True)
    for spec in tasks.finetune_tasks():
        task = finetune_tasks.add_parser(spec.name, help=spec.help, description=spec.example,
                                         formatter_class=argparse.RawDescriptionHelpFormatter,
                                         epilog="recipe fields (key = default):\n" + recipe_help(spec.recipe))
        _add_recipe_arguments(task)
        task.set_defaults(func=cmd_finetune)


def _add_explain_command(sub: Any) -> None:
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
    explain.add_argument("--concepts", type=int, default=10, help="concept tags per image, at most (0: none)")
    explain.add_argument("--concept-threshold", type=float, default=DEFAULT_MIN_PROBABILITY,
                         help="smallest probability a concept tag is shown with (default %(default)s, calibrated: "
                         "see docs/concepts.md)")
    explain.add_argument("--concept-margin", type=float, default=DEFAULT_MIN_MARGIN,
                         help="how far above the image's 30th-best word a tag must be (default %(default)s; it "
                         "silences an untrained concept head)")
    explain.add_argument("--batch-size", type=int, default=16, help="pairs per forward")
    explain.add_argument("--device", default="auto", help="auto, cpu or cuda")
    explain.add_argument("--trust-pickle", action="store_true", help="allow unpickling reference checkpoints")
    explain.set_defaults(func=cmd_explain)


def _add_demo_command(sub: Any) -> None:
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
                          "of class queries with and without ITM re-ranking, with an HTML results page; "
                          "'clipart' pretrains on real, human-made pictures (Debian's OpenClipart and Tux Paint "
                          "stamps, with a pretrained MiniLM text encoder), evaluates zero-shot and fine-tuned "
                          "retrieval on stamps it never saw, indexes and explains them (about 15 minutes; "
                          "--ablation adds ITC alone and ALBEF's objectives over 3 seeds).")
    # No argparse `choices`: an unknown name is one `simla: error:` line naming the demos, not a usage block.
    demo.add_argument("task", nargs="?", default="retrieval",
                      help=f"which demo: {', '.join(sorted(tasks.demos()))} (default retrieval)")
    demo.add_argument("--output", help="report folder (default runs/demo, runs/demo_vqa for vqa)")
    demo.add_argument("--quick", action="store_true", help="a reduced run of about a minute (for CI)")
    demo.add_argument("--steps", type=int, help="training steps (default: the demo's; retrieval 60 quick, 600 full)")
    demo.add_argument("--ablation", action="store_true",
                      help="retrieval: also pretrain the paper's ablation rows (ITC+ITM; +MLM; +MIM; +PSL) and tabulate them; "
                      "clipart: ITC alone, ITC+ITM+MLM and all five objectives, 3 seeds each")
    demo.add_argument("--from", dest="source", metavar="DEMO_DIR",
                      help="task demos: start from the pretrained model of this finished `simla demo` folder")
    demo.set_defaults(func=cmd_demo)


def _add_convert_command(sub: Any) -> None:
    convert = sub.add_parser("convert", help="import a reference SIMLA/ALBEF .pth (or re-save one of ours)")
    convert.add_argument("checkpoint", help="path of the checkpoint to read")
    convert.add_argument("output", help="our .pt checkpoint to write")
    convert.add_argument("--export", metavar="DIR", help="also write model.safetensors + config.json into DIR")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow arbitrary unpickling (reference files pickle their config); trusted files only")
    convert.add_argument("--task", choices=model_tasks(),
                         help="model to convert into; 'retrieval' keeps a retrieval/ALBEF checkpoint's momentum "
                              "teachers and queues, 'base' keeps the online weights only (default: the checkpoint's "
                              "own task; for a reference file 'pretrain' when it has MIM/PSL heads, else 'base')")
    convert.add_argument("--non-strict", action="store_true",
                         help="accept missing/unexpected keys and shape mismatches (all listed; mismatched tensors "
                              "keep fresh weights) instead of failing")
    convert.set_defaults(func=cmd_convert)


def _user_errors() -> tuple[type[BaseException], ...]:
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
