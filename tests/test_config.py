"""Presets and validated overrides."""

from __future__ import annotations

import json

import pytest

import simla
from simla.cli import main
from simla.config import SimlaConfig, get_config
from simla.errors import ConfigError


def test_presets_listed_and_paper_defaults():
    assert {"simla_base", "simla_tiny"} <= set(simla.list_models())
    base = get_config("simla_base")
    assert (base.vision.image_size, base.vision.patch_size, base.vision.width, base.vision.depth) == (256, 16, 768, 12)
    assert (base.text.hidden_size, base.text.num_layers, base.text.vocab_size) == (768, 12, 30522)
    o = base.objectives
    assert (o.embed_dim, o.queue_size, o.momentum, o.temp, o.alpha) == (256, 65536, 0.995, 0.07, 0.4)
    assert (o.psl_layer, o.psl_votes_per_head, o.psl_num_keywords) == (11, 4, 5)
    assert (o.mim_num_masked, o.mim_min_block, o.mim_min_aspect, o.visual_vocab_size) == (75, 16, 0.3, 8192)
    assert base.tokenizer_image_size == 128 and o.max_text_length == 25


def test_override_forms():
    c = get_config("simla_tiny", queue_size=32, vision={"depth": 3}, **{"text.num_layers": 3, "objectives.psl_layer": 2})
    assert (c.objectives.queue_size, c.vision.depth, c.text.num_layers, c.objectives.psl_layer) == (32, 3, 3, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"queue_sise": 3}, "unknown config field 'queue_sise'"),
        ({"queue_size": "big"}, "objectives.queue_size: expected an integer"),
        ({"psl_selection": "best"}, "allowed values \\['simla', 'reference'\\]"),
        ({"init": "x"}, "ambiguous"),
        ({"vision.image_size": 60}, "multiple of vision.patch_size"),
        ({"psl_layer": 7}, "objectives.psl_layer must lie in"),
        ({"momentum_dropout": "yes"}, "expected true/false"),
        ({"optics.depth": 2}, "unknown config section"),
    ],
)
def test_invalid_overrides_name_the_field(overrides, message):
    with pytest.raises((KeyError, TypeError, ValueError), match=message):
        get_config("simla_tiny", **overrides)


def test_unknown_model_lists_available():
    with pytest.raises(ValueError, match="simla_tiny"):
        simla.create_model("simla_huge")


def test_config_dict_round_trip():
    config = get_config("simla_tiny", queue_size=48)
    assert SimlaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_models_command_reports_parameter_counts(capsys):
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row["params"] for row in json.loads(capsys.readouterr().out)}
    # ViT-B/16 at 256 px with the mask token; the paper's 223M is the ViT plus the shared encoder.
    assert rows["simla_base"]["vision_encoder"] == 85_845_504
    assert abs(rows["simla_base"]["vision_encoder"] + rows["simla_base"]["shared_encoder"] - 223e6) < 0.5e6
    assert rows["simla_tiny"]["online"] < 10_000_000


def test_downstream_models_at_384_px_are_valid_but_a_mim_pretraining_model_is_not():
    # The paper fine-tunes at 384 px (577 image tokens): only the MIM pass, which positions image tokens
    # with the 512 text positions, cannot run there.
    config = get_config("simla_base", **{"vision.image_size": 384, "vision.use_mask_token": False})
    assert config.grid_size == 24
    with pytest.raises(ConfigError, match="MIM pass"):
        get_config("simla_base", **{"vision.image_size": 384})
    get_config("simla_base", **{"vision.image_size": 384}, losses=["itc", "itm", "mlm"])  # no MIM: fine
