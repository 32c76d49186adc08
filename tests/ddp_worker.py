"""Run under torchrun by test_distributed.py: pretrain a few steps, then dump this rank's state."""

from __future__ import annotations

import sys

import torch

from simla.train.pretrain import run_pretraining
from simla.train.recipe import load_recipe


def main() -> None:
    out_file, overrides = sys.argv[1], sys.argv[2:]
    rank = int(__import__("os").environ["RANK"])
    result = run_pretraining(load_recipe(None, overrides), record_history=True)
    model = result.model
    torch.save({
        "momentum": {k: v for k, v in model.state_dict().items() if k.split(".")[0].endswith("_m")},
        "online": {k: v for k, v in model.state_dict().items() if k.startswith(("visual_encoder.", "text_proj."))},
        "image_queue": model.image_queue, "text_queue": model.text_queue, "queue_ptr": model.queue_ptr,
        "history": result.data.history,
    }, f"{out_file}.rank{rank}.pt")


if __name__ == "__main__":
    main()
