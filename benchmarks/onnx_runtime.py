"""Throughput of the exported graphs: torch eager fp32, torch dynamic int8 (`quantize_dynamic` of the Linear
layers), and the ONNX export (`simla.onnx_runtime.export_onnx`) run by ONNX Runtime in fp32 and int8.

`--graphs` picks what is timed: `image` (the image encoder, the default), `text` (the text encoder on
captions of `--length` tokens) and `itm` (the ITM scorer on image-caption pairs). One process, one
random-weight model (speed does not depend on the weights), the same inputs for all. The timed runs alternate
between the configurations (the order reversed every other round), so a machine whose load changes slows
them alike; each configuration reports its median and best items/s and its speed-up over torch int8, the
median of the per-round ratios, and how far its output is from torch fp32 (max abs difference; least cosine
for features). Needs the onnx extra (pip install "simla[onnx]").

    python benchmarks/onnx_runtime.py --model simla_base --batch 16 --threads 1 2 --repeats 6
    python benchmarks/onnx_runtime.py --model simla_base --graphs text itm --threads 2 --repeats 4
    python benchmarks/onnx_runtime.py --model simla_tiny --batch 2 --threads 1 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import torch
from torch import nn

import simla
from simla.onnx_runtime import OnnxModel, export_onnx

BASELINE = "torch_int8"


def _call(graph: str, model, inputs: dict):
    """The model's (torch or ONNX Runtime) function of the graph, on the inputs."""
    if graph == "image":
        return model.encode_image(inputs["pixels"])
    if graph == "text":
        return model.encode_text(inputs["texts"])
    return model.itm_score(inputs["pixels"], inputs["texts"])


def _configurations(model, folder: str, threads: list[int]) -> dict[tuple[str, int], object]:
    """(name, threads) -> the model to call (a torch model runs under `threads` torch threads)."""
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8).eval()
    export_onnx(model, f"{folder}/fp32")
    export_onnx(model, f"{folder}/int8", int8=True)
    runs = {}
    for count in threads:
        runs[("torch_fp32", count)] = model
        runs[("torch_int8", count)] = quantized
        for precision in ("fp32", "int8"):
            runs[(f"ort_{precision}", count)] = OnnxModel.load(f"{folder}/{precision}", threads=count)
    return runs


def _run(graph: str, key: tuple[str, int], runs: dict, inputs: dict):
    if key[0].startswith("torch"):
        torch.set_num_threads(key[1])
        with torch.inference_mode():
            return _call(graph, runs[key], inputs)
    return _call(graph, runs[key], inputs)


def _agreement(out, reference) -> dict[str, float]:
    found = {"max_abs_diff": float((out - reference).abs().max())}
    if out.dim() == 2:
        found["min_cosine"] = float(torch.cosine_similarity(out, reference).min())
    return found


def _time_graph(graph: str, runs: dict, inputs: dict, batch: int, repeats: int) -> dict:
    reference = _run(graph, ("torch_fp32", next(iter(runs))[1]), runs, inputs)
    agreement = {key[0]: _agreement(_run(graph, key, runs, inputs), reference) for key in runs}  # the warm-up
    times = {key: [] for key in runs}
    for round_ in range(repeats):
        for key in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
            started = time.perf_counter()
            _run(graph, key, runs, inputs)
            times[key].append(time.perf_counter() - started)
    rows = []
    for (name, count), seconds in times.items():
        base = times[(BASELINE, count)]
        rows.append({"config": name, "threads": count,
                     "items_per_s_median": round(batch / statistics.median(seconds), 2),
                     "items_per_s_best": round(batch / min(seconds), 2),
                     "speedup_vs_torch_int8": round(statistics.median(b / s for b, s in zip(base, seconds)), 2),
                     "seconds": [round(s, 3) for s in seconds]})
    return {"agreement_with_torch_fp32": agreement, "results": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simla_base")
    parser.add_argument("--graphs", nargs="+", choices=("image", "text", "itm"), default=["image"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=25, help="tokens per caption (text and itm)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = simla.create_model(args.model, task="base").eval()
    size = model.config.vision.image_size
    vocab = model.config.text.vocab_size
    ids = torch.randint(1, vocab, (args.batch, args.length))
    inputs = {"pixels": torch.randn(args.batch, 3, size, size), "texts": (ids, torch.ones_like(ids))}
    report = {"model": args.model, "image_size": size, "batch": args.batch, "length": args.length,
              "repeats": args.repeats, "graphs": {}}
    with tempfile.TemporaryDirectory() as folder:
        runs = _configurations(model, folder, args.threads)
        for graph in args.graphs:
            report["graphs"][graph] = _time_graph(graph, runs, inputs, args.batch, args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
