"""The speed benchmarks still run: a tiny CPU smoke run of the pretraining-step and GPU benchmark scripts.

Timings are never asserted (they are the benchmarks' output, not a test); what is checked is that every
configuration runs, reports sane figures and that the reference and fast paths train the same model.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          timeout=600, check=True)


def test_pretrain_step_compares_the_fast_path_with_the_reference_path_in_separate_processes():
    done = _run("pretrain_step.py", "--batch-size", "4", "--steps", "1", "--warmup", "1", "--queue-size", "16",
                "--baseline", "reference", "--isolate", "--json")
    report = json.loads(done.stdout)
    assert report["isolated"]
    base, run = report["baseline"], report["result"]
    assert base["config"]["path"] == "reference" and run["config"]["path"] == "fast"
    assert all(r["samples_per_s"] > 0 and r["peak_memory_mib"] > 0 for r in (base, run))
    assert base["parameters"] == run["parameters"]
    assert report["ratio_vs_baseline"]["samples_per_s"] > 0


def test_pretrain_step_interleaves_the_timed_steps_of_two_live_processes():
    done = _run("pretrain_step.py", "--batch-size", "4", "--steps", "3", "--warmup", "1", "--queue-size", "16",
                "--baseline", "reference", "--interleave", "--threads", "1", "--json")
    report = json.loads(done.stdout)
    assert report["interleaved"] and report["isolated"]
    times = report["step_times"]
    assert [len(times[name]) for name in ("baseline", "run")] == [3, 3]  # the timed steps only, not the warm-up
    assert all(math.isfinite(t) and t > 0 for name in ("baseline", "run") for t in times[name])
    ratios = report["ratio_vs_baseline"]
    pairs = ratios["step_pairs"]
    assert len(pairs) == 3 and all(math.isfinite(p) and p > 0 for p in pairs)
    # The documented summaries: each worker's figure is the median of ITS timed steps (warm-up excluded), the
    # pair summary is the median of the pairs, and the throughput ratio is the inverse of the step-time ratio.
    for name, key in (("baseline", "baseline"), ("run", "result")):
        assert report[key]["s_per_step"] == pytest.approx(statistics.median(times[name]), rel=1e-9)
        assert report[key]["samples_per_s"] == pytest.approx(4 / statistics.median(times[name]), rel=1e-9)
    assert ratios["step_pairs_median"] == pytest.approx(statistics.median(pairs), rel=1e-9)
    assert ratios["samples_per_s"] == pytest.approx(1 / ratios["step_time"], rel=1e-9)
    assert ratios["step_time"] == pytest.approx(statistics.median(times["run"]) / statistics.median(times["baseline"]),
                                                rel=1e-9)
    assert report["baseline"]["config"]["path"] == "reference" and report["result"]["config"]["path"] == "fast"
    assert report["baseline"]["config"]["warmup"] == 1 and report["result"]["peak_memory_mib"] > 0


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_pretrain_step_runs_checkpointing_under_a_named_malloc_against_the_plain_default():
    from simla.train.cpu_allocator import PRELOADED_ALLOCATORS, find_allocator_library

    name = next(n for n in PRELOADED_ALLOCATORS if find_allocator_library(n) is not None)  # dev extra: mimalloc
    done = _run("pretrain_step.py", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--queue-size", "16",
                "--grad-checkpointing", "--cpu-allocator", name, "--baseline", "plain",
                "--baseline-cpu-allocator", "auto", "--isolate", "--json")
    report = json.loads(done.stdout)
    base, run = report["baseline"], report["result"]
    assert (base["config"]["cpu_allocator"], base["malloc"]) == ("auto", "glibc")
    assert (run["config"]["cpu_allocator"], run["malloc"]) == (name, name)
    assert run["config"]["grad_checkpointing"] and not base["config"]["grad_checkpointing"]
    # without a process of its own, the named malloc cannot be loaded: one argparse error, before any work
    refused = subprocess.run([sys.executable, str(BENCHMARKS / "pretrain_step.py"), "--cpu-allocator", name],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "add --isolate or --interleave" in refused.stderr


def _photos(folder: Path, count: int = 3) -> Path:
    """Large noisy JPEGs standing in for photographs (the benchmarks cut their test images from them)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        smooth = np.kron(rng.integers(0, 256, (30, 40, 3)), np.ones((40, 40, 1)))
        noisy = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"photo{i}.jpg", quality=90)
    return folder


def test_input_pipeline_benchmark_compares_both_loaders_on_cut_photos(tmp_path):
    images, out = tmp_path / "jpegs", tmp_path / "pipeline.json"
    done = _run("input_pipeline.py", "--source", str(_photos(tmp_path / "photos")), "--images", str(images),
                "--count", "6", "--batch-size", "4", "--batches", "1", "--rounds", "2", "--workers", "1",
                "--no-gpu-estimate", "--output", str(out))
    report = json.loads(out.read_text())
    sizes = [Image.open(p).size for p in sorted(images.glob("*.jpg"))]
    assert len(sizes) == 6 and all(500 <= max(size) <= 1000 for size in sizes)  # COCO-like photos were cut
    for views in ("pretrain", "finetune"):
        rates = report[views]["rates"]
        assert [len(rates["authors"]), len(rates["simla"])] == [2, 2] and all(r > 0 for v in rates.values() for r in v)
        assert report[views]["ratio"] == pytest.approx(report[views]["median"]["simla"] / report[views]["median"]["authors"])
    assert report["dataloader"]["workers"] == 1 and report["dataloader"]["samples_per_s"] > 0
    assert "| pretraining (256 + 128 px) |" in done.stdout


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out, images = tmp_path / "gpu.json", tmp_path / "jpegs"
    images.mkdir()
    for i, p in enumerate(sorted(_photos(tmp_path / "photos").glob("*.jpg")) * 3):
        (images / f"{i}.jpg").write_bytes(p.read_bytes())
    done = _run("gpu_pretrain.py", "--device", "cpu", "--model", "simla_tiny", "--batch-size", "4", "--steps", "1",
                "--warmup", "1", "--text-length", "12", "--no-compile", "--output", str(out),
                "--loader-images", str(images), "--loader-workers", "1")
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["rows"]] == ["reference", "fast"]
    assert report["flops_per_sample"] > 1e6  # forward + backward of a real (tiny) model
    assert report["rows"][1]["config"]["precision"] == "bf16"
    assert "| fast |" in done.stdout and report["speedup"] > 0
    loader = report["loader"]
    assert loader["workers"] == 1 and loader["samples_per_s"] > 0 and loader["workers_needed"] >= 1
    assert loader["keeps_up"] == (loader["samples_per_s"] >= report["rows"][1]["samples_per_s"])
    assert "loader:" in done.stdout
