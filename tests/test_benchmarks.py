"""The speed benchmarks still run: a tiny CPU smoke run of the pretraining-step and GPU benchmark scripts.

Timings are never asserted (they are the benchmarks' output, not a test); what is checked is that every
configuration runs, reports sane figures and that the reference and fast paths train the same model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    done = _run("pretrain_step.py", "--batch-size", "4", "--steps", "2", "--warmup", "1", "--queue-size", "16",
                "--baseline", "reference", "--interleave", "--threads", "1", "--json")
    report = json.loads(done.stdout)
    assert report["interleaved"] and report["isolated"]
    assert [len(report["step_times"][name]) for name in ("baseline", "run")] == [2, 2]
    pairs = report["ratio_vs_baseline"]["step_pairs"]
    assert pairs == [b / m for b, m in zip(report["step_times"]["baseline"], report["step_times"]["run"])]
    assert report["baseline"]["config"]["path"] == "reference" and report["result"]["config"]["path"] == "fast"
    assert report["baseline"]["config"]["warmup"] == 1 and report["result"]["peak_memory_mib"] > 0


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    done = _run("gpu_pretrain.py", "--device", "cpu", "--model", "simla_tiny", "--batch-size", "4", "--steps", "1",
                "--warmup", "1", "--text-length", "12", "--no-compile", "--output", str(out))
    report = json.loads(out.read_text())
    assert [r["path"] for r in report["rows"]] == ["reference", "fast"]
    assert report["flops_per_sample"] > 1e6  # forward + backward of a real (tiny) model
    assert report["rows"][1]["config"]["precision"] == "bf16"
    assert "| fast |" in done.stdout and report["speedup"] > 0
