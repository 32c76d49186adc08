"""The shared encoder: Hugging Face parity, modes, masks, attention capture."""

from __future__ import annotations

import pytest
import torch

import simla
from simla.config import TextConfig
from simla.models.bert import SharedEncoder


def test_text_mode_matches_transformers_bert(minilm_dir):
    from transformers import BertModel, BertTokenizerFast

    model = simla.create_model("simla_tiny", text_encoder=minilm_dir).eval()
    # Width and depth follow the checkpoint; cross-attention keys/values keep the image width.
    assert model.config.text.hidden_size == 384 and model.config.text.num_layers == 6
    assert model.text_encoder.layers[0].crossattention.self.key.in_features == model.config.vision.width
    reference = BertModel.from_pretrained(minilm_dir).eval()
    tokenizer = BertTokenizerFast.from_pretrained(minilm_dir)
    batch = tokenizer(["a red circle on a blue background", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.text_encoder(batch["input_ids"], attention_mask=batch["attention_mask"])
        theirs = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert ours.shape == theirs.shape == (2, batch["input_ids"].shape[1], 384)
    real = batch["attention_mask"].bool()
    assert (ours[real] - theirs[real]).abs().max().item() < 1e-4
    # Our own tokenizer (reference form: no [SEP]) on the same checkpoint also runs end to end.
    features = model.encode_text(["a red circle"])
    assert features.shape == (1, model.config.objectives.embed_dim)
    assert torch.allclose(features.norm(dim=-1), torch.ones(1), atol=1e-5)


def _encoder(**kw) -> SharedEncoder:
    config = TextConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, vocab_size=200,
                        max_position_embeddings=64, **kw)
    return SharedEncoder(config, encoder_width=48).eval()


def test_modes_and_cross_attention():
    enc = _encoder()
    ids = torch.randint(1, 200, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    image = torch.randn(2, 5, 48)
    text = enc(ids, mask)
    assert torch.equal(text, enc(ids, mask, mode="text", encoder_hidden_states=image))  # text mode ignores images
    fused = enc(ids, mask, encoder_hidden_states=image)
    assert fused.shape == (2, 7, 32) and not torch.allclose(fused, text)
    with pytest.raises(ValueError, match="mode"):
        enc(ids, mask, mode="multi_modal", encoder_hidden_states=image)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        enc(ids, mask, mode="multimodal")


def test_padding_does_not_change_real_tokens():
    enc = _encoder()
    ids = torch.randint(1, 200, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    a = enc(ids, torch.ones(1, 5, dtype=torch.long))
    b = enc(padded, torch.cat([torch.ones(1, 5), torch.zeros(1, 3)], 1).long())
    assert torch.allclose(a, b[:, :5], atol=1e-5)


def test_causal_mask_blocks_future_tokens():
    enc = _encoder()
    ids = torch.randint(1, 200, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    changed = ids.clone()
    changed[0, 4:] = 7
    a = enc(ids, mask, causal=True)
    b = enc(changed, mask, causal=True)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


def test_per_layer_image_choice():
    enc = _encoder()
    ids = torch.randint(1, 200, (2, 4))
    mask = torch.ones(2, 4, dtype=torch.long)
    img0, img1 = torch.randn(2, 5, 48), torch.randn(2, 5, 48)
    only0 = enc(ids, mask, encoder_hidden_states=[img0, img1], layer_image_index=[0, 0, 0])
    assert torch.allclose(only0, enc(ids, mask, encoder_hidden_states=img0), atol=1e-6)
    alternating = enc(ids, mask, encoder_hidden_states=[img0, img1])  # layer i -> image i % 2
    assert not torch.allclose(alternating, only0)


def test_cls_attention_row_and_capture_agree():
    enc = _encoder()
    ids = torch.randint(1, 200, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    image = torch.randn(2, 5, 48)
    hidden, row = enc.forward_with_cls_attention(ids, mask, layer=2, encoder_hidden_states=image)
    assert row.shape == (2, 2, 6)
    assert torch.allclose(row.sum(-1), torch.ones(2, 2), atol=1e-5)
    assert torch.all(row[1, :, 4:] == 0)  # padded keys get no attention
    attn = enc.layers[2].attention.self
    attn.capture = True
    hidden2 = enc(ids, mask, encoder_hidden_states=image)
    attn.capture = False
    assert torch.allclose(hidden, hidden2, atol=1e-5)
    assert torch.allclose(attn.saved_probs[:, :, 0], row, atol=1e-5)


def test_cross_attention_capture_keeps_gradients():
    enc = _encoder()
    ids = torch.randint(1, 200, (1, 4))
    image = torch.randn(1, 5, 48, requires_grad=True)
    cross = enc.layers[1].crossattention.self
    cross.capture = True
    enc(ids, torch.ones(1, 4, dtype=torch.long), encoder_hidden_states=image)[:, 0].sum().backward()
    assert cross.saved_probs.shape == (1, 2, 4, 5)
    assert cross.saved_probs_grad is not None and cross.saved_probs_grad.shape == cross.saved_probs.shape


def test_bad_hf_checkpoint_is_refused(tmp_path, minilm_dir):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    target = tmp_path / "bert"
    shutil.copytree(minilm_dir, target)
    state = load_file(str(target / "model.safetensors"))
    state["encoder.layer.0.intermediate.dense.weight"] = state["encoder.layer.0.intermediate.dense.weight"][:10]
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(ValueError, match="intermediate.dense.weight"):
        simla.create_model("simla_tiny", text_encoder=str(target))
    config = json.loads((target / "config.json").read_text())
    assert config["hidden_size"] == 384


def test_uniform_dropout_keeps_the_right_share_unbiased_and_only_in_training():
    from simla.models.bert import dropout

    torch.manual_seed(0)
    x = torch.rand(200_000) + 0.5
    out = dropout(x, 0.1, training=True, uniform=True)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    kept = out != 0
    torch.testing.assert_close(out[kept], x[kept] / 0.9)
    assert abs(out.mean().item() - x.mean().item()) < 0.01  # inverted dropout: unbiased
    assert dropout(x, 0.1, training=False, uniform=True) is x


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_draws_both_halves_of_each_integer_at_the_rate_independently(p):
    from simla.models.bert import keep_mask

    torch.manual_seed(0)
    mask = keep_mask(torch.empty(3, 100_001), p)  # odd size: the last integer's second half is unused
    assert mask.shape == (3, 100_001) and mask.dtype == torch.bool
    flat = mask.flatten()
    low, high = flat[0::2][:150_000].float(), flat[1::2][:150_000].float()  # the two halves of each draw
    for half in (low, high):
        assert abs(half.mean().item() - (1 - p)) < 0.005
    assert abs((low * high).mean().item() - (1 - p) ** 2) < 0.005  # halves are independent
    torch.manual_seed(0)
    assert torch.equal(keep_mask(torch.empty(3, 100_001), p), mask)  # torch's generator: seeded, repeatable


def test_attention_with_integer_dropout_masks_is_dropout_of_the_probabilities(monkeypatch):
    import math

    from simla.models import bert

    torch.manual_seed(0)
    attention = bert.AttentionProjections(hidden_size=32, num_heads=4, kv_width=16, dropout=0.25).train()
    attention.uniform_dropout = True
    hidden, context = torch.randn(2, 5, 32), torch.randn(2, 7, 16)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 5:] = False
    drawn = []
    real_keep_mask = bert.keep_mask
    monkeypatch.setattr(bert, "keep_mask", lambda like, p: drawn.append(real_keep_mask(like, p)) or drawn[-1])
    out, _ = attention(hidden, context, mask)

    heads = lambda x: x.view(2, -1, 4, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(attention.query(hidden)), heads(attention.key(context)), heads(attention.value(context))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1) * drawn[0] / 0.75) @ v
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(2, 5, 32))
    assert drawn[0].shape == (2, 4, 5, 7) and not drawn[0].all()


def test_execution_selects_the_dropout_sampler():
    fast = simla.create_model("simla_tiny", queue_size=8)
    reference = simla.create_model("simla_tiny", queue_size=8, execution="reference")
    for model, uniform in ((fast, True), (reference, False)):
        for encoder in (model.text_encoder, model.text_encoder_m):
            assert encoder.layers[0].attention.self.uniform_dropout is uniform
            assert encoder.layers[0].output.dropout.uniform is uniform
            assert encoder.embeddings.dropout.uniform is uniform


def test_output_positions_equal_the_full_pass_at_those_positions():
    torch.manual_seed(0)
    enc = SharedEncoder(TextConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
                        encoder_width=16).eval()
    tokens, text = torch.randn(3, 9, 32), torch.randn(3, 5, 16)
    positions = torch.tensor([[1, 4, 8], [2, 3, 0], [5, 6, 7]])
    full = enc(inputs_embeds=tokens, encoder_hidden_states=text)
    part = enc(inputs_embeds=tokens, encoder_hidden_states=text, output_positions=positions)
    assert part.shape == (3, 3, 32)
    torch.testing.assert_close(part, full.gather(1, positions[..., None].expand(-1, -1, 32)), atol=1e-5, rtol=1e-5)
