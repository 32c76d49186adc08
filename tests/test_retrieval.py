"""Retrieval: the fine-tuning model, `simla finetune retrieval`, `simla evaluate retrieval`."""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import simla
from simla.cli import main
from simla.data.retrieval import read_retrieval_eval
from simla.eval.retrieval import compute_features, score_matrices

from datasets import make_pairs, write_json

RESULT_KEYS = {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"}


@pytest.fixture(scope="module")
def retrieval_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retrieval")
    pairs = make_pairs(root, 12)
    train = [{"image": p["image"], "caption": c, "image_id": f"id{i}"}
             for i, p in enumerate(pairs) for c in ([p["caption"]] if isinstance(p["caption"], str) else p["caption"])]
    write_json(root / "train.json", train)
    write_json(root / "test.json", [{"image": p["image"], "caption": [p["caption"]] if isinstance(p["caption"], str)
                                     else p["caption"]} for p in pairs])
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, minilm_dir) -> Path:
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", queue_size=32, **{"text.tokenizer": minilm_dir})
    return simla.save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "pretrain.pt")


def test_retrieval_model_uses_image_ids(minilm_dir):
    torch.manual_seed(0)
    model = simla.create_model("simla_tiny", task="retrieval", queue_size=10)
    assert not hasattr(model, "mim_head") and model.visual_encoder.mask_token is None
    g = torch.Generator().manual_seed(0)
    image_id = torch.tensor([0, 0, 1, 1, 2, 2])
    batch = {"image": torch.randn(6, 3, 64, 64, generator=g), "text_ids": torch.randint(1000, 2000, (6, 7), generator=g),
             "text_mask": torch.ones(6, 7, dtype=torch.long), "image_id": image_id}
    batch["text_ids"][:, 0] = 101
    for _ in range(3):
        out = model(batch)
        assert set(out) == {"itc", "itm"} and all(torch.isfinite(v) for v in out.values())
        # ITM negatives never share the image id of their positive.
        assert not torch.any(image_id[out.itm_negative_images] == image_id)
        assert not torch.any(image_id[out.itm_negative_texts] == image_id)
    # The image ids are enqueued with the features (A2): 3 steps x 6 into a queue of 10.
    assert int(model.queue_ptr) == 18 % 10
    # columns 0-5, then 6-9 and 0-1, then 2-7
    assert model.idx_queue[0].tolist() == [2, 2, 0, 0, 1, 1, 2, 2, 1, 1]
    out.total.backward()


def test_retrieval_shared_and_reference_executions_agree():
    # Without dropout both layouts draw the same negatives: same losses and gradients.
    losses, grads = {}, {}
    for plan in ("simla", "reference"):
        torch.manual_seed(0)
        model = simla.create_model("simla_tiny", task="retrieval", queue_size=10, execution=plan,
                                   hidden_dropout=0.0, attention_dropout=0.0)
        g = torch.Generator().manual_seed(0)
        batch = {"image": torch.randn(6, 3, 64, 64, generator=g),
                 "text_ids": torch.randint(1000, 2000, (6, 7), generator=g),
                 "text_mask": torch.ones(6, 7, dtype=torch.long), "image_id": torch.tensor([0, 0, 1, 1, 2, 2])}
        torch.manual_seed(1)
        out = model(batch)
        out.total.backward()
        losses[plan] = {k: v.detach() for k, v in out.items()}
        grads[plan] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for name in ("itc", "itm"):
        torch.testing.assert_close(losses["simla"][name], losses["reference"][name], atol=1e-6, rtol=1e-5)
    for name, grad in grads["simla"].items():
        torch.testing.assert_close(grad, grads["reference"][name], atol=1e-6, rtol=1e-4, msg=name)


