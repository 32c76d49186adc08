"""Optimiser parameter groups (no weight decay on biases, norms, position embeddings, special tokens and the
temperature, unlike the reference) and gradient norms computed without a host sync per tensor."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import simla
from simla.train.optim import build_optimizer, clip_gradients, describe_param_groups, grad_norm, param_groups

from conftest import make_batch


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", queue_size=16)


def _expected_no_decay(name: str, param: nn.Parameter) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return (
        param.ndim <= 1
        or leaf == "bias"
        or "LayerNorm." in name
        or ".norm" in name  # timm ViT: blocks.i.norm1/norm2 and the final norm
        or leaf in {"pos_embed", "cls_token", "mask_token", "temp"}
        or ".position_embeddings." in name
        or ".token_type_embeddings." in name
    )


def test_groups_cover_trainable_parameters_exactly_once(tiny):
    groups = param_groups(tiny, 0.02)
    assert [g["weight_decay"] for g in groups] == [0.02, 0.0]
    assert all(set(g) == {"params", "weight_decay"} for g in groups)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    trainable = {id(p) for p in tiny.parameters() if p.requires_grad}
    assert set(grouped) == trainable
    frozen = {id(p) for p in tiny.parameters() if not p.requires_grad}
    assert frozen, "the pretraining model should have frozen momentum copies"
    assert not frozen & set(grouped)


def test_momentum_parameters_are_excluded_by_name(tiny):
    names = describe_param_groups(tiny, 0.02)
    for name in names["decay"] + names["no_decay"]:
        assert not name.split(".")[0].endswith("_m"), name


def test_no_decay_group_holds_exactly_the_expected_kinds(tiny):
    names = describe_param_groups(tiny, 0.02)
    params = dict(tiny.named_parameters())
    expected = {n for n in names["decay"] + names["no_decay"] if _expected_no_decay(n, params[n])}
    assert set(names["no_decay"]) == expected
    no_decay = set(names["no_decay"])
    for name in [
        "temp",
        "visual_encoder.pos_embed",
        "visual_encoder.cls_token",
        "visual_encoder.mask_token",
        "visual_encoder.norm.weight",
        "visual_encoder.blocks.0.norm1.weight",
        "visual_encoder.blocks.0.attn.qkv.bias",
        "text_encoder.embeddings.position_embeddings.weight",
        "text_encoder.embeddings.LayerNorm.weight",
        "text_encoder.encoder.layer.0.output.LayerNorm.weight",
        "mlm_head.bias",
        "mlm_head.transform.LayerNorm.weight",
    ]:
        assert name in no_decay, name
    # The token-type table is a constant (the paper model has none): in no optimizer group at all.
    all_grouped = set(names["no_decay"]) | set(names["decay"])
    assert "text_encoder.embeddings.token_type_embeddings.weight" not in all_grouped


def test_decay_group_holds_matrices_and_word_embeddings(tiny):
    decay = set(describe_param_groups(tiny, 0.02)["decay"])
    for name in [
        "visual_encoder.patch_embed.proj.weight",
        "visual_encoder.blocks.0.attn.qkv.weight",
        "visual_encoder.blocks.1.mlp.fc1.weight",
        "text_encoder.embeddings.word_embeddings.weight",
        "text_encoder.encoder.layer.0.attention.self.query.weight",
        "text_encoder.encoder.layer.1.crossattention.self.value.weight",
        "text_encoder.encoder.layer.0.intermediate.dense.weight",
        "vision_proj.weight",
        "text_proj.weight",
        "itm_head.weight",
        "mim_head.weight",
        "concept_head.weight",
        "mlm_head.transform.dense.weight",
    ]:
        assert name in decay, name
    params = dict(tiny.named_parameters())
    assert all(params[n].ndim >= 2 for n in decay)


def test_norm_detected_by_module_type_whatever_its_name():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 4))
    model.add_module("squash", nn.LayerNorm(4))
    model.add_module("g", nn.GroupNorm(2, 4))
    names = describe_param_groups(model, 0.1)
    assert names["decay"] == ["proj.weight"]
    assert set(names["no_decay"]) == {"proj.bias", "squash.weight", "squash.bias", "g.weight", "g.bias"}


def test_negative_weight_decay_is_rejected(tiny):
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(tiny, -0.1)


def test_build_optimizer_is_adamw_with_the_groups(tiny):
    opt = build_optimizer(tiny, lr=1e-4, weight_decay=0.02)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]
    assert all(g["lr"] == 1e-4 and g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)
    assert opt.defaults.get("fused")  # torch's fused kernel runs on CPU parameters too


@pytest.mark.parametrize("implementation", ["fused", "foreach", "loop"])
def test_every_adamw_implementation_takes_the_same_step(implementation):
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=16)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters() if p.requires_grad}
    results = {}
    for name in ("loop", implementation):
        clone = copy.deepcopy(model)
        opt = build_optimizer(clone, lr=1e-2, weight_decay=0.02, implementation=name)
        for _ in range(3):
            for n, p in clone.named_parameters():
                if p.requires_grad:
                    p.grad = grads[n].clone()
            opt.step()
        results[name] = dict(clone.named_parameters())
    for n in grads:
        torch.testing.assert_close(results[implementation][n], results["loop"][n], atol=1e-6, rtol=1e-5)


def test_unknown_adamw_implementation_is_refused(tiny):
    with pytest.raises(ValueError, match="implementation"):
        build_optimizer(tiny, lr=1e-4, weight_decay=0.02, implementation="apex")


def test_one_optimizer_step_trains_the_model():
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=16)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.02)
    before = model.visual_encoder.pos_embed.detach().clone()
    model(make_batch(model)).total.backward()
    frozen = model.visual_encoder_m.pos_embed.detach().clone()  # after forward's EMA update
    norm = clip_gradients([p for g in opt.param_groups for p in g["params"]], 1.0)
    assert torch.isfinite(norm) and norm > 0
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert not torch.equal(before, model.visual_encoder.pos_embed)
    assert torch.equal(frozen, model.visual_encoder_m.pos_embed)  # the optimiser never touches teachers


def _params_with_grads(seed: int = 0, dtype=torch.float32) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape, dtype=dtype)) for shape in [(3, 4), (5,), (), (2, 2, 2)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(dtype)
    params.append(nn.Parameter(torch.zeros(7)))  # no gradient: skipped
    return params


def test_grad_norm_matches_manual_computation():
    params = _params_with_grads()
    manual = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))
    norm = grad_norm(params)
    assert norm.dim() == 0 and norm.dtype == torch.float32
    assert norm.item() == pytest.approx(manual, rel=1e-6)
    assert grad_norm(iter(params)).item() == pytest.approx(manual, rel=1e-6)  # generators work too
    reference = torch.nn.utils.clip_grad_norm_([p for p in params], float("inf"))
    assert norm.item() == pytest.approx(reference.item(), rel=1e-6)


def test_grad_norm_mixed_dtypes_and_empty():
    params = _params_with_grads() + _params_with_grads(seed=1, dtype=torch.bfloat16)
    manual = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in params if p.grad is not None))
    assert grad_norm(params).item() == pytest.approx(manual, rel=1e-5)  # bf16 grads, fp32 norms
    assert grad_norm([nn.Parameter(torch.zeros(3))]).item() == 0.0
    assert grad_norm([]).item() == 0.0


def test_clip_gradients_scales_to_max_norm_and_returns_pre_clip_norm():
    params = _params_with_grads()
    before = [p.grad.clone() for p in params if p.grad is not None]
    total = grad_norm(params).item()
    returned = clip_gradients(params, max_norm=0.5)
    assert returned.item() == pytest.approx(total, rel=1e-6)
    assert grad_norm(params).item() == pytest.approx(0.5, rel=1e-4)
    after = [p.grad for p in params if p.grad is not None]
    for b, a in zip(before, after):  # direction is preserved
        torch.testing.assert_close(a, b * (0.5 / (total + 1e-6)))


def test_clip_gradients_leaves_small_gradients_and_none_only_measures():
    params = _params_with_grads()
    before = [p.grad.clone() for p in params if p.grad is not None]
    total = grad_norm(params).item()
    assert clip_gradients(params, max_norm=total * 10).item() == pytest.approx(total, rel=1e-6)
    assert clip_gradients(params, None).item() == pytest.approx(total, rel=1e-6)
    for b, p in zip(before, [p for p in params if p.grad is not None]):
        torch.testing.assert_close(p.grad, b)
    with pytest.raises(ValueError, match="max_norm"):
        clip_gradients(params, 0.0)
