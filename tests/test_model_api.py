"""What every model shares: declared momentum teachers, a config of its own, one LoadReport, typed outputs."""

from __future__ import annotations

import copy

import pytest
import torch

import simla
from simla.config import get_config
from simla.models.registry import model_class, model_tasks
from simla.load_report import LoadReport
from simla.models.momentum import TEACHER_SUFFIX, is_teacher_key, online_name, teacher_name
from simla.models.outputs import ClassificationOutput, ModelOutput, PretrainOutput, RetrievalOutput, VQAOutput


@pytest.fixture(scope="module")
def tiny_config():
    return get_config("simla_tiny", **{"objectives.queue_size": 8})


# ------------------------------------------------------------------------------------------- teachers
def test_teacher_names():
    assert TEACHER_SUFFIX == "_m" and teacher_name("text_encoder") == "text_encoder_m"
    assert online_name("text_encoder_m") == "text_encoder" and online_name("text_encoder") == "text_encoder"
    assert is_teacher_key("visual_encoder_m.blocks.0.attn.qkv.weight") and is_teacher_key("cls_head_m")
    assert not is_teacher_key("visual_encoder.blocks.0.attn.qkv.weight") and not is_teacher_key("image_queue")
    assert not is_teacher_key("text_encoder.layer_m.weight")  # only the top-level module names a teacher


@pytest.mark.parametrize("task", model_tasks())
def test_every_model_pairs_exactly_its_declared_teachers(tiny_config, task):
    torch.manual_seed(0)
    model = model_class(task)(tiny_config)
    pairs = model.momentum_pairs()
    built = [name for name in model.MOMENTUM_MODULES if getattr(model, name, None) is not None]
    assert built == model.momentum_names()
    for name, (online, teacher) in zip(model.momentum_names(), pairs):
        assert online is getattr(model, name) and teacher is getattr(model, teacher_name(name))
        assert all(not p.requires_grad for p in teacher.parameters())
    teachers = {n.split(".", 1)[0] for n, _ in model.named_parameters() if is_teacher_key(n)}
    assert teachers == {teacher_name(n) for n in model.momentum_names()}
    with torch.no_grad():
        for online, _ in pairs:
            for p in online.parameters():
                p.add_(1.0)
    model.copy_params_to_momentum()  # a no-op for models without teachers (no hasattr needed)
    for online, teacher in pairs:
        assert all(torch.equal(a, b) for a, b in zip(online.parameters(), teacher.parameters()))


def test_models_without_teachers_have_an_empty_pairing(tiny_config):
    for task in ("base", "nlvr-ta"):
        model = model_class(task)(tiny_config)
        assert model.MOMENTUM_MODULES == () and model.momentum_pairs() == []
        model.copy_params_to_momentum()
        model.update_momentum_teachers(0.5)


def test_update_momentum_teachers_is_one_ema_step(tiny_config):
    model = model_class("retrieval")(tiny_config)
    with torch.no_grad():
        model.text_proj.weight.add_(1.0)
    before = model.text_proj_m.weight.clone()
    model.update_momentum_teachers(0.75)
    expected = 0.75 * before + 0.25 * model.text_proj.weight
    assert torch.allclose(model.text_proj_m.weight, expected, atol=1e-6)


def test_an_ablation_builds_no_teacher_for_a_left_out_head(tiny_config):
    config = copy.deepcopy(tiny_config)
    config.objectives.losses = ["itc", "itm", "psl"]
    model = model_class("pretrain")(config)
    assert not hasattr(model, "mlm_head_m") and not hasattr(model, "mim_head_m")
    assert "mlm_head" not in model.momentum_names() and "concept_head" in model.momentum_names()
    ignored = model.ignored_source_prefixes()
    assert {"mlm_head", "mlm_head_m", "mim_head_m", "mim_adapter", "visual_encoder_m.mask_token"} <= set(ignored)
    assert "concept_head" not in ignored and ignored[0] == "idx_queue"
    assert "mlm_head" not in type(model).IGNORED_SOURCE_PREFIXES  # the class constant stays constant


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("task", model_tasks())
def test_a_constructor_never_changes_the_callers_config(tiny_config, task):
    config = copy.deepcopy(tiny_config)
    config.vision.use_mask_token = task != "pretrain"  # the opposite of what the model needs
    before = config.to_dict()
    model = model_class(task)(config)
    assert config.to_dict() == before
    assert model.config is not config
    assert (model.visual_encoder.mask_token is not None) == (task == "pretrain")
    assert model.config.vision.use_mask_token == (task == "pretrain")


def test_mim_without_the_mask_token_in_the_callers_config_still_gets_one(tiny_config):
    """MIM masks patches, so a pretraining model with MIM always has the mask token (no error), and the
    config it was given keeps saying what the caller wrote."""
    config = copy.deepcopy(tiny_config)
    config.vision.use_mask_token = False
    model = model_class("pretrain")(config)
    assert model.visual_encoder.mask_token is not None and not config.vision.use_mask_token


# ----------------------------------------------------------------------------------------- reports
def test_one_report_type_for_every_import():
    from simla.checkpoint import ImportReport
    from simla.models import bert, vision

    assert simla.LoadReport is LoadReport is ImportReport is vision.LoadReport is bert.LoadReport
    assert simla.ImportReport is LoadReport


def test_load_report_text():
    report = LoadReport("ckpt.pt")
    assert report.ok and str(report) == "import of ckpt.pt:\n  every key matched"
    assert report.summary() == "ckpt.pt: every key matched"
    report.missing = [f"k{i}" for i in range(25)]
    report.ignored = ["head.weight"]
    report.notes.append("mask_token keeps its zero initialisation")
    text = str(report)
    assert not report.ok and "missing: k0, " in text and "(25 in all)" in text and "k24" not in text
    assert "ignored: head.weight" in text and "note: mask_token" in text
    assert report.summary() == "ckpt.pt: missing 25, ignored 1"
    assert not LoadReport(mismatched=["a: checkpoint (1,) vs model (2,)"]).ok


# ----------------------------------------------------------------------------------------- outputs
def test_outputs_are_loss_dicts_with_typed_fields():
    loss = torch.tensor(1.5)
    out = RetrievalOutput({"itc": loss, "itm": loss}, itm_negative_images=torch.tensor([1, 0]),
                          itm_negative_texts=torch.tensor([0, 1]))
    assert isinstance(out, ModelOutput) and isinstance(out, dict) and dict(out) == {"itc": loss, "itm": loss}
    assert float(out.total) == 3.0 and out.losses == {"itc": loss, "itm": loss}
    assert out.itm_negative_images.tolist() == [1, 0] and out.targets["itm_negative_texts"].tolist() == [0, 1]
    with pytest.raises(TypeError, match="no field"):
        VQAOutput({"vqa": loss}, logits=loss)
    pretrain = PretrainOutput({"itc": loss}, {"temp": torch.tensor(0.07)})  # the positional form stays
    assert pretrain.temp is pretrain.targets["temp"] and pretrain.psl_keywords is None
    assert ClassificationOutput({"cls": loss}, logits=loss, labels=loss).labels is loss
    assert simla.PretrainOutput is PretrainOutput is simla.models.pretrain.PretrainOutput