def test_batched_itm_reranking_equals_one_query_at_a_time(retrieval_data, pretrained):
    model = simla.load_checkpoint(pretrained, task="base").eval()
    data = read_retrieval_eval(retrieval_data / "test.json", str(retrieval_data))
    features = compute_features(model, data, num_workers=0)
    batched = score_matrices(model, features, k=5, batch_size=7, method="batched")
    single = score_matrices(model, features, k=5, batch_size=1, method="batched")
    grouped = score_matrices(model, features, k=5)  # the default: distinct pairs, per-image keys/values
    for a, b, c in zip(batched, single, grouped):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(c, b, atol=1e-5)
    i2t, t2i = grouped
    assert ((i2t != -100).sum(1) == 5).all() and ((t2i != -100).sum(1) == 5).all()
    # The reference's loop: one query at a time, its k candidates in one forward.
    f = features
    for i in range(i2t.shape[0]):
        texts = (i2t[i] != -100).nonzero().squeeze(1)
        alone = model.itm_logits(f.image_tokens[i:i + 1].expand(len(texts), -1, -1), f.text_ids[texts],
                                 f.text_mask[texts])[:, 1]
        assert torch.allclose(i2t[i, texts], alone, atol=1e-5)


def test_streamed_image_tokens_give_the_same_scores(retrieval_data, pretrained):
    model = simla.load_checkpoint(pretrained, task="base").eval()
    data = read_retrieval_eval(retrieval_data / "test.json", str(retrieval_data))
    kept = compute_features(model, data, num_workers=0)
    streamed = compute_features(model, data, num_workers=0, keep_image_tokens=False)
    assert isinstance(kept.image_tokens, torch.Tensor) and callable(streamed.image_tokens)
    for a, b in zip(score_matrices(model, kept, k=4), score_matrices(model, streamed, k=4)):
        assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="in memory"):
        score_matrices(model, streamed, k=4, method="batched")


def test_grouped_pair_scores_handle_padding_chunks_and_order(pretrained):
    from simla.eval.pair_scores import itm_pair_scores

    model = simla.load_checkpoint(pretrained, task="base").eval()
    g = torch.Generator().manual_seed(3)
    tokens = model.visual_encoder(torch.randn(4, 3, 64, 64, generator=g)).detach()
    ids = torch.randint(1000, 5000, (6, 11), generator=g)
    ids[:, 0] = 101
    mask = (torch.arange(11)[None] < torch.tensor([11, 3, 7, 2, 9, 5])[:, None]).long()
    ids = ids * mask
    images = torch.tensor([3, 0, 3, 1, 3, 0, 2, 3, 3])
    texts = torch.tensor([5, 1, 0, 2, 3, 4, 1, 1, 2])
    got = itm_pair_scores(model, tokens, ids, mask, images, texts, max_texts=2)  # chunks cut an image's texts
    with torch.no_grad():
        alone = torch.stack([model.itm_logits(tokens[i:i + 1], ids[t:t + 1], mask[t:t + 1])[0, 1]
                             for i, t in zip(images.tolist(), texts.tolist())])
    assert torch.allclose(got, alone, atol=1e-5)
    streamed = itm_pair_scores(model, lambda i: tokens[i], ids, mask, images, texts)
    assert torch.allclose(streamed, got, atol=1e-6)
    bf16 = itm_pair_scores(model, tokens, ids, mask, images, texts, precision="bf16")
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, got, atol=0.05)
    assert itm_pair_scores(model, tokens, ids, mask, images[:0], texts[:0]).shape == (0,)
    with pytest.raises(ValueError, match="1-D index tensors"):
        itm_pair_scores(model, tokens, ids, mask, images, texts[:3])



def test_zero_shot_evaluation_command(tmp_path, retrieval_data, pretrained, capsys):
    for extra in ([], ["--itc-only"]):
        out = tmp_path / ("itc" if extra else "itm")
        assert main(["evaluate", "retrieval", "--checkpoint", str(pretrained), "--data",
                     str(retrieval_data / "test.json"), "--image-root", str(retrieval_data), "--output", str(out),
                     "--k", "4", "--num-workers", "0", "--image-size", "96", *extra]) == 0
        results = json.loads((out / "results.json").read_text())
        assert set(results) == RESULT_KEYS
        assert all(0 <= v <= 100 for v in results.values())
    assert "R@1" in capsys.readouterr().out


def test_images_without_captions_are_rejected(tmp_path, retrieval_data):
    path = write_json(tmp_path / "bad.json", [{"image": "images/img000.png", "caption": []}])
    with pytest.raises(ValueError, match="no captions"):
        read_retrieval_eval(path, str(retrieval_data))


