"""Grad-CAM, concept tags and `simla explain`: word merging, batch independence, the one eager layer,
hand-checked map arithmetic, the ITC mode, missing concept heads, and the command's files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import simla
from simla.checkpoint import save_checkpoint
from simla.cli import main
from simla.explain import MissingConceptHead, concepts, gradcam
from simla.explain.gradcam import itm_token_maps, tokenize_with_words
from simla.factory import build_model

from datasets import draw

TEXTS = ["a red circle", "the big blue-ish triangle, on the LEFT!", "cat"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(simla.get_config("simla_tiny", queue_size=16), "pretrain").eval()


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_wordpieces_merge_back_into_typed_words(model):
    pieces = model.tokenizer.tokenize_words("A black-and-white photo, unbelievably tiny.", 512)
    assert pieces.words == ["A", "black-and-white", "photo,", "unbelievably", "tiny."]
    owners = pieces.word_of_token
    assert owners[0] == -1 and owners == sorted(owners)  # [CLS], then words in order
    assert owners.count(1) == 3  # "black-and-white" is cleaned to black, and, white: three pieces of one word
    assert owners.count(3) > 1  # "unbelievably" is several wordpieces
    # The ids are those of the model's tokenizer (cleaning included) for a text under its 30-word cap.
    text = "the big blue-ish triangle, on the LEFT!"
    assert model.tokenizer.tokenize_words(text, 512).ids == model.tokenizer(text, max_length=512).input_ids[0].tolist()
    cut = model.tokenizer.tokenize_words("one two three four", 3)
    assert cut.truncated and cut.words == ["one", "two"] and len(cut.ids) == 3
    assert model.tokenizer.tokenize_words("-- a", 8).words == ["a"]  # a word that cleaning empties has no map


def test_owners_count_black_and_white(model):
    pieces = model.tokenizer.tokenize_words("black-and-white", 16)
    assert pieces.words == ["black-and-white"] and pieces.word_of_token == [-1, 0, 0, 0]


def test_batch_maps_equal_one_pair_at_a_time(model, pixels):
    batch = gradcam(model, pixels, TEXTS)
    for i, text in enumerate(TEXTS):
        (alone,) = gradcam(model, pixels[i:i + 1], text)
        assert alone.words == batch[i].words
        torch.testing.assert_close(alone.text_map, batch[i].text_map, atol=1e-7, rtol=1e-5)
        torch.testing.assert_close(alone.word_maps, batch[i].word_maps, atol=1e-7, rtol=1e-5)
        assert alone.score == pytest.approx(batch[i].score, abs=1e-6)


def test_explained_layer_eager_attention_equals_sdpa(model, pixels):
    ids, mask, _ = tokenize_with_words(model, TEXTS)
    tokens = model.visual_encoder(pixels)
    with torch.no_grad():
        fused = model.fuse(tokens, ids, mask)
        with model.text_encoder.capture_cross_attention(0) as attention:
            eager = model.fuse(tokens, ids, mask)
            probs = attention.saved_probs
    torch.testing.assert_close(eager, fused, atol=1e-5, rtol=1e-5)
    grid = model.config.grid_size
    assert probs.shape == (3, model.config.text.num_heads, ids.shape[1], 1 + grid * grid)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # Only the explained layer leaves SDPA, and only inside the block.
    assert not any(layer.crossattention.self.capture for layer in model.text_encoder.layers)
    with torch.no_grad(), model.visual_encoder.capture_attention(1) as captured:
        vit_eager = model.visual_encoder(pixels)
    torch.testing.assert_close(vit_eager, tokens.detach(), atol=1e-5, rtol=1e-5)
    assert captured[0].shape == (3, model.config.vision.num_heads, 1 + grid * grid, 1 + grid * grid)
    assert all(block.attn.fused_attn for block in model.visual_encoder.blocks)


def test_maps_are_the_token_map_averages(model, pixels):
    """Whole text = mean over real tokens ([CLS] included, padding never); word = mean over its pieces."""
    ids, mask, pieces = tokenize_with_words(model, TEXTS)
    layer = model.config.gradcam_layer
    cam, match = itm_token_maps(model, pixels, ids, mask, layer)
    explanations = gradcam(model, pixels, TEXTS)
    grid = model.config.grid_size
    for b, (piece, explanation) in enumerate(zip(pieces, explanations)):
        real = cam[b, : len(piece.ids)]
        torch.testing.assert_close(explanation.text_map, real.mean(0).view(grid, grid), atol=1e-7, rtol=1e-5)
        owners = torch.tensor(piece.word_of_token)
        for w in range(len(piece.words)):
            expected = real[owners == w].mean(0).view(grid, grid)
            torch.testing.assert_close(explanation.word_maps[w], expected, atol=1e-7, rtol=1e-5)
        assert explanation.score == pytest.approx(float(match[b]), abs=1e-6)
        assert (explanation.text_map >= 0).all()  # attention times the positive part of the gradient
    assert explanations[0].word_maps_image.shape == (3, 64, 64)


def test_default_layer_is_never_the_last(model, pixels):
    assert simla.get_config("simla_base").gradcam_layer == 8  # the reference's block
    assert simla.get_config("simla_tiny").gradcam_layer == 0
    # Why: in the last layer only the [CLS] row reaches the ITM head, so every word's map is zero.
    (last,) = gradcam(model, pixels[:1], "a red circle", layer=1)
    assert torch.count_nonzero(last.word_maps) == 0
    with pytest.raises(simla.config.ConfigError, match="explain.gradcam_layer"):
        simla.get_config("simla_tiny", **{"explain.gradcam_layer": 2})


def test_itc_mode(model, pixels):
    explanations = gradcam(model, pixels, TEXTS, target="itc")
    with torch.no_grad():
        cosine = (model.encode_image(pixels) * model.encode_text(TEXTS)).sum(-1)
    for explanation, expected in zip(explanations, cosine.tolist()):
        assert explanation.word_maps is None and explanation.text_map.shape == (8, 8)
        assert explanation.score == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="target"):
        gradcam(model, pixels, TEXTS, target="mlm")


def test_pairing_and_long_texts(model, pixels):
    assert len(gradcam(model, pixels, "one text for all")) == 3
    assert len(gradcam(model, pixels[:1], TEXTS)) == 3
    with pytest.raises(ValueError, match="one to one"):
        gradcam(model, pixels[:2], TEXTS)
    long_text = " ".join(["word"] * 600)  # more tokens than the 512 positions
    (explanation,) = gradcam(model, pixels[:1], long_text)
    assert explanation.truncated and len(explanation.words) == 511


def test_concept_tags(model, pixels):
    # A random head: no tag clears the calibrated bar, so ask for the 8 best whatever they are.
    (tags,) = concepts(model, pixels[:1], top=8, maps=True, min_probability=0, min_margin=0)
    words = [w for w, _ in tags.tags]
    probabilities = [p for _, p in tags.tags]
    assert probabilities == sorted(probabilities, reverse=True) and all(0 < p < 1 for p in probabilities)
    assert all(w.isalnum() and not w.startswith("##") and not w.startswith("[") for w in words)
    assert tags.maps.shape == (8, 8, 8) and tags.maps_image.shape == (8, 64, 64)
    retrieval = build_model(simla.get_config("simla_tiny", queue_size=16), "retrieval")
    with pytest.raises(MissingConceptHead, match="concept head"):
        concepts(retrieval, pixels[:1])


@pytest.fixture(scope="module")
def explain_files(tmp_path_factory, model) -> Path:
    root = tmp_path_factory.mktemp("explain")
    draw("red", "circle", size=64).save(root / "red.png")
    draw("blue", "square", size=80, seed=1).save(root / "blue.png")
    save_checkpoint(model, root / "model.pt")
    (root / "pairs.json").write_text(json.dumps([{"image": "red.png", "text": "a red circle"},
                                                 {"image": "blue.png", "text": "a blue square"}]))
    return root


def test_explain_command(explain_files, capsys):
    root, out = explain_files, explain_files / "out"
    code = main(["explain", str(root / "red.png"), str(root / "blue.png"), str(root / "missing.png"), "a red circle",
                 "--checkpoint", str(root / "model.pt"), "--output", str(out), "--concepts", "5"])
    assert code == 1  # one image could not be read: reported, the others explained
    summary = json.loads((out / "explanations.json").read_text())
    assert summary["pairs"] == 3 and summary["explained"] == 2
    assert summary["failed"][0]["image"].endswith("missing.png")
    for record in summary["explanations"]:
        assert (out / record["sheet"]).stat().st_size > 5000
        # A random concept head clears no calibrated bar: no tags, rather than noise.
        assert record["words"] == ["a", "red", "circle"] and record["concepts"] == []
        assert len(record["text_map"]) == 8 and set(record["word_maps"]) == {"a", "red", "circle"}
    assert summary["explanations"][1]["image_size"] == [80, 80]
    assert "explained 2 of 3 pairs" in capsys.readouterr().out

    assert main(["explain", "--pairs", str(root / "pairs.json"), "--checkpoint", str(root / "model.pt"),
                 "--output", str(root / "pairs_out"), "--target", "itc"]) == 0
    records = json.loads((root / "pairs_out" / "explanations.json").read_text())["explanations"]
    assert [r["text"] for r in records] == ["a red circle", "a blue square"] and records[0]["word_maps"] is None


def test_explain_command_errors(explain_files, capsys):
    assert main(["explain", "a red circle", "--checkpoint", str(explain_files / "model.pt")]) == 2
    assert "followed by the text" in capsys.readouterr().err
    bad = explain_files / "bad_pairs.json"
    bad.write_text(json.dumps([{"image": "red.png"}]))
    assert main(["explain", "--pairs", str(bad), "--checkpoint", str(explain_files / "model.pt")]) == 2
    assert "record 0, field 'text'" in capsys.readouterr().err


def test_heat_of_a_long_thin_picture():
    # Real clip art includes banners and rules a few pixels high; the blur must fit inside them.
    from simla.explain.render import smoothed_heat

    grid = torch.rand(6, 6)
    for size in ((126, 20), (20, 126), (1, 300), (48, 48)):
        heat = smoothed_heat(grid, size, patch_pixels=21.0)
        assert tuple(heat.shape) == size and torch.isfinite(heat).all()


# ------------------------------------------------------------------------------------ how maps are drawn
def _explanation(words, word_maps, score=0.9, tokens=None, text_map=None):
    """A hand-made explanation on an 8x8 grid for a 64x64 image (the whole-text map is the tokens' mean)."""
    from simla.explain import Explanation

    word_maps = torch.stack(word_maps)
    tokens = tokens or len(words) + 2
    if text_map is None:
        text_map = word_maps.sum(0) / tokens  # [CLS] and [SEP] contribute nothing here
    return Explanation(text=" ".join(words), words=list(words), target="itm", layer=0, score=score,
                       text_map=text_map, word_maps=word_maps, image_size=(64, 64), tokens=tokens)


def _hot(row, col, value=1.0, base=0.0):
    grid = torch.full((8, 8), base)
    grid[row, col] = value
    return grid


def test_one_span_per_sheet_an_ignored_word_is_blank_and_words_are_comparable():
    from simla.explain.render import FLOOR, sheet_panels

    words = ["the", "blue", "triangle"]
    # "the" is flat (ignored), "blue" carries all the evidence on the patch (1, 1), "triangle" half as much
    # on (6, 6); both sit on a level every patch gets (base), which is not evidence.
    maps = [torch.full((8, 8), 0.3), _hot(1, 1, 1.0, base=0.3), _hot(6, 6, 0.65, base=0.3)]
    explanation = _explanation(words, maps, tokens=5)
    image, text, the, blue, triangle = sheet_panels(explanation, (64, 64))
    assert image[0] is None and text[2] == "whole text"
    assert the[0].max() < 1e-4 and the[2].startswith("the  (x")  # flat: nothing above the floor (float noise)
    for level, *_ in (text, blue, triangle):
        assert level.min() == 0  # the level most of the image gets is not drawn
    assert float(text[0].max()) == pytest.approx(1.0)
    assert float(blue[0].max()) == pytest.approx(1.0, abs=1e-4)  # it is all the rise there is
    # Comparable: "triangle" rises half as much as "blue" (the same smoothing acts on both).
    assert float(triangle[0].max()) == pytest.approx(float(blue[0].max()) / 2, rel=1e-3)
    assert float(blue[0][:32, :32].max()) > FLOOR and float(blue[0][32:, 32:].max()) < FLOOR
    # A word that barely rises would fill the colour range if scaled by its own peak; here it stays blank.
    weak = _explanation(words, [maps[0], _hot(1, 1, 0.31, base=0.3), maps[2]], tokens=5)
    assert float(sheet_panels(weak, (64, 64))[3][0].max()) < FLOOR


def test_cold_pixels_are_the_image_unchanged(tmp_path):
    from PIL import Image

    from simla.explain.render import blend, overlay_png

    from matplotlib import colormaps

    pixels = (torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(3)) * 255).round().byte().numpy()
    image = Image.fromarray(pixels)
    level = torch.zeros(64, 64)
    level[:10, :10] = 0.9
    level[30:, 30:] = 0.15  # a weak rise, below the floor
    out = blend(image, level.numpy(), colormaps["jet"])
    assert (out[10:, :] == pixels[10:, :]).all() and (out[:, 10:] == pixels[:, 10:]).all()
    assert (out[:10, :10] != pixels[:10, :10]).any()
    # The search page's overlay: a map with one hot patch over a level everywhere leaves the rest untouched.
    overlay = Image.open(io.BytesIO(overlay_png(image, _explanation(["x"], [_hot(0, 0, 2.0, base=1.0)]))))
    drawn = np.asarray(overlay.convert("RGB"))
    assert drawn.shape == pixels.shape
    assert (drawn[32:, 32:] == pixels[32:, 32:]).all()  # the cold background: exactly the image
    assert (drawn[:4, :4] != pixels[:4, :4]).any()
    # A dip (a cold ring around an object, say) does not make the rest of the background look hot: the
    # level drawn from is the map's median, not its minimum.
    dip = _hot(0, 0, 2.0, base=1.0)
    dip[5, 5] = 0.0
    drawn = np.asarray(Image.open(io.BytesIO(overlay_png(image, _explanation(["x"], [dip])))).convert("RGB"))
    assert (drawn[24:40, 24:40] == pixels[24:40, 24:40]).all()


def test_a_sheet_says_when_the_match_probability_is_too_low(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    from PIL import Image

    from simla.explain.render import render_sheet

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to read its texts
    image = Image.new("RGB", (64, 64), "white")
    maps = [_hot(1, 1), _hot(5, 5)]
    render_sheet(image, _explanation(["red", "circle"], maps, score=0.001), tmp_path / "low.png", box=(0, 0, 16, 16))
    render_sheet(image, _explanation(["red", "circle"], maps, score=0.93), tmp_path / "high.png")
    low, high = ([t.get_text() for t in fig.texts] for fig in figures)
    assert any("below 0.5" in t and "do not show where" in t for t in low)
    assert not any("below" in t for t in high)
    assert (tmp_path / "low.png").stat().st_size > 5000
