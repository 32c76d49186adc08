"""NLVR2 and SNLI-VE models: the deepened encoder and its ties, image alternation, text assignment, labels."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import simla
from simla.checkpoint import load_checkpoint, load_state_into, save_checkpoint, save_pretrained
from simla.data.classification import read_nlvr, read_ve
from simla.data.readers import DataFormatError
from simla.factory import build_model
from simla.models.nlvr import deepen_encoder_state, deepened_index, sample_text_assignment

from test_checkpoint import reference_pretrain_state


def deep_config(layers: int = 4, duplicate_from: int | None = 2):
    return simla.get_config("simla_tiny", queue_size=16, **{"text.num_layers": layers}, duplicate_from=duplicate_from,
                            psl_layer=layers - 1)


def test_the_paper_encoder_becomes_18_layers():
    config = simla.get_config("simla_base")
    assert config.nlvr_layers == 18
    assert [deepened_index(n, 6) for n in (0, 5, 6, 7, 11)] == [(0,), (5,), (6, 7), (8, 9), (16, 17)]
    assert simla.get_config("simla_tiny").nlvr_layers == 3


def test_layer_map_and_one_tied_tensor_per_pair_from_a_reference_checkpoint():
    config = deep_config()
    state = reference_pretrain_state(config)
    deep = deepen_encoder_state(state, config)
    for n, targets in ((0, (0,)), (1, (1,)), (2, (2, 3)), (3, (4, 5))):
        for target in targets:
            for leaf in ("attention.self.query.weight", "crossattention.self.value.bias", "output.dense.weight"):
                assert deep[f"text_encoder.bert.encoder.layer.{target}.{leaf}"] is \
                    state[f"text_encoder.bert.encoder.layer.{n}.{leaf}"]
    model = build_model(config, "nlvr")
    report = load_state_into(model, state, source="reference")  # strict
    assert report.new_head == ["cls_head.0.weight", "cls_head.0.bias", "cls_head.2.weight", "cls_head.2.bias"]
    layers = model.text_encoder.layers
    assert len(layers) == 6
    for first, twin in ((2, 3), (4, 5)):
        for name in ("key", "value"):
            assert getattr(layers[first].crossattention.self, name) is getattr(layers[twin].crossattention.self, name)
        assert layers[first].crossattention.self.query is not layers[twin].crossattention.self.query
    assert layers[1].crossattention.self.key is not layers[2].crossattention.self.key
    assert torch.equal(layers[5].output.dense.weight, state["text_encoder.bert.encoder.layer.3.output.dense.weight"])
    # The teachers copy the loaded weights and keep the same ties.
    teacher = model.text_encoder_m.layers
    assert teacher[2].crossattention.self.key is teacher[3].crossattention.self.key
    assert torch.equal(teacher[3].crossattention.self.key.weight, layers[3].crossattention.self.key.weight)
    # Shared parameters are counted (and optimised) once.
    names = [n for n, _ in model.named_parameters() if "crossattention.self.key.weight" in n and "_m." not in n]
    assert names == [f"text_encoder.encoder.layer.{i}.crossattention.self.key.weight" for i in (0, 1, 2, 4)]


def _pair_batch(model, size: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = model.config.vision.image_size
    ids = torch.randint(1000, 3000, (size, 6), generator=g)
    ids[:, 0] = 101
    return {"image0": torch.randn(size, 3, pixels, pixels, generator=g),
            "image1": torch.randn(size, 3, pixels, pixels, generator=g),
            "text_ids": ids, "text_mask": torch.ones_like(ids), "label": torch.tensor([0, 1] * (size // 2))}


def test_layers_alternate_images_and_the_tied_projection_gets_both_layers_gradients():
    torch.manual_seed(0)
    model = build_model(deep_config(), "nlvr").eval()  # no dropout: two forwards must agree
    batch = _pair_batch(model)
    contexts = {}
    hooks = [layer.crossattention.register_forward_hook(
        lambda module, args, out, i=i: contexts.__setitem__(i, args[1])) for i, layer in enumerate(model.text_encoder.layers)]
    model(batch, alpha=0.0)["cls"].backward()
    for h in hooks:
        h.remove()
    images = model.visual_encoder(torch.cat([batch["image0"], batch["image1"]])).chunk(2)
    for i, context in contexts.items():
        assert torch.allclose(context, images[i % 2], atol=1e-6), f"layer {i} reads image {i % 2}"

    # The same model with layer 3's key projection untied (equal values): the tied gradient is the sum.
    untied = copy.deepcopy(model)
    untied.zero_grad()
    layer3 = untied.text_encoder.layers[3].crossattention.self
    layer3.key = nn.Linear(layer3.key.in_features, layer3.key.out_features)
    layer3.key.load_state_dict(untied.text_encoder.layers[2].crossattention.self.key.state_dict())
    untied(batch, alpha=0.0)["cls"].backward()
    tied_grad = model.text_encoder.layers[2].crossattention.self.key.weight.grad
    parts = untied.text_encoder.layers[2].crossattention.self.key.weight.grad, layer3.key.weight.grad
    assert parts[0].abs().sum() > 0 and parts[1].abs().sum() > 0
    assert torch.allclose(tied_grad, parts[0] + parts[1], atol=1e-6)


def test_tied_model_round_trips_through_our_checkpoint_and_safetensors(tmp_path):
    torch.manual_seed(0)
    model = build_model(deep_config(), "nlvr")
    for loaded in (load_checkpoint(save_checkpoint(model, tmp_path / "nlvr.pt")),
                   load_checkpoint(save_pretrained(model, tmp_path / "export"))):
        layers = loaded.text_encoder.layers
        assert layers[4].crossattention.self.value is layers[5].crossattention.self.value
        assert torch.equal(layers[5].crossattention.self.value.weight, model.text_encoder.layers[5].crossattention.self.value.weight)
        assert torch.equal(loaded.cls_head[2].weight, model.cls_head[2].weight)


def test_text_assignment_labels_and_negatives():
    torch.manual_seed(0)
    batch = 6
    weights = torch.full((batch, batch), 0.02)
    weights[torch.arange(batch), (torch.arange(batch) + 1) % batch] = 0.9  # image b+1 is b's likeliest negative
    weights.fill_diagonal_(0)
    draws = [sample_text_assignment(weights) for _ in range(600)]
    left, right, labels = (torch.stack(x) for x in zip(*draws))
    own = torch.arange(batch).expand_as(labels)
    assert torch.all((labels == 0) == (left == own))
    assert torch.all((labels == 1) == (right == own))
    neither = labels == 2
    assert torch.all(left[neither] != right[neither]) and torch.all(left[neither] != own[neither])
    shares = torch.bincount(labels.flatten(), minlength=3).float() / labels.numel()
    assert torch.allclose(shares, torch.full((3,), 1 / 3), atol=0.03)
    negative = torch.where(labels == 0, right, left)  # the first negative drawn
    assert ((negative == (own + 1) % batch).float().mean() - 0.9).abs() < 0.05  # drawn by similarity
    with pytest.raises(ValueError, match="at least 3"):
        sample_text_assignment(torch.ones(2, 2))


def test_text_assignment_model_trains_its_head_from_a_pretraining_checkpoint(tmp_path):
    torch.manual_seed(0)
    config = deep_config(2, None)
    pretrained = build_model(copy.deepcopy(config), "pretrain")
    model = build_model(copy.deepcopy(config), "nlvr-ta")
    report = load_state_into(model, pretrained.state_dict(), source="ours")
    assert report.new_head == ["ta_head.weight", "ta_head.bias"]
    assert not model.vision_proj.weight.requires_grad  # only ranks negatives
    assert torch.equal(model.vision_proj.weight, pretrained.vision_proj.weight)
    ids = torch.randint(1000, 3000, (4, 5))
    ids[:, 0] = 101
    out = model({"image": torch.randn(4, 3, 64, 64), "text_ids": ids, "text_mask": torch.ones_like(ids)})
    out["ta"].backward()
    assert model.ta_head.weight.grad is not None and out.labels.shape == (4,) and out.logits.shape == (4, 3)


# ------------------------------------------------------------------------------------------ data
def _write(tmp_path, name, records):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return str(path)


def test_ve_labels_and_flickr_ids(tmp_path):
    path = _write(tmp_path, "ve.json", [
        {"image": "1000092795", "sentence": "Two men are outside.", "label": "entailment"},
        {"image": "x.png", "sentence": "A dog sleeps", "label": "neutral"},
        {"image": "1000092795", "sentence": "Nobody is there", "label": "contradiction"}])
    records = read_ve(path, image_root="/flickr")
    assert [r.label for r in records] == [2, 1, 0]
    assert records[0].images == ("/flickr/1000092795.jpg",) and records[1].images == ("/flickr/x.png",)
    assert records[0].sentence == "two men are outside"
    assert build_model(simla.get_config("simla_tiny"), "ve").CLASSES[2] == "entailment"


@pytest.mark.parametrize("reader, record, field, message", [
    (read_nlvr, {"images": ["a.png"], "sentence": "two dogs", "label": "True"}, "images", "exactly two images"),
    (read_nlvr, {"images": ["a.png", "b.png"], "sentence": "two dogs", "label": "maybe"}, "label", "not one of"),
    (read_nlvr, {"images": ["a.png", "b.png"], "sentence": " ?! ", "label": "False"}, "sentence", "empty sentence"),
    (read_nlvr, {"images": ["a.png", ""], "sentence": "dogs", "label": "False"}, "image", "expected an image path"),
    (read_ve, {"sentence": "a dog", "label": "neutral"}, "image", "missing"),
    (read_ve, {"image": "1", "sentence": "a dog", "label": 2}, "label", "not one of"),
])
def test_malformed_records_name_file_record_and_field(tmp_path, reader, record, field, message):
    good = ({"images": ["a.png", "b.png"], "sentence": "dogs", "label": "True"} if reader is read_nlvr
            else {"image": "1", "sentence": "a dog", "label": "neutral"})
    path = _write(tmp_path, "data.json", [good, record])
    with pytest.raises(DataFormatError, match=message) as err:
        reader(path)
    assert err.value.record == "1" and err.value.field == field and err.value.path == path


def test_text_assignment_never_shows_an_image_of_the_same_caption_as_a_negative_when_asked():
    from simla.models.nlvr import _without_same_captions

    ids = torch.tensor([[101, 7, 8], [101, 7, 8], [101, 5, 0], [101, 6, 0], [101, 9, 0]])
    weights = torch.ones(5, 5).fill_diagonal_(0)
    kept = _without_same_captions(weights, ids)
    assert kept[0, 1] == 0 and kept[1, 0] == 0  # captions 0 and 1 are the same text
    assert torch.equal(kept[2:], weights[2:])
    for _ in range(50):
        left, right, labels = sample_text_assignment(kept)
        assert not ((left == 1) | (right == 1))[0] and not ((left == 0) | (right == 0))[1]
    crowded = _without_same_captions(torch.ones(3, 3).fill_diagonal_(0), torch.tensor([[101, 7]] * 3))
    assert torch.equal(crowded, torch.ones(3, 3).fill_diagonal_(0))  # too few others: weights kept


def test_a_reference_nlvr_checkpoint_is_recognised_as_already_deep():
    from simla.checkpoint import infer_reference_config

    config = deep_config()  # 4 layers, duplicated from layer 2: 6 deep
    model = build_model(config, "nlvr")
    state = {k: v for k, v in model.state_dict().items() if not k.split(".")[0].endswith("_m")}
    state["text_encoder.embeddings.position_ids"] = torch.arange(512)[None]  # the reference layout's marker
    inferred = infer_reference_config(state)
    assert inferred.text.num_layers == 4 and inferred.nlvr_duplicate_from == 2 and inferred.nlvr_layers == 6
