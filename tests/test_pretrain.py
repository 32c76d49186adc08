"""The pretraining module: losses, momentum teachers, queues, gradients, and a one-batch overfit."""

from __future__ import annotations

import math

import pytest
import torch

import simla
from simla.models.momentum import write_to_queue
from simla.models.pretrain import LOSS_NAMES, SimlaForPretraining
from simla.models.pretrain_reference import ReferencePretraining

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
        if name.split(".")[0].endswith("_m") or not param.requires_grad:  # teachers; the token-type constant
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


# ------------------------------------------------------------------------------ objective switches
def _count_calls(model) -> dict[str, int]:
    """Forward calls of the encoders and heads, counted with hooks."""
    counts: dict[str, int] = {}
    names = ["visual_encoder", "visual_encoder_m", "text_encoder", "text_encoder_m", "mlm_head", "mlm_head_m",
             "mim_head", "mim_head_m", "concept_head", "concept_head_m", "itm_head"]
    for name in names:
        module = getattr(model, name, None)
        if module is not None and name.startswith("text_encoder"):
            module = module.encoder.layer[0]  # every pass of the shared encoder runs its first layer
        if module is not None:
            counts[name] = 0
            module.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
    return counts


def _pretraining(execution: str, **overrides) -> SimlaForPretraining:
    """A tiny pretraining model in simla's execution or (ReferencePretraining) the authors'."""
    model_class = ReferencePretraining if execution == "reference" else SimlaForPretraining
    return model_class(simla.get_config("simla_tiny", **overrides))


# Encoder passes per step. simla's execution runs the ITM and MLM student passes as one, and the teacher's MLM
# and PSL passes as one; the reference plan runs each separately.
@pytest.mark.parametrize("losses, passes, reference_passes", [
    (["itc", "itm", "mlm", "mim", "psl"],
     {"visual_encoder": 2, "visual_encoder_m": 2, "text_encoder": 3, "text_encoder_m": 3},
     {"visual_encoder": 2, "visual_encoder_m": 2, "text_encoder": 4, "text_encoder_m": 4}),
    (["itc", "itm"], {"visual_encoder": 1, "visual_encoder_m": 1, "text_encoder": 2, "text_encoder_m": 1}, None),
    (["itc", "itm", "mlm"], {"visual_encoder": 1, "visual_encoder_m": 1, "text_encoder": 2, "text_encoder_m": 2},
     {"visual_encoder": 1, "visual_encoder_m": 1, "text_encoder": 3, "text_encoder_m": 2}),
    (["itc", "itm", "mlm", "mim"],
     {"visual_encoder": 2, "visual_encoder_m": 2, "text_encoder": 3, "text_encoder_m": 3},
     {"visual_encoder": 2, "visual_encoder_m": 2, "text_encoder": 4, "text_encoder_m": 3}),
    (["mim"], {"visual_encoder": 1, "visual_encoder_m": 1, "text_encoder": 1, "text_encoder_m": 1}, None),
])
@pytest.mark.parametrize("plan", ["simla", "reference"])
def test_a_left_out_objective_costs_nothing(losses, passes, reference_passes, plan):
    if plan == "reference":
        passes = reference_passes or passes
    torch.manual_seed(0)
    model = _pretraining(plan, queue_size=16, losses=losses)
    heads = {"mlm": "mlm_head", "mim": "mim_head", "psl": "concept_head"}
    for objective, head in heads.items():
        # A left-out objective has no head and no teacher head, and the mask token exists only for MIM.
        assert hasattr(model, head) == (objective in losses), head
        assert hasattr(model, head + "_m") == (objective in losses), head
    assert (getattr(model.visual_encoder, "mask_token", None) is not None) == ("mim" in losses)
    counts = _count_calls(model)
    batch = make_batch(model)
    if "mim" not in losses:
        del batch["patch_mask"], batch["visual_tokens"]  # not needed at all
    queue_before = model.image_queue.clone()
    out = model(batch)
    assert set(out) == set(losses)
    assert {k: v for k, v in counts.items() if k in passes} == passes
    assert counts.get("itm_head", 0) == ("itm" in losses)
    assert torch.equal(model.image_queue, queue_before) != ("itc" in losses)  # only ITC writes the queue
    out.total.backward()
    trained = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    assert trained and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.has_unused_parameters == ("itc" not in losses or "itm" not in losses)


def test_ablation_model_loads_a_full_pretraining_checkpoint(tmp_path):
    full = simla.create_model("simla_tiny", queue_size=16)
    path = simla.save_checkpoint(full, tmp_path / "full.pt")
    ablation = simla.create_model("simla_tiny", queue_size=16, losses=["itc", "itm"])
    report = simla.checkpoint.load_weights_into(ablation, path)
    assert report.ok and any(k.startswith("mim_head") for k in report.ignored)
    assert torch.equal(ablation.text_proj.weight, full.text_proj.weight)
    assert simla.load_checkpoint(path, losses=["itc", "itm", "mlm"]).losses == ("itc", "itm", "mlm")


def test_losses_field_is_validated():
    for bad in (["itc", "xyz"], [], ["itc", "itc"]):
        with pytest.raises(ValueError, match="losses"):
            simla.get_config("simla_tiny", losses=bad)


