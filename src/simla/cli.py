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
    total = model.num_parameters(trainable_only=False)
    return {
        "online": online,
        "momentum": total - online,
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

    model = load_checkpoint(args.checkpoint, trust_pickle=args.trust_pickle, strict=not args.non_strict)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="simla", description="SIMLA vision-language pretraining and evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
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

    convert = sub.add_parser("convert", help="import a reference SIMLA/ALBEF .pth (or re-save one of ours)")
    convert.add_argument("checkpoint", help="path of the checkpoint to read")
    convert.add_argument("output", help="our .pt checkpoint to write")
    convert.add_argument("--export", metavar="DIR", help="also write model.safetensors + config.json into DIR")
    convert.add_argument("--trust-pickle", action="store_true",
                         help="allow arbitrary unpickling (reference files pickle their config); trusted files only")
    convert.add_argument("--non-strict", action="store_true",
                         help="accept missing/unexpected keys (they are listed) instead of failing")
    convert.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
