"""The pretraining module: losses, momentum teachers, queues, gradients, and a one-batch overfit."""

from __future__ import annotations

import math

import pytest
import torch

import simla
from simla.models.momentum import write_to_queue
from simla.models.pretrain import LOSS_NAMES

from conftest import make_batch


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", queue_size=20)


def test_forward_returns_five_finite_losses(tiny):
    out = tiny(make_batch(tiny))
    assert set(out) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        assert out[name].dim() == 0 and torch.isfinite(out[name]), name
    assert out.targets["psl_keywords"].shape == (8, tiny.config.objectives.psl_num_keywords)
    assert out.targets["mlm_labels"].shape == out.targets["masked_ids"].shape
    assert torch.isfinite(out.total)


def test_missing_batch_key_is_named(tiny):
    batch = make_batch(tiny)
    del batch["visual_tokens"]
    with pytest.raises(KeyError, match="visual_tokens"):
        tiny(batch)


def test_no_gradient_reaches_momentum_and_every_online_parameter_gets_one(tiny):
    out = tiny(make_batch(tiny))
    out.total.backward()
    momentum_names = [n for n, _ in tiny.named_parameters() if n.split(".")[0].endswith("_m")]
    assert momentum_names
    without_grad = []
    for name, param in tiny.named_parameters():
        if name.split(".")[0].endswith("_m"):
            assert not param.requires_grad and param.grad is None, name
        elif param.grad is None:
            without_grad.append(name)
    assert without_grad == []


def test_momentum_update_is_an_ema_and_runs_only_in_training(tiny):
    online = tiny.vision_proj.weight
    teacher = tiny.vision_proj_m.weight
    with torch.no_grad():
        online.add_(1.0)
    before = teacher.detach().clone()
    tiny.eval()
    tiny(make_batch(tiny))
    assert torch.equal(teacher, before)  # evaluation leaves the teachers alone
    tiny.train()
    tiny(make_batch(tiny))
    m = tiny.config.objectives.momentum
    assert torch.allclose(teacher, m * before + (1 - m) * online.detach(), atol=1e-6)


def test_queue_receives_momentum_features_with_wrap_around(tiny):
    # queue 20, batch 8: writes at 0..7, 8..15, then 16..19 + 0..3 (8 does not divide 20).
    ptrs = []
    for step in range(3):
        tiny(make_batch(tiny, seed=step))
        ptrs.append(int(tiny.queue_ptr))
    assert ptrs == [8, 16, 4]
    assert torch.allclose(tiny.image_queue.norm(dim=0), torch.ones(20), atol=1e-5)


def test_write_to_queue_wraps_and_keeps_newest():
    queue = torch.zeros(2, 5)
    ptr = torch.zeros(1, dtype=torch.long)
    write_to_queue(queue, torch.tensor([[1.0, 1], [2, 2], [3, 3]]), ptr)
    write_to_queue(queue, torch.tensor([[4.0, 4], [5, 5], [6, 6]]), ptr)
    assert queue[0].tolist() == [6, 2, 3, 4, 5] and int(ptr) == 1
    write_to_queue(queue, torch.arange(14.0).view(7, 2), ptr)  # more rows than columns: newest 5 kept
    assert sorted(queue[0].tolist()) == [4, 6, 8, 10, 12]
    assert int(ptr) == (1 + 7) % 5


def test_mim_loss_uses_only_masked_patches(tiny):
    batch = make_batch(tiny)
    tiny.eval()
    torch.manual_seed(1)
    a = tiny(batch, alpha=0.0)["mim"]
    changed = dict(batch)
    tokens = batch["visual_tokens"].clone()
    tokens[~batch["patch_mask"]] = (tokens[~batch["patch_mask"]] + 1) % tiny.config.objectives.visual_vocab_size
    changed["visual_tokens"] = tokens
    torch.manual_seed(1)
    b = tiny(changed, alpha=0.0)["mim"]
    assert torch.allclose(a, b)
    tokens = batch["visual_tokens"].clone()
    tokens[batch["patch_mask"]] = (tokens[batch["patch_mask"]] + 1) % tiny.config.objectives.visual_vocab_size
    changed["visual_tokens"] = tokens
    torch.manual_seed(1)
    assert not torch.allclose(a, tiny(changed, alpha=0.0)["mim"])


def test_reference_psl_selection_runs(tiny):
    model = simla.create_model("simla_tiny", queue_size=20, psl_selection="reference")
    out = model(make_batch(model))
    assert torch.isfinite(out["psl"])


def test_widths_may_differ_between_image_and_text():
    model = simla.create_model("simla_tiny", queue_size=16, **{"text.hidden_size": 64, "text.num_heads": 2})
    assert model.mim_adapter is not None
    out = model(make_batch(model))
    out.total.backward()
    assert model.mim_adapter.image_in.weight.grad is not None


def test_batch_of_one_is_refused(tiny):
    batch = {k: v[:1] for k, v in make_batch(tiny).items()}
    with pytest.raises(ValueError, match="at least 2"):
        tiny(batch)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    # A queue of one batch: repeated batches fill the queue with copies of the positives, so a longer
    # queue would cap how far ITC can fall on a single batch.
    model = simla.create_model("simla_tiny", queue_size=8, alpha=0.0)
    batch = make_batch(model, batch_size=8)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = {name: [] for name in LOSS_NAMES}
    for _ in range(70):
        out = model(batch)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
        for name in LOSS_NAMES:
            history[name].append(out[name].item())
    for name, values in history.items():
        first, last = sum(values[:5]) / 5, sum(values[-5:]) / 5
        assert math.isfinite(last) and last < 0.75 * first, f"{name}: {first:.4f} -> {last:.4f}"
