"""Two CPU processes under torchrun (gloo): teachers and queues stay identical, samples are disjoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from datasets import make_pairs, write_json
from test_train_pretrain import tiny_overrides

HERE = Path(__file__).resolve().parent


def test_two_process_gloo_run(tmp_path, minilm_dir):
    root = tmp_path / "data"
    root.mkdir()
    write_json(root / "pairs.json", make_pairs(root, 24))
    steps, batch = 3, 4
    overrides = tiny_overrides(tmp_path, minilm_dir, train_file=str(root / "pairs.json"), image_root=str(root),
                               max_steps=steps, batch_size=batch, save_every=steps)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(tmp_path / "dump"), *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rank0 = torch.load(tmp_path / "dump.rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "dump.rank1.pt", weights_only=True)
    for key in ("image_queue", "text_queue", "queue_ptr"):
        assert torch.equal(rank0[key], rank1[key]), key
    # The queues hold both ranks' features: 2 ranks x 3 steps x 4 = 24 columns were written (queue of 16).
    assert int(rank0["queue_ptr"]) == (2 * steps * batch) % 16
    for group in ("momentum", "online"):
        assert rank0[group].keys() == rank1[group].keys()
        for name in rank0[group]:
            assert torch.allclose(rank0[group][name], rank1[group][name], atol=1e-6), name
    seen0 = [i for b in rank0["history"] for i in b]
    seen1 = [i for b in rank1["history"] for i in b]
    assert len(seen0) == len(seen1) == steps * batch
    assert not set(seen0) & set(seen1)
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(log) == steps
