"""Concept tags: which vocabulary items may be tags (whole words, no function words, no fragments), the
probability threshold, an image with no tag, and the threshold reaching `explanations.json`.

The concept head of a tiny model is set by hand (zero weights, chosen biases), so every image gets the
same, known probabilities and the rules can be checked exactly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import simla
from simla.explain import concepts
from simla.explain.concepts import (DEFAULT_MIN_MARGIN, DEFAULT_MIN_PROBABILITY, STOP_WORDS, continuation_mask,
                                    is_tag_word, select_tags, tag_mask, whole_word_mask)
from simla.explain.run import explain_pairs
from simla.factory import build_model

from datasets import draw

# Biases of the hand-set head: probability sigmoid(bias); everything else gets -12 (p ~ 6e-6).
BIASES = {"a": 4.0, "the": 3.5, "##tangle": -0.45, "red": 2.0, "of": 1.5, "ox": 1.2, "circle": 0.6, "3": 0.3,
          "rec": -0.4, "[unused5]": 5.0, ",": 5.0, "[SEP]": 5.0}


class FakeTokenizer:
    """The two things concept tags read from a tokenizer: id -> token, and the special ids."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.special_token_ids = [i for i, t in enumerate(tokens) if t in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")]
        # WordPiece's greedy longest-match split of a word over this vocabulary.
        def tokenize(word: str) -> list[str]:
            pieces, rest = [], word
            while rest:
                known = [t for t in tokens if rest.startswith(t.removeprefix("##") if pieces else t)
                         and t.startswith("##") == bool(pieces)]
                if not known:
                    return ["[UNK]"]
                best = max(known, key=len)
                pieces.append(best)
                rest = rest[len(best.removeprefix("##")):]
            return pieces

        self.backend = SimpleNamespace(convert_ids_to_tokens=lambda ids: [tokens[i] for i in ids], tokenize=tokenize)


def test_tag_words_leave_out_function_words_and_short_pieces():
    assert {"a", "the", "of", "with", "and", "is", "there", "some"} <= STOP_WORDS
    assert not STOP_WORDS & {"red", "circle", "dog", "two", "three", "left", "right", "black", "white"}
    assert all(word == word.lower() and word.isalpha() for word in STOP_WORDS)
    assert [w for w in ["a", "the", "ox", "tv", "red", "3", "42", "circle"] if is_tag_word(w)] == [
        "red", "3", "42", "circle"]


def test_masks_and_select_tags_on_a_small_vocabulary():
    tokens = ["[PAD]", "[unused0]", "[CLS]", "[SEP]", "a", "the", "red", "circle", "rec", "##tangle", ",", "ox",
              "3", "\u00e9", "blue", "green", "##s"]
    tokenizer = FakeTokenizer(tokens)
    assert [t for t, ok in zip(tokens, whole_word_mask(tokenizer, len(tokens)).tolist()) if ok] == [
        "a", "the", "red", "circle", "rec", "ox", "3", "blue", "green"]
    mask = tag_mask(tokenizer, len(tokens))
    assert [t for t, ok in zip(tokens, mask.tolist()) if ok] == ["red", "circle", "rec", "3", "blue", "green"]
    pieces = continuation_mask(tokenizer, len(tokens))
    assert [t for t, ok in zip(tokens, pieces.tolist()) if ok] == ["##tangle", "##s"]
    probs = torch.tensor([.99, .99, .99, .99, .95, .9, .8, .7, .45, .44, .99, .85, .6, .99, .3, .05, .02])
    tags = select_tags(tokenizer, probs, mask, top=10, min_probability=0.5)
    assert [(w, i) for w, i, _ in tags] == [("red", 6), ("circle", 7), ("3", 12)]
    assert [p for _, _, p in tags] == pytest.approx([.8, .7, .6])
    assert [w for w, _, _ in select_tags(tokenizer, probs, mask, top=2, min_probability=0.0)] == ["red", "circle"]
    assert select_tags(tokenizer, probs, mask, top=10, min_probability=0.81) == []
    # A passing continuation completes the passing short start piece of the closest probability ("rec",
    # not "red"), at the lower probability; never a number or a longer word; without `pieces`, nothing.
    joined = select_tags(tokenizer, probs, mask, top=10, min_probability=0.4, pieces=pieces)
    assert [(w, round(p, 2)) for w, _, p in joined] == [("red", .8), ("circle", .7), ("3", .6), ("rectangle", .44)]
    plain = select_tags(tokenizer, probs, mask, top=10, min_probability=0.4)
    assert [w for w, _, _ in plain] == ["red", "circle", "3", "rec"]
    # The margin: with 30 or fewer candidates the background is the least probable one (0.05 here).
    assert [w for w, _, _ in select_tags(tokenizer, probs, mask, 10, 0.0, min_margin=0.6)] == ["red", "circle"]