def test_finetune_command_resamples_and_evaluates(tmp_path, retrieval_data, pretrained, minilm_dir):
    out = tmp_path / "ft"
    args = ["finetune", "retrieval", f"checkpoint={pretrained}", f"train_file={retrieval_data / 'train.json'}",
            f"test_file={retrieval_data / 'test.json'}", f"image_root={retrieval_data}", "image_size=96",
            "batch_size=4", "max_steps=3", "num_workers=0", "k_test=4", f"output_dir={out}", "log_every=1",
            "save_every=3", "progress=false", "device=cpu", f"tokenizer={minilm_dir}"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    model = simla.load_checkpoint(out / "checkpoints" / "last.pt")
    assert isinstance(model, simla.models.retrieval.SimlaForRetrieval)
    assert model.visual_encoder.pos_embed.shape[1] == 1 + 12 * 12  # 64 px pretraining -> 96 px
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


def test_evaluation_under_torchrun_splits_rows_and_equals_one_process(tmp_path, retrieval_data, pretrained):
    common = ["evaluate", "retrieval", "--checkpoint", str(pretrained), "--data", str(retrieval_data / "test.json"),
              "--image-root", str(retrieval_data), "--k", "4", "--num-workers", "0", "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "simla.cli", "-v", *common, "--output", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # A process group was formed and each rank scored the pairs of its own images (every other image) ...
    shares = [re.search(rf"rank {r} of 2 scores (\d+) of (\d+) distinct pairs", proc.stderr) for r in (0, 1)]
    assert all(shares), proc.stderr[-3000:]
    assert int(shares[0][1]) + int(shares[1][1]) == int(shares[0][2]) and int(shares[0][1]) > 0 < int(shares[1][1])
    # ... and only rank 0 reported and wrote the results, which equal the one-process evaluation.
    assert proc.stdout.count("wrote ") == 1
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two == pytest.approx(one)


class OracleITM:
    """Stands in for the model's ITM head: the positive logit says whether the pair truly matches.

    Image i's tokens carry i and text t's ids carry t, so the scorer can tell which pair it was handed;
    `inverted` makes it a broken head that prefers the wrong pairs.
    """

    def __init__(self, txt2img: list[int], inverted: bool = False) -> None:
        self.txt2img, self.inverted = torch.tensor(txt2img), inverted

    def itm_logits(self, image_tokens, input_ids, attention_mask):
        match = (self.txt2img[input_ids[:, 1]] == image_tokens[:, 0, 0].long()).float()
        positive = 1.0 - match if self.inverted else match
        return torch.stack([1.0 - positive, positive], dim=1)


def test_itm_rescoring_decides_the_recalls_in_both_directions():
    from simla.eval.metrics import retrieval_metrics
    from simla.eval.retrieval import RetrievalFeatures

    txt2img = [0, 0, 1, 2, 2, 2, 3, 4, 4, 5]
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(6)]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(6, 3, 8, generator=g)
    tokens[:, 0, 0] = torch.arange(6).float()
    ids = torch.randint(1000, 2000, (10, 5), generator=g)
    ids[:, 1] = torch.arange(10)
    # ITC features that rank every query's true match last: only the ITM re-scoring can recover it.
    image_feat = torch.nn.functional.one_hot(torch.arange(6), 6).float()
    text_feat = -image_feat[txt2img] + 0.01 * torch.randn(10, 6, generator=g)
    features = RetrievalFeatures(image_feat, tokens, text_feat, ids, torch.ones_like(ids))

    def metrics(scorer, **kwargs):
        return retrieval_metrics(*score_matrices(scorer, features, method="batched", **kwargs), txt2img, img2txt)

    itc = metrics(OracleITM(txt2img), itc_only=True)
    assert itc["txt_r1"] == 0.0 and itc["img_r1"] == 0.0
    itm = metrics(OracleITM(txt2img), k=10)
    assert itm["txt_r1"] == 100.0 and itm["img_r1"] == 100.0
    broken = metrics(OracleITM(txt2img, inverted=True), k=10)
    assert broken["txt_r1"] == 0.0 and broken["img_r1"] == 0.0
    # With k=2 the true match is outside every query's candidates, so re-scoring cannot lift it to the top.
    narrow = metrics(OracleITM(txt2img), k=2)
    assert narrow["txt_r1"] == 0.0 and narrow["img_r1"] == 0.0
