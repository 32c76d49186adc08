"""Step-indexed learning-rate and alpha schedules."""

from __future__ import annotations

import math

import pytest
import torch

from simla.train.schedule import LRSchedule, alpha_at, set_lr

LR, WARM, MIN = 1e-4, 1e-5, 1e-5


def cosine_at(fraction: float, lr: float = LR, min_lr: float = MIN) -> float:
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * fraction))


# ----------------------------------------------------------------------------------------- cosine
def test_cosine_hand_checked_values():
    s = LRSchedule(lr=1.0, warmup_lr=0.0, min_lr=0.0, warmup_steps=10, total_steps=110, steps_per_epoch=11)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5)
    assert s(10) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.5)  # half-way through the decay
    assert s(35) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert s(110) == 0.0
    assert s(10_000) == 0.0


def test_cosine_warmup_is_monotone_and_decay_ends_at_min():
    s = LRSchedule(total_steps=5000, steps_per_epoch=500)  # defaults: 1e-4, 1e-5, 1e-5, warmup 2000
    assert s.kind == "cosine"
    values = [s(i) for i in range(5001)]
    assert values[0] == WARM
    warmup = values[:2001]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))
    assert values[2000] == pytest.approx(LR)
    decay = values[2000:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert values[5000] == pytest.approx(MIN)
    assert min(values) == pytest.approx(MIN)
    assert values[4999] == pytest.approx(MIN, rel=1e-5)


def test_cosine_without_warmup_starts_at_peak():
    s = LRSchedule(warmup_steps=0, total_steps=100, steps_per_epoch=10)
    assert s(0) == pytest.approx(LR)
    assert s(50) == pytest.approx(cosine_at(0.5))


# -------------------------------------------------------------------------------------- reference
@pytest.fixture()
def reference() -> LRSchedule:
    # warmup 3 (x100 iterations), 1000 iterations per epoch, 5 epochs.
    return LRSchedule(warmup_steps=300, total_steps=5000, steps_per_epoch=1000, kind="reference")


def test_reference_warmup_staircase_lags_one_iteration(reference):
    d = (LR - WARM) / 3
    expected = {0: WARM, 1: WARM, 99: WARM, 100: WARM, 101: WARM + d, 200: WARM + d, 201: WARM + 2 * d,
                300: WARM + 2 * d, 301: LR, 500: LR, 999: LR}
    for step, value in expected.items():
        assert reference(step) == pytest.approx(value, rel=1e-12), step
    assert reference(301) == LR  # exactly the peak, not a rounding of it
    epoch0 = [reference(i) for i in range(1000)]
    assert all(a <= b for a, b in zip(epoch0, epoch0[1:]))
    assert len(set(epoch0)) == 4  # three warm-up levels and the peak


def test_reference_epochs_are_constant_cosine_levels(reference):
    for epoch in range(1, 5):
        value = cosine_at(epoch / 5)
        for i in (0, 1, 500, 999):
            assert reference(epoch * 1000 + i) == pytest.approx(value, rel=1e-12)
    assert reference(1000) == pytest.approx(MIN + 0.5 * (LR - MIN) * (1 + math.cos(math.pi / 5)))
    assert reference(5000) == MIN  # past the cycle, timm (cycle_limit 1) returns min_lr
    assert reference(12_345) == MIN


def test_reference_pretrain_config_twenty_equal_steps():
    # configs/Pretrain.yaml: warmup 20 -> 2000 iterations in 20 equal steps of 4.5e-6.
    s = LRSchedule(warmup_steps=2000, total_steps=30 * 5000, steps_per_epoch=5000, kind="reference")
    levels = sorted({s(i) for i in range(2001)})
    assert len(levels) == 20
    assert all(b - a == pytest.approx(4.5e-6) for a, b in zip(levels, levels[1:]))
    assert s(2000) == pytest.approx(LR - 4.5e-6) and s(2001) == LR
    assert s(5000) == pytest.approx(cosine_at(1 / 30))


def test_reference_warmup_cut_short_by_a_short_epoch():
    # epoch 0 (250 iterations) ends before the 300-iteration warm-up; epoch 1 jumps to cosine(1/E).
    s = LRSchedule(warmup_steps=300, total_steps=1000, steps_per_epoch=250, kind="reference")
    d = (LR - WARM) / 3
    assert s(249) == pytest.approx(WARM + 2 * d)
    assert s(250) == pytest.approx(cosine_at(1 / 4))


def test_reference_without_warmup_runs_epoch_zero_at_peak():
    s = LRSchedule(warmup_steps=0, total_steps=300, steps_per_epoch=100, kind="reference")
    assert s(0) == LR and s(99) == LR
    assert s(100) == pytest.approx(cosine_at(1 / 3))


# ------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -1.0}, "lr"),
        ({"warmup_lr": float("nan")}, "warmup_lr"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"total_steps": 0}, "total_steps"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"kind": "linear"}, "kind"),
        ({"warmup_steps": 20_000}, "warmup_steps"),
        ({"warmup_steps": 250, "kind": "reference"}, "warmup_steps"),
        ({"reference_step_size": 0}, "reference_step_size"),
    ],
)
def test_invalid_fields_are_named(kwargs, field):
    base = {"total_steps": 10_000, "steps_per_epoch": 1000}
    with pytest.raises(ValueError, match=f"LRSchedule.{field}"):
        LRSchedule(**{**base, **kwargs})


def test_invalid_step_is_rejected():
    s = LRSchedule(total_steps=100, steps_per_epoch=10, warmup_steps=10)
    with pytest.raises(ValueError, match="step"):
        s(-1)
    with pytest.raises(ValueError, match="step"):
        s(1.5)


# ------------------------------------------------------------------------------------------ alpha
def test_alpha_ramps_over_epoch_zero():
    assert alpha_at(0, 100, 0.4) == 0.0
    assert alpha_at(25, 100, 0.4) == pytest.approx(0.1)
    assert alpha_at(99, 100, 0.4) == pytest.approx(0.396)
    assert alpha_at(100, 100, 0.4) == 0.4
    assert alpha_at(12_345, 100, 0.4) == 0.4
    assert alpha_at(0, 100, 0.4, warm_up=False) == 0.4
    ramp = [alpha_at(i, 100, 0.4) for i in range(101)]
    assert all(a < b for a, b in zip(ramp, ramp[1:]))
    with pytest.raises(ValueError, match="steps_per_epoch"):
        alpha_at(0, 0, 0.4)


# ----------------------------------------------------------------------------------------- set_lr
def test_set_lr_updates_every_group_and_honours_lr_scale():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 10.0}], lr=1.0)
    set_lr(opt, 1e-4)
    assert opt.param_groups[0]["lr"] == 1e-4
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3)
