"""The training engine's numerics: accumulation, gradient checkpointing and bf16 each do what they claim."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from torch import nn

import simla
from simla.train.engine import Engine, EngineConfig

from conftest import make_batch


class ListData:
    """A ResumableData over a fixed list of micro-batches (one epoch)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.items = batches
        self.steps_per_epoch = len(batches)
        self.next = 0

    def batches(self, epoch: int) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        for index in range(self.next, len(self.items)):
            yield self.items[index], {"batch": index, "size": len(next(iter(self.items[index].values())))}

    def consumed(self, epoch: int, meta: Mapping[str, Any]) -> None:
        self.next = int(meta["batch"]) + 1

    def position(self) -> dict[str, Any]:
        return {"kind": "list", "next": self.next}

    def load_position(self, position: Mapping[str, Any]) -> None:
        self.next = int(position["next"])


class Regression(nn.Module):
    """A deterministic model whose losses are means over the batch (as every SIMLA loss is)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(5, 3)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        error = self.linear(batch["x"]) - batch["y"]
        return {"mse": (error ** 2).mean(), "l1": error.abs().mean()}


def run_engine(model: nn.Module, batches: list[dict[str, torch.Tensor]], tmp_path, *, accum: int = 1,
               precision: str = "fp32", kwargs: dict | None = None, optimizer=None) -> list[dict[str, Any]]:
    """One optimizer step over `batches` (accum micro-batches); returns the log records."""
    import json

    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    config = EngineConfig(output_dir=tmp_path, total_steps=len(batches) // accum, grad_accum_steps=accum,
                          precision=precision, log_every=1, save_every=10**9, progress=False)
    engine = Engine(model, optimizer, ListData(batches), config, lr_at=lambda step: optimizer.defaults["lr"],
                    forward_kwargs_at=lambda step: dict(kwargs or {}), save=lambda path, extra: None,
                    device=torch.device("cpu"))
    engine.fit()
    return [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]


def test_two_half_batches_accumulate_to_the_gradient_of_one_full_batch(tmp_path):
    g = torch.Generator().manual_seed(1)
    full = {"x": torch.randn(8, 5, generator=g), "y": torch.randn(8, 3, generator=g)}
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    # The two halves really differ, so using only one of them (or summing without averaging) shows.
    one, two = Regression(), Regression()
    log_one = run_engine(one, [full], tmp_path / "one")
    log_two = run_engine(two, halves, tmp_path / "two", accum=2)
    # SGD with lr 1: the update is exactly the gradient.
    assert torch.allclose(one.linear.weight, two.linear.weight, atol=1e-6)
    assert torch.allclose(one.linear.bias, two.linear.bias, atol=1e-6)
    assert not torch.allclose(Regression().linear.weight, one.linear.weight)  # a step was taken
    for key in ("loss_mse", "loss_l1", "grad_norm"):
        assert log_two[0][key] == pytest.approx(log_one[0][key], rel=1e-6), key
    assert log_two[0]["samples_seen"] == log_one[0]["samples_seen"] == 8


# --------------------------------------------------------------------------- the SIMLA model
@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", queue_size=16)


def gradients(model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 1) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of the summed losses after one forward/backward, and how many tensors autograd saved."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += 1
        return tensor

    model.train()
    torch.manual_seed(seed)  # dropout, MLM masking and hard negatives draw from the global generator
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(batch, alpha=0.4)
    sum(out[name] for name in out).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, saved


def test_gradient_checkpointing_gives_the_gradients_of_the_plain_path(tiny):
    batch = make_batch(tiny, batch_size=4)
    plain, checkpointed = copy.deepcopy(tiny), copy.deepcopy(tiny)
    checkpointed.visual_encoder.set_grad_checkpointing(True)
    checkpointed.text_encoder.set_grad_checkpointing(True)
    expected, saved_plain = gradients(plain, batch)
    actual, saved_checkpointed = gradients(checkpointed, batch)
    # Dropout stays on: recomputation must replay the same dropout masks for the gradients to agree.
    assert expected.keys() == actual.keys() and len(expected) > 50
    for name in expected:
        assert torch.allclose(actual[name], expected[name], rtol=1e-4, atol=1e-6), name
    # ... and the layers really were recomputed rather than stored.
    assert saved_checkpointed < 0.6 * saved_plain, (saved_checkpointed, saved_plain)


def linear_output_dtypes(model: nn.Module) -> tuple[list[torch.dtype], list]:
    seen: list[torch.dtype] = []
    encoders = [m for part in (model.visual_encoder, model.text_encoder) for m in part.modules()
                if isinstance(m, nn.Linear)]
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(out.dtype)) for m in encoders]
    return seen, handles


# bf16 keeps 8 bits of mantissa: each loss of the tiny model stays within 1% (+0.01) of its fp32 value
# (measured: at most 0.12%, on ITC).
BF16_REL, BF16_ABS = 1e-2, 1e-2


def test_bf16_runs_the_encoder_matmuls_in_bf16_within_a_stated_tolerance_of_fp32(tiny, tmp_path):
    batch = make_batch(tiny, batch_size=4)
    logs, dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        model = copy.deepcopy(tiny)
        seen, handles = linear_output_dtypes(model)
        torch.manual_seed(3)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        logs[precision] = run_engine(model, [batch], tmp_path / precision, precision=precision,
                                     kwargs={"alpha": 0.4}, optimizer=optimizer)[0]
        for handle in handles:
            handle.remove()
        dtypes[precision] = set(seen)
        assert len(seen) > 20
    assert dtypes == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    losses = [k for k in logs["fp32"] if k.startswith("loss_")]
    assert len(losses) >= 5
    differs = False
    for key in losses:
        assert logs["bf16"][key] == pytest.approx(logs["fp32"][key], rel=BF16_REL, abs=BF16_ABS), key
        differs |= logs["bf16"][key] != logs["fp32"][key]
    assert differs, "bf16 gave bit-identical losses: autocast did not take effect"


# ------------------------------------------------------------- teachers, fp32 similarities, finiteness
def test_teachers_move_once_per_optimizer_step_and_queues_keep_every_micro_batch(tmp_path, monkeypatch):
    import simla.models.pretrain as pretrain_module

    updates = []
    original = pretrain_module.momentum_update
    monkeypatch.setattr(pretrain_module, "momentum_update", lambda pairs, m: (updates.append(m), original(pairs, m)))
    model = simla.create_model("simla_tiny", queue_size=64)
    batches = [make_batch(model, batch_size=4, seed=seed) for seed in range(4)]
    run_engine(model, batches, tmp_path, accum=2, kwargs={"alpha": 0.4},
               optimizer=torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    assert len(updates) == 2  # two optimizer steps of two micro-batches each: not 0.995**2 per step
    assert int(model.queue_ptr) == 16  # all four micro-batches of four pairs were enqueued


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_momentum_dropout_false_puts_every_models_teachers_in_eval(task):
    model = simla.create_model("simla_tiny", queue_size=16, task=task, momentum_dropout=False).train()
    pairs = model.momentum_pairs()
    assert pairs and all(online.training and not teacher.training for online, teacher in pairs)
    default = simla.create_model("simla_tiny", queue_size=16, task=task).train()
    assert all(teacher.training for _, teacher in default.momentum_pairs())  # the reference keeps dropout on


def test_itc_similarities_are_fp32_under_bf16_autocast():
    from simla.objectives import itc_loss

    g = torch.Generator().manual_seed(0)
    feats = [torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(4)]
    queues = [torch.nn.functional.normalize(torch.randn(8, 16, generator=g), dim=0) for _ in range(2)]
    temp = torch.tensor(0.07, requires_grad=True)
    exact = itc_loss(*feats, *queues, temp, alpha=0.4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = itc_loss(*feats, *queues, temp, alpha=0.4)
        low = itc_loss(*[f.bfloat16() for f in feats], *queues, temp, alpha=0.4)
    assert mixed.sim_i2t.dtype == torch.float32 and low.sim_i2t.dtype == torch.float32
    torch.testing.assert_close(mixed.sim_i2t, exact.sim_i2t)  # no bf16 rounding of the logits
    low.loss.backward()
    assert temp.grad is not None and temp.grad.dtype == torch.float32


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    model = Regression()
    saved = []
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    config = EngineConfig(output_dir=tmp_path, total_steps=1, log_every=10, save_every=1, progress=False)
    batch = {"x": torch.randn(4, 5), "y": torch.randn(4, 3)}  # a finite loss, then an infinite learning rate
    engine = Engine(model, optimizer, ListData([batch]), config, lr_at=lambda step: float("inf"),
                    save=lambda path, extra: saved.append(path), device=torch.device("cpu"))
    with pytest.raises(FloatingPointError, match="non-finite weights at step 1"):
        engine.fit()
    assert saved == []