def test_a_head_that_learnt_nothing_gives_no_tags():
    # An untrained head: every item near 0.5, as the clip-art model's after 150 steps (0.47 to 0.53).
    tokens = [f"word{i}" for i in range(200)]
    tokenizer = FakeTokenizer(tokens)
    probs = 0.5 + 0.03 * torch.rand(200, generator=torch.Generator().manual_seed(0))
    mask = tag_mask(tokenizer, len(tokens))
    assert select_tags(tokenizer, probs, mask, 10, DEFAULT_MIN_PROBABILITY, DEFAULT_MIN_MARGIN) == []
    assert len(select_tags(tokenizer, probs, mask, 10, DEFAULT_MIN_PROBABILITY, 0.0)) == 10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = build_model(simla.get_config("simla_tiny", queue_size=16), "pretrain").eval()
    head = model.concept_head
    vocab = model.tokenizer.backend.convert_tokens_to_ids(list(BIASES))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-12.0)
        for token_id, bias in zip(vocab, BIASES.values()):
            head.bias[token_id] = bias
    return model


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_concepts_keep_whole_content_words_above_the_threshold(model, pixels):
    grid = model.config.grid_size
    for tags in concepts(model, pixels, top=10, maps=True, min_probability=0.5):
        # "a", "the", "of" are function words, "ox" too short, "[unused5]", "," and "[SEP]" no words;
        # "rec" (p 0.40) and "##tangle" (0.39) are below the threshold.
        assert [w for w, _ in tags.tags] == ["red", "circle", "3"]
        assert [p for _, p in tags.tags] == pytest.approx(torch.sigmoid(torch.tensor([2.0, 0.6, 0.3])).tolist())
        assert tags.maps.shape == (3, grid, grid) and tags.maps_image.shape == (3, 64, 64)
        assert tags.describe() == "red 0.88, circle 0.65, 3 0.57"
        assert tags.to_dict()["min_probability"] == 0.5 and tags.to_dict()["min_margin"] == DEFAULT_MIN_MARGIN
    (lower,) = concepts(model, pixels[:1], top=10, min_probability=0.3)
    # Both pieces of "rec ##tangle" pass 0.3: shown as one word, at the lower probability.
    assert [w for w, _ in lower.tags] == ["red", "circle", "3", "rectangle"] and lower.maps is None
    assert lower.tags[-1][1] == pytest.approx(torch.sigmoid(torch.tensor(-0.45)).item())
    (capped,) = concepts(model, pixels[:1], top=2, min_probability=0.0)
    assert [w for w, _ in capped.tags] == ["red", "circle"]
    (default,) = concepts(model, pixels[:1])
    assert (default.min_probability, default.min_margin) == (DEFAULT_MIN_PROBABILITY, DEFAULT_MIN_MARGIN)
    assert all(p >= DEFAULT_MIN_PROBABILITY for _, p in default.tags)
    with pytest.raises(ValueError, match="min_probability"):
        concepts(model, pixels[:1], min_probability=1.5)
    with pytest.raises(ValueError, match="min_margin"):
        concepts(model, pixels[:1], min_margin=-0.1)


def test_an_image_with_no_tag_above_the_threshold_says_so(model, pixels):
    (none,) = concepts(model, pixels[:1], maps=True, min_probability=0.95)
    assert none.tags == [] and none.maps.shape[0] == 0
    assert none.describe() == f"none with probability >= 0.95 and >= {DEFAULT_MIN_MARGIN:g} above the image's background"
    assert none.to_dict()["tags"] == []


def test_explanations_json_lists_only_tags_that_pass(model, tmp_path):
    draw("red", "circle", size=64).save(tmp_path / "red.png")
    pairs = [(str(tmp_path / "red.png"), "a red circle")]
    summary = explain_pairs(model, pairs, tmp_path / "out", min_concept_probability=0.6)
    written = json.loads((tmp_path / "out" / "explanations.json").read_text())
    assert written["concepts_min_probability"] == 0.6 and written["concepts_min_margin"] == DEFAULT_MIN_MARGIN
    assert [w for w, _ in written["explanations"][0]["concepts"]] == ["red", "circle"]
    assert written == json.loads(json.dumps(summary))
    none = explain_pairs(model, pairs, tmp_path / "none", min_concept_probability=0.99)
    assert none["explanations"][0]["concepts"] == []
