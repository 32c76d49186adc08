"""`freeze_vision_encoder=true` in a fine-tuning recipe: the ViT keeps its loaded weights bit for bit, is left
out of the optimizer, and everything else still trains (tiny VQA fine-tuning runs, CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

import simla
from simla.cli import main

from test_vqa_runs import finetune_args, vqa_data  # noqa: F401 - the fixture: images, questions, a checkpoint

VIT = "visual_encoder."


def _run(root: Path, out: Path, *extra: str) -> dict:
    assert main(finetune_args(root, out, *extra)) == 0
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)


def _optimizer_state(checkpoint: dict) -> dict:
    found = [v["optimizer"] for v in checkpoint.values() if isinstance(v, dict) and "optimizer" in v]
    found += [checkpoint["optimizer"]] if "optimizer" in checkpoint else []
    assert len(found) == 1, sorted(checkpoint)
    return found[0]


def test_freeze_vision_encoder_keeps_the_vit_fixed_and_out_of_the_optimizer(vqa_data, tmp_path):  # noqa: F811
    frozen = _run(vqa_data, tmp_path / "frozen", "freeze_vision_encoder=true")
    trained = _run(vqa_data, tmp_path / "trained")  # the same run without the switch: the control
    assert frozen["recipe"]["freeze_vision_encoder"] is True and trained["recipe"]["freeze_vision_encoder"] is False
    # The weights both runs start from: the pretraining checkpoint as the VQA model at the recipe's 32 px.
    model = simla.load_checkpoint(vqa_data / "pretrain.pt", task="vqa", image_size=32)
    start = model.state_dict()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    vit = {n for n in params if n.startswith(VIT)}
    assert vit and len(vit) < len(params)
    teacher = [n for n in start if n.startswith("visual_encoder_m.")]  # the ViT's momentum copy, if the task has one

    def unchanged(checkpoint: dict) -> set[str]:
        return {n for n in params if torch.equal(checkpoint["model"][n], start[n])}

    # Frozen: every ViT tensor (and its teacher's) bit-identical to the loaded weights, every other one trained.
    assert unchanged(frozen) == vit
    assert all(torch.equal(frozen["model"][n], start[n]) for n in teacher)
    # Control: without the switch the same 4 steps change every trainable tensor, the ViT's included.
    assert unchanged(trained) == set()

    def optimised(checkpoint: dict) -> tuple[int, int]:
        """(parameter tensors, AdamW moment elements) that the checkpoint's optimizer state holds."""
        state = _optimizer_state(checkpoint)
        return (sum(len(group["params"]) for group in state["param_groups"]),
                sum(s["exp_avg"].numel() for s in state["state"].values()))

    numel = {n: p.numel() for n, p in params.items()}
    assert optimised(trained) == (len(params), sum(numel.values()))
    assert optimised(frozen) == (len(params) - len(vit), sum(numel[n] for n in params if n not in vit))