def test_identical_captions_are_never_itm_negatives_when_positives():
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=16, duplicate_captions="positives")
    batch = make_batch(model, batch_size=8)
    # Four captions, each twice: the twin of a pair is never its ITM negative.
    batch["text_ids"][4:], batch["text_mask"][4:] = batch["text_ids"][:4], batch["text_mask"][:4]
    twin = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    for seed in range(5):
        torch.manual_seed(seed)
        targets = model(batch).targets
        assert not (targets["itm_negative_images"] == twin).any()
        assert not (targets["itm_negative_texts"] == twin).any()
    # The reference rule draws twins as negatives (the hardest ones, once ITC has learned).
    model.config.objectives.duplicate_captions = "negatives"
    drawn = set()
    for seed in range(20):
        torch.manual_seed(seed)
        drawn |= set((model(batch).targets["itm_negative_texts"] == twin).nonzero().flatten().tolist())
    assert drawn


def test_all_identical_captions_still_give_an_itm_negative():
    model = simla.create_model("simla_tiny", queue_size=16, duplicate_captions="positives")
    batch = make_batch(model, batch_size=4)
    batch["text_ids"][:], batch["text_mask"][:] = batch["text_ids"][0], batch["text_mask"][0]
    assert torch.isfinite(model(batch)["itm"])


# ------------------------------------------------------------------------------ token types
def test_token_type_table_is_a_constant_that_training_never_changes(tmp_path):
    from simla.checkpoint import load_state_into

    model = simla.create_model("simla_tiny", queue_size=16)
    table = model.text_encoder.embeddings.token_type_embeddings.weight
    assert not table.requires_grad and torch.count_nonzero(table) == 0
    assert "text_encoder.embeddings.token_type_embeddings.weight" not in [
        n for n, p in model.named_parameters() if p.requires_grad]
    # A model that has imported a (reference-style) state keeps a zero table after optimizer steps.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_state_into(model, state, source="copy")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(2):
        model(make_batch(model, seed=seed)).total.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.count_nonzero(model.text_encoder.embeddings.token_type_embeddings.weight) == 0


def test_queued_copies_of_a_caption_are_itc_positives(monkeypatch):
    import simla.objectives as objectives_module

    model = simla.create_model("simla_tiny", queue_size=16, duplicate_captions="positives")
    fingerprint = model.caption_fingerprint
    # The fingerprint ignores padding, so one caption padded to two batch lengths agrees.
    assert torch.equal(fingerprint(torch.tensor([[101, 7, 9, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])),
                       fingerprint(torch.tensor([[101, 7, 9]]), torch.tensor([[1, 1, 1]])))
    seen = []
    original = objectives_module.itc_loss
    monkeypatch.setattr(objectives_module, "itc_loss",
                        lambda *a, **k: (seen.append(k["positive_mask"]), original(*a, **k))[1])
    batch = make_batch(model, batch_size=4)
    model(batch)  # fills queue columns 0-3 with this batch's captions
    model(batch)
    first, second = seen
    assert not first[:, 4:].any()  # an empty queue holds no positives
    assert torch.equal(second[:, 4:8], torch.eye(4, dtype=torch.bool))  # each caption's queued copy
    assert not second[:, 8:].any()


def _step(model, batch, alpha):
    torch.manual_seed(1)  # the same ITM and MLM draws for every model
    out = model(batch, alpha=alpha)
    out.total.backward()
    return {k: v.detach() for k, v in out.items()}, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("alpha", [0.4, 0.0])
def test_shared_and_reference_executions_compute_the_same_step(alpha):
    # Without dropout the two layouts draw the same negatives and masks, so losses and gradients must agree.
    torch.manual_seed(0)
    shared = _pretraining("simla", queue_size=16, hidden_dropout=0.0, attention_dropout=0.0)
    reference = _pretraining("reference", queue_size=16, hidden_dropout=0.0, attention_dropout=0.0)
    reference.load_state_dict(shared.state_dict())
    shared.train(), reference.train()
    batch = make_batch(shared)
    losses, grads = _step(shared, batch, alpha)
    ref_losses, ref_grads = _step(reference, batch, alpha)
    assert set(losses) == set(LOSS_NAMES)
    for name in LOSS_NAMES:
        torch.testing.assert_close(losses[name], ref_losses[name], atol=1e-6, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_a_reference_execution_config_builds_the_reference_class(tmp_path):
    # The authors' execution is its own class; a config asking for it (e.g. model_config.execution=reference,
    # or a checkpoint saved from it) builds that class, with torch's dropout sampler.
    model = simla.create_model("simla_tiny", queue_size=8, execution="reference")
    assert type(model) is ReferencePretraining and model.config.objectives.execution == "reference"
    assert type(simla.load_checkpoint(simla.save_checkpoint(model, tmp_path / "ref.pt"))) is ReferencePretraining
    direct = ReferencePretraining(simla.get_config("simla_tiny", queue_size=8))
    assert direct.config.objectives.execution == "reference"
    assert not direct.text_encoder.layers[0].attention.self.uniform_dropout
    assert type(simla.create_model("simla_tiny", queue_size=8)) is SimlaForPretraining


def test_alpha_zero_skips_the_teacher_work_that_only_feeds_distillation():
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=16)
    counts = _count_calls(model)
    batch = make_batch(model)
    model(batch, alpha=0.0)
    # No masked momentum ViT, no teacher MIM or MLM pass, no teacher concept head; the teacher still votes
    # PSL keywords (text + vote passes) and embeds for ITC.
    assert {k: counts[k] for k in ("visual_encoder_m", "text_encoder_m", "concept_head_m")} == \
        {"visual_encoder_m": 1, "text_encoder_m": 2, "concept_head_m": 0}
    for name in counts:
        counts[name] = 0
    model(batch, alpha=0.4)
    assert {k: counts[k] for k in ("visual_encoder_m", "text_encoder_m", "concept_head_m")} == \
        {"visual_encoder_m": 2, "text_encoder_m": 3, "concept_head_m": 1}
