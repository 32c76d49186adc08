"""`simla export onnx`: argument parsing only; the export is :func:`simla.onnx_runtime.export_onnx`."""

from __future__ import annotations

import argparse
from typing import Any

from .checkpoint import load_checkpoint
from .onnx_runtime import DESCRIPTION_FILE, GRAPHS, export_onnx


def cmd_export_onnx(args: argparse.Namespace) -> int:
    model = load_checkpoint(args.checkpoint, task="base", trust_pickle=args.trust_pickle)
    folder = export_onnx(model, args.output, int8=args.int8)
    print(f"wrote {', '.join(GRAPHS.values())} and {DESCRIPTION_FILE} ({'int8' if args.int8 else 'fp32'}) into {folder}")
    return 0


def add_export_commands(sub: Any) -> None:
    """`simla export onnx`."""
    export = sub.add_parser("export", help="export a model for another runtime (onnx)")
    formats = export.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser(
        "onnx", help="the image encoder, text encoder and ITM scorer as ONNX graphs for ONNX Runtime",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="simla export onnx --checkpoint C --output DIR [--int8]\n\n"
        "Writes into DIR:\n"
        "  image_encoder.onnx  pixels (B,3,R,R) normalised -> L2-normalised ITC features (B,D)\n"
        "  text_encoder.onnx   input_ids, attention_mask (B,L) -> L2-normalised ITC features (B,D)\n"
        "  itm.onnx            pixels, input_ids, attention_mask -> match probability (B,)\n"
        f"  {DESCRIPTION_FILE}     model name, config, tokenizer, the model's fingerprint, precision\n\n"
        "B and L are dynamic. Load the folder with simla.onnx_runtime.OnnxModel.load(DIR). Needs the onnx\n"
        "extra: pip install \"simla[onnx]\".")
    onnx.add_argument("--checkpoint", required=True,
                      help="ours (.pt), an export directory or a reference .pth; its online weights are exported")
    onnx.add_argument("--output", required=True, metavar="DIR", help="folder to write the graphs into")
    onnx.add_argument("--int8", action="store_true",
                      help="quantise the matrix weights to int8 (ONNX Runtime dynamic quantisation)")
    onnx.add_argument("--trust-pickle", action="store_true", help="allow unpickling reference checkpoints")
    onnx.set_defaults(func=cmd_export_onnx)
