"""`simla pretrain` end to end on tiny data: bad input, recipes, formats, checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import simla
from simla.cli import main
from simla.data.pretrain_data import CaptionBatches
from simla.train.pretrain import run_pretraining
from simla.train.recipe import load_recipe

from datasets import make_pairs, salt_with_bad_input, write_json, write_shards

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(tmp_path: Path, tokenizer: str, **extra) -> list[str]:
    base = {
        "model": "simla_tiny", "model_config.queue_size": 16, "text_encoder": None, "vision_encoder": None,
        "tokenizer": tokenizer, "kmeans_fit_images": 16, "batch_size": 4, "max_steps": 4, "num_workers": 0,
        "log_every": 1, "save_every": 2, "output_dir": str(tmp_path / "run"), "warmup_steps": 2,
        "progress": False, "device": "cpu", "model_config.visual_vocab_size": 32,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


@pytest.fixture(scope="module")
def salted(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("salted")
    write_json(root / "pairs.json", salt_with_bad_input(root, make_pairs(root, 16)))
    return root


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_pretrain_on_salted_json_logs_and_checkpoints(tmp_path, salted, minilm_dir):
    recipe = load_recipe(ROOT / "configs" / "pretrain_tiny.yaml",
                         tiny_overrides(tmp_path, minilm_dir, train_file=str(salted / "pairs.json"),
                                        image_root=str(salted), max_steps=6, tensorboard=True))
    result = run_pretraining(recipe)
    assert result.state.step == 6
    run = tmp_path / "run"
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    for key in ("epoch", "lr", "alpha", "loss_itc", "loss_itm", "loss_mlm", "loss_mim", "loss_psl", "samples_per_s",
                "skipped_total", "grad_norm"):
        assert key in log[-1], key
    # 25 records, 5 of them unusable (corrupt, truncated, empty, missing, empty caption): 6 steps x 4 = 24
    # samples drawn per epoch-permutation, so some bad ones were met, skipped and counted.
    assert log[-1]["skipped_total"] >= 1
    assert (run / "config.yaml").is_file() and (run / "visual_tokenizer.safetensors").is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    model = simla.load_checkpoint(run / "checkpoints" / "last.pt")
    assert isinstance(model, simla.SimlaForPretraining)


def test_batch_of_only_bad_samples_is_refilled_without_duplicates(tmp_path, salted, minilm_dir):
    recipe = load_recipe(None, tiny_overrides(tmp_path, minilm_dir, train_file=str(salted / "pairs.json"),
                                              image_root=str(salted)))
    from simla.train.pretrain import build_data

    config = simla.get_config("simla_tiny")
    data, *_ = build_data(recipe, config, simla.get_tokenizer(minilm_dir))
    dataset: CaptionBatches = data.dataset
    bad = [i for i, r in enumerate(dataset.records) if any(w in r.image for w in ("corrupt", "truncated", "empty", "missing"))]
    assert len(bad) == 4
    batch, meta = dataset[(0, 0, bad)]
    assert batch["image"].shape[0] == 4
    assert len(set(meta["indices"])) == 4 and not set(meta["indices"]) & set(bad)
    assert sum(meta["skipped"].values()) >= 4


def test_pretrain_from_csv_and_webdataset(tmp_path, minilm_dir):
    import csv

    root = tmp_path / "data"
    records = make_pairs(root, 12)
    with open(root / "pairs.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "text"])
        for r in records:
            writer.writerow([r["image"], r["caption"] if isinstance(r["caption"], str) else r["caption"][0]])
    run_pretraining(load_recipe(None, tiny_overrides(tmp_path / "csv", minilm_dir, train_file=str(root / "pairs.csv"),
                                                     image_root=str(root), csv_image_key="path", csv_caption_key="text",
                                                     max_steps=2)))
    assert len(read_log(tmp_path / "csv" / "run")) == 2
    pattern = write_shards(tmp_path / "shards", count=24, per_shard=6)
    result = run_pretraining(load_recipe(None, tiny_overrides(tmp_path / "wds", minilm_dir, train_file=pattern,
                                                              num_workers=2, max_steps=3)), record_history=True)
    keys = [k for batch in result.data.history for k in batch]
    assert len(keys) == 12 and len(set(keys)) == 12  # no sample twice within the epoch


@pytest.mark.parametrize(
    "content, message",
    [
        ("batch_size: [1\n", "malformed YAML at line"),
        ("batch_sise: 4\n", "unknown key 'batch_sise'"),
        ("batch_size: four\n", "batch_size: expected an integer"),
        ("model_config:\n  queue_sise: 3\n", "queue_sise"),
        ("precision: fp16\n", "allowed values"),
    ],
)
def test_bad_recipes_fail_before_any_work(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_text("train_file: x.json\n" + content)
    with pytest.raises(ValueError, match=message) as err:
        load_recipe(path)
    assert str(path) in str(err.value) or "model" in str(err.value)


def test_malformed_annotation_file_names_record_and_field(tmp_path, minilm_dir):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"image": "a.jpg", "caption": "fine"}, {"image": "b.jpg", "captions": "typo"}]))
    recipe = load_recipe(None, tiny_overrides(tmp_path, minilm_dir, train_file=str(path)))
    with pytest.raises(ValueError, match=r"pairs.json.*record 1.*caption"):
        run_pretraining(recipe)
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_pretrain_help_lists_fields_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    text = capsys.readouterr().out
    for field in ("train_file", "image_root", "output_dir", "batch_size", "max_steps", "save_every", "log_every",
                  "seed", "model = 'simla_base'"):
        assert field in text, field


def _cli(args: list[str], **popen) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "simla.cli", "pretrain", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.parametrize("source", ["json", "shards"])
def test_kill_and_resume_reproduces_the_uninterrupted_losses(tmp_path, minilm_dir, source):
    root = tmp_path / "data"
    root.mkdir()
    steps = 8
    if source == "json":
        write_json(root / "pairs.json", make_pairs(root, 16))
        common = dict(train_file=str(root / "pairs.json"), image_root=str(root))
    else:  # two workers, so the resumed round-robin over worker roles is exercised too
        common = dict(train_file=write_shards(root / "shards", count=48, per_shard=6), num_workers=2,
                      shuffle_buffer=4)
    common.update(max_steps=steps, save_every=3)
    full = _cli(tiny_overrides(tmp_path / "full", minilm_dir, **common))
    assert full.wait(timeout=600) == 0, full.stdout.read()
    reference = read_log(tmp_path / "full" / "run")

    interrupted = tmp_path / "cut" / "run"
    proc = _cli(tiny_overrides(tmp_path / "cut", minilm_dir, **common))
    checkpoint = interrupted / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert checkpoint.exists()
    saved = torch.load(checkpoint, weights_only=True)["train_state"]["step"]
    assert 0 < saved < steps, "the kill should land mid-run"
    resumed = _cli(tiny_overrides(tmp_path / "cut", minilm_dir, **common) + ["--resume", "auto"])
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    continued = read_log(interrupted)
    assert [r["step"] for r in continued] == list(range(1, steps + 1))
    for a, b in zip(reference, continued):
        for key in ("loss_itc", "loss_itm", "loss_mlm", "loss_mim", "loss_psl", "lr", "alpha"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_bf16_accumulation_and_checkpointing_options(tmp_path, minilm_dir):
    root = tmp_path / "data"
    root.mkdir()
    write_json(root / "pairs.json", make_pairs(root, 16))
    recipe = load_recipe(None, tiny_overrides(tmp_path, minilm_dir, train_file=str(root / "pairs.json"),
                                              image_root=str(root), max_steps=2, precision="bf16",
                                              grad_accum_steps=2, grad_checkpointing=True, grad_clip=1.0))
    # The recipe's options reach the model and the loop: after step 1, watch step 2's encoder matmuls.
    # (tests/test_engine.py proves the numerics: accumulation, checkpointing and bf16 tolerance.)
    dtypes: set[torch.dtype] = set()

    def watch(model, step: int) -> None:
        if step == 1:
            assert model.visual_encoder.grad_checkpointing and model.text_encoder.gradient_checkpointing
            for module in model.text_encoder.modules():
                if isinstance(module, torch.nn.Linear):
                    module.register_forward_hook(lambda mod, args, out: dtypes.add(out.dtype))

    result = run_pretraining(recipe, on_step=watch)
    log = read_log(tmp_path / "run")
    assert dtypes == {torch.bfloat16}
    # Two micro-batches of 4 per optimizer step.
    assert result.state.step == 2 and result.state.samples_seen == 2 * 2 * 4
    assert [r["samples_seen"] for r in log] == [8, 16]
    assert all(torch.isfinite(torch.tensor(r["loss_itc"])) for r in log)


def test_resume_keeps_the_model_shape_of_the_run(tmp_path, minilm_dir):
    root = tmp_path / "data"
    root.mkdir()
    write_json(root / "pairs.json", make_pairs(root, 16))
    common = dict(train_file=str(root / "pairs.json"), image_root=str(root), text_encoder=minilm_dir, max_steps=1,
                  save_every=1)
    run_pretraining(load_recipe(None, tiny_overrides(tmp_path, minilm_dir, **common)))
    # Resuming builds the model from the checkpoint's config (384-wide MiniLM text), not from the preset.
    result = run_pretraining(load_recipe(None, tiny_overrides(tmp_path, minilm_dir, **{**common, "max_steps": 2},
                                                              resume="auto")))
    assert result.model.config.text.hidden_size == 384 and result.state.step == 2


def test_a_dataset_of_mostly_bad_samples_stops_with_counts(tmp_path, minilm_dir):
    root = tmp_path / "data"
    records = make_pairs(root, 4) + [{"image": f"images/missing{i}.jpg", "caption": "gone"} for i in range(200)]
    write_json(root / "pairs.json", records)
    recipe = load_recipe(None, tiny_overrides(tmp_path, minilm_dir, train_file=str(root / "pairs.json"),
                                              image_root=str(root), max_steps=50, max_bad_fraction=0.5,
                                              kmeans_fit_images=400))
    with pytest.raises(RuntimeError, match="bad"):
        run_pretraining(recipe)


@pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")
def test_simla_pretrain_restarts_itself_under_a_named_malloc(tmp_path, minilm_dir):
    from simla.train.cpu_allocator import PRELOADED_ALLOCATORS, find_allocator_library

    name = next((n for n in PRELOADED_ALLOCATORS if find_allocator_library(n) is not None), None)
    assert name is not None, "the dev extra installs mimalloc"
    root = tmp_path / "data"
    root.mkdir()
    write_json(root / "pairs.json", make_pairs(root, 8))
    overrides = tiny_overrides(tmp_path, minilm_dir, train_file=str(root / "pairs.json"), image_root=str(root),
                               max_steps=1, cpu_allocator=name, grad_checkpointing=True)
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SIMLA_MALLOC_RESTARTED")}
    done = subprocess.run([sys.executable, "-m", "simla.cli", "-v", "pretrain", *overrides], capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    # The first process restarts before building anything; the second trains under the library.
    assert f"cpu_allocator={name}: restarting under LD_PRELOAD=" in done.stderr
    assert f"cpu_allocator={name}: malloc comes from {name}" in done.stderr
    assert done.stdout.count("finished at step 1") == 1
