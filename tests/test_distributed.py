"""Two CPU processes under torchrun (gloo): teachers and queues stay identical, samples are disjoint, and a
run killed with SIGKILL resumes with every rank's state, reproducing the uninterrupted losses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from datasets import make_pairs, write_json
from test_train_pretrain import read_log, tiny_overrides

HERE = Path(__file__).resolve().parent
STEPS, BATCH, SAVE_EVERY, KILL_AT = 4, 4, 2, 3


def torchrun(args: list[str], **env_extra: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 ARGS` on CPU; the tests folder is importable in the workers."""
    path = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **env_extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def overrides(base: Path, data: Path, minilm_dir: str) -> list[str]:
    # 24 pairs = 3 steps of 2 x 4 per epoch: the 4 steps cross an epoch boundary.
    return tiny_overrides(base, minilm_dir, train_file=str(data / "pairs.json"), image_root=str(data),
                          max_steps=STEPS, batch_size=BATCH, save_every=SAVE_EVERY)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp_data")
    write_json(root / "pairs.json", make_pairs(root, 24))
    return root


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root, minilm_dir) -> Path:
    """An uninterrupted two-process run; each rank dumps its teachers, queues and record history."""
    base = tmp_path_factory.mktemp("ddp_full")
    proc = torchrun([str(HERE / "ddp_worker.py"), str(base / "dump"), *overrides(base, data_root, minilm_dir)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base


def test_two_process_gloo_run(uninterrupted):
    rank0 = torch.load(uninterrupted / "dump.rank0.pt", weights_only=True)
    rank1 = torch.load(uninterrupted / "dump.rank1.pt", weights_only=True)
    for key in ("image_queue", "text_queue", "queue_ptr"):
        assert torch.equal(rank0[key], rank1[key]), key
    # The queues hold both ranks' features: 2 ranks x 4 steps x 4 = 32 columns were written (queue of 16).
    assert int(rank0["queue_ptr"]) == (2 * STEPS * BATCH) % 16
    for group in ("momentum", "online"):
        assert rank0[group].keys() == rank1[group].keys()
        for name in rank0[group]:
            assert torch.allclose(rank0[group][name], rank1[group][name], atol=1e-6), name
    epoch0 = 3  # batches per rank in the first epoch
    seen0 = [i for b in rank0["history"][:epoch0] for i in b]
    seen1 = [i for b in rank1["history"][:epoch0] for i in b]
    assert len(seen0) == len(seen1) == epoch0 * BATCH
    assert not set(seen0) & set(seen1)
    log = read_log(uninterrupted / "run")
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert log[-1]["samples_seen"] == 2 * STEPS * BATCH  # both ranks' samples


def test_sigkill_and_resume_auto_reproduce_the_uninterrupted_two_process_losses(tmp_path, uninterrupted, data_root,
                                                                               minilm_dir):
    args = overrides(tmp_path, data_root, minilm_dir)
    killed = torchrun([str(HERE / "ddp_worker.py"), str(tmp_path / "dump"), *args],
                      SIMLA_TEST_KILL_AT_STEP=str(KILL_AT))
    assert killed.returncode != 0, "the workers should have been killed"
    run = tmp_path / "run"
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["train_state"]
    assert state["step"] == SAVE_EVERY and state["world_size"] == 2
    assert [r["rank"] for r in state["ranks"]] == [0, 1]
    # The two ranks' generators really differ, so restoring rank 0's state on rank 1 would be visible.
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])
    assert [r["step"] for r in read_log(run)] == list(range(1, KILL_AT + 1))  # a line past the checkpoint

    resumed = torchrun(["-m", "simla.cli", "pretrain", *args, "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    reference, continued = read_log(uninterrupted / "run"), read_log(run)
    assert [r["step"] for r in continued] == list(range(1, STEPS + 1))
    for a, b in zip(reference, continued):
        for key in ("loss_itc", "loss_itm", "loss_mlm", "loss_mim", "loss_psl", "lr", "alpha", "samples_seen"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
