"""Image-encoder throughput: torch eager fp32, torch dynamic int8 (`quantize_dynamic` of the Linear layers),
and the ONNX export (`simla.onnx_runtime.export_onnx`) run by ONNX Runtime in fp32 and int8.

One process, one random-weight model (speed does not depend on the weights), the same pixels for all. The
timed runs alternate between the configurations (the order reversed every other round), so a machine whose
load changes slows them alike; each configuration reports its median and best images/s and its speed-up over
torch int8, the median of the per-round ratios. Also reported: how far each output is from torch fp32 (max
abs difference, least cosine). Needs the onnx extra (pip install "simla[onnx]").

    python benchmarks/onnx_runtime.py --model simla_base --batch 16 --threads 1 2 --repeats 8
    python benchmarks/onnx_runtime.py --model simla_tiny --batch 2 --repeats 1   # smoke
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


def _configurations(model, folder: str, threads: list[int]) -> dict[tuple[str, int], object]:
    """(name, threads) -> a function of pixels returning the features."""
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8).eval()
    export_onnx(model, f"{folder}/fp32")
    export_onnx(model, f"{folder}/int8", int8=True)
    runs = {}
    for count in threads:
        for name, torch_model in (("torch_fp32", model), ("torch_int8", quantized)):
            def run(pixels, torch_model=torch_model, count=count):
                torch.set_num_threads(count)
                with torch.inference_mode():
                    return torch_model.encode_image(pixels)
            runs[(name, count)] = run
        for precision in ("fp32", "int8"):
            runs[(f"ort_{precision}", count)] = OnnxModel.load(f"{folder}/{precision}", threads=count).encode_image
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="simla_base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=8, help="timed rounds (after one warm-up round)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = simla.create_model(args.model, task="base").eval()
    size = model.config.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size)
    with tempfile.TemporaryDirectory() as folder:
        runs = _configurations(model, folder, args.threads)
        with torch.inference_mode():
            reference = model.encode_image(pixels)
        agreement = {}
        for key, run in runs.items():  # the warm-up round
            out = run(pixels)
            agreement[key[0]] = {"max_abs_diff": float((out - reference).abs().max()),
                                 "min_cosine": float(torch.cosine_similarity(out, reference).min())}
        times = {key: [] for key in runs}
        for round_ in range(args.repeats):
            for key in (list(runs) if round_ % 2 == 0 else list(runs)[::-1]):
                started = time.perf_counter()
                runs[key](pixels)
                times[key].append(time.perf_counter() - started)
    rows = []
    for (name, count), seconds in times.items():
        base = times[(BASELINE, count)]
        rows.append({"config": name, "threads": count, "images_per_s_median": round(args.batch / statistics.median(seconds), 2),
                     "images_per_s_best": round(args.batch / min(seconds), 2),
                     "speedup_vs_torch_int8": round(statistics.median(b / s for b, s in zip(base, seconds)), 2),
                     "seconds": [round(s, 2) for s in seconds]})
    print(json.dumps({"model": args.model, "image_size": size, "batch": args.batch, "repeats": args.repeats,
                      "agreement_with_torch_fp32": agreement, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
