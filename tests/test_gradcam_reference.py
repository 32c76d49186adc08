"""Grad-CAM (target="itm") against a computation written here, independent of the library's capture path.

The explained layer's cross-attention is replaced, for the duration of a test, by an attention written out in
this file (the layer's own projection weights, explicit softmax); the ITM positive logit's gradient with
respect to those probabilities comes from torch.autograd here and is itself checked by central finite
differences in float64. The library's maps must equal attention * relu(gradient), image [CLS] key dropped,
averaged over heads, then over the text's real tokens (whole text) or a word's pieces (word maps).
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

import simla
from simla.explain import gradcam

TEXTS = ["a red circle", "the big blue triangle on the left of a green square"]  # different lengths: padding
LAYER = 0  # simla_tiny has 2 encoder layers; the last one's word maps are all zero by construction


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return simla.create_model("simla_tiny", task="base").eval()


@pytest.fixture(scope="module")
def pixels(model):
    size = model.config.vision.image_size
    return torch.randn(len(TEXTS), 3, size, size, generator=torch.Generator().manual_seed(3))


@contextmanager
def hand_written_cross_attention(model, layer: int, kept: dict, offset: torch.Tensor | None = None):
    """Layer `layer`'s cross-attention computed here: q k^T / sqrt(d), softmax (kept in `kept["probs"]`), plus
    `offset` if given (for finite differences), times v, heads merged."""
    with model.text_encoder.capture_cross_attention(layer) as module:  # only to find the explained module
        pass

    def forward(hidden, context, mask, want_cls_row=False, context_index=None):
        assert not want_cls_row
        heads, width = module.num_heads, module.head_dim

        def split(x):
            return x.view(x.shape[0], x.shape[1], heads, width).transpose(1, 2)

        q = split(F.linear(hidden, module.query.weight, module.query.bias))
        k = split(F.linear(context, module.key.weight, module.key.bias))
        v = split(F.linear(context, module.value.weight, module.value.bias))
        if context_index is not None:
            k, v = k[context_index], v[context_index]
        scores = q @ k.transpose(-1, -2) / math.sqrt(width)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = scores.softmax(-1)
        kept["probs"] = probs
        if offset is not None:
            probs = probs + offset
        out = (probs @ v).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], heads * width)
        return out, None

    module.forward = forward  # an instance attribute: nn.Module.__call__ finds it before the class's method
    try:
        yield
    finally:
        del module.forward


def positive_logit_and_attention(model, pixels, ids, mask, offset=None):
    kept: dict = {}
    with torch.no_grad():
        tokens = model.visual_encoder(pixels)
    with hand_written_cross_attention(model, LAYER, kept, offset):
        logits = model.itm_logits(tokens, ids, mask)
    return logits[:, 1], kept["probs"]


def test_hand_written_attention_is_the_models_attention(model, pixels):
    ids, mask = model.tokenize(TEXTS)
    with torch.no_grad():
        own = model.itm_logits(model.visual_encoder(pixels), ids, mask)[:, 1]
        hand, probs = positive_logit_and_attention(model, pixels, ids, mask)
    torch.testing.assert_close(hand, own, atol=1e-5, rtol=1e-5)
    assert probs.shape[-1] == 1 + model.config.grid_size ** 2  # image [CLS] + patches


def test_autograd_gradient_matches_finite_differences_in_float64(model, pixels):
    model64 = copy.deepcopy(model).double()
    pixels64 = pixels.double()
    ids, mask = model64.tokenize(TEXTS)
    logit, probs = positive_logit_and_attention(model64, pixels64, ids, mask)
    (grad,) = torch.autograd.grad(logit.sum(), probs)
    # The entries with the largest gradients of pair 1, plus one of pair 0 (pairs do not interact).
    flat = grad[1].abs().flatten().topk(2).indices.tolist()
    entries = [(1, *torch.unravel_index(torch.tensor(i), grad[1].shape)) for i in flat]
    entries.append((0, *torch.unravel_index(grad[0].abs().flatten().argmax(), grad[0].shape)))
    eps = 1e-5
    for entry in entries:
        entry = tuple(int(i) for i in entry)
        offset = torch.zeros_like(probs)
        offset[entry] = eps
        with torch.no_grad():
            up, _ = positive_logit_and_attention(model64, pixels64, ids, mask, offset)
            down, _ = positive_logit_and_attention(model64, pixels64, ids, mask, -offset)
        numeric = float((up - down).sum() / (2 * eps))
        assert numeric == pytest.approx(float(grad[entry]), rel=1e-6, abs=1e-9), entry
        assert abs(numeric) > 1e-4  # a gradient that matters, not two zeros agreeing


def test_gradcam_maps_equal_attention_times_positive_gradient(model, pixels):
    ids, mask = model.tokenize(TEXTS)
    logit, probs = positive_logit_and_attention(model, pixels, ids, mask)
    (grad,) = torch.autograd.grad(logit.sum(), probs)
    assert (grad < 0).any() and (grad > 0).any()  # the clamp matters on this input
    token_maps = (probs.detach() * grad.clamp(min=0))[..., 1:].mean(1)  # (B, L, g*g)

    explanations = gradcam(model, pixels, TEXTS, layer=LAYER, target="itm")
    grid = model.config.grid_size
    assert [e.layer for e in explanations] == [LAYER, LAYER]
    with torch.no_grad():
        match = model.itm_score(pixels, TEXTS)
    for b, (text, explanation) in enumerate(zip(TEXTS, explanations)):
        real = int(mask[b].sum())
        assert real < mask.shape[1] or b == 1  # the short text is padded
        expected = token_maps[b, :real].mean(0).view(grid, grid)  # padding rows never count
        torch.testing.assert_close(explanation.text_map, expected, atol=1e-5, rtol=1e-5)
        assert explanation.text_map.abs().max() > 1e-4  # the comparison is not of two zero maps
        assert explanation.score == pytest.approx(float(match[b]), abs=1e-5)
        assert explanation.words == text.split()
        owners = torch.tensor(model.tokenizer.tokenize_words(text, 512).word_of_token)
        assert len(owners) == real
        for w in range(len(explanation.words)):
            word = token_maps[b, :real][owners == w].mean(0).view(grid, grid)
            torch.testing.assert_close(explanation.word_maps[w], word, atol=1e-5, rtol=1e-5)
    # Without `layer` the model's configured layer is explained: the same maps here.
    default = gradcam(model, pixels, TEXTS)
    assert model.config.gradcam_layer == LAYER
    for a, b in zip(default, explanations):
        torch.testing.assert_close(a.text_map, b.text_map)
