"""Run under torchrun by test_distributed.py: pretrain a few steps, then dump this rank's state.

With SIMLA_TEST_KILL_AT_STEP=k in the environment, every rank SIGKILLs itself right after step k
(after that step's log line and any checkpoint of that step): a crash of the whole job at a known point.
"""

from __future__ import annotations

import os
import signal
import sys

import torch

from simla.train.pretrain import run_pretraining
from simla.train.recipe import load_recipe


def kill_at(step_to_die: int):
    def on_step(model, step: int) -> None:
        if step == step_to_die:
            os.kill(os.getpid(), signal.SIGKILL)

    return on_step


def main() -> None:
    out_file, overrides = sys.argv[1], sys.argv[2:]
    rank = int(os.environ["RANK"])
    kill = os.environ.get("SIMLA_TEST_KILL_AT_STEP")
    result = run_pretraining(load_recipe(None, overrides), record_history=True,
                             on_step=kill_at(int(kill)) if kill else None)
    model = result.model
    torch.save({
        "momentum": {k: v for k, v in model.state_dict().items() if k.split(".")[0].endswith("_m")},
        "online": {k: v for k, v in model.state_dict().items() if k.startswith(("visual_encoder.", "text_proj."))},
        "image_queue": model.image_queue, "text_queue": model.text_queue, "queue_ptr": model.queue_ptr,
        "history": result.data.history,
    }, f"{out_file}.rank{rank}.pt")


if __name__ == "__main__":
    main()
