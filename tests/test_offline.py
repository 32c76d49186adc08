"""A fresh install works with no network: the default tokenizer is bundled, hub names fail in one line.

"Unreachable" here means every socket connection is refused (and the hub client is told it is offline
only where a test says so), so any code path that tried the network would fail loudly.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch

import simla
from simla.cli import main
from simla.errors import HubError
from simla.tokenizers.text import BUNDLED_VOCABULARIES, TextTokenizer

from datasets import make_pairs, write_json

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_network(monkeypatch):
    """Refuse every outgoing connection, and count the attempts."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: network disabled ({address})")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(None, address))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return attempts


def test_bundled_vocabulary_is_the_standard_uncased_one(no_network):
    lines = (BUNDLED_VOCABULARIES["bert-base-uncased"] / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 30522
    assert (lines[0], lines[100], lines[101], lines[102], lines[103]) == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
    tokenizer = simla.get_tokenizer()  # the default name
    assert tokenizer("A Red Circle!").input_ids.tolist() == [[101, 1037, 2417, 4418]]
    assert no_network == []


def test_bundled_vocabulary_matches_a_real_bert_checkpoint(minilm_dir):
    bundled, real = simla.get_tokenizer("bert-base-uncased"), TextTokenizer.from_pretrained(minilm_dir)
    text = ["Two dogs play near the Café; naïve über-fast 東京 rides, 42 unaffable emojis 😀"]
    assert torch.equal(bundled(text, max_length=64).input_ids, real(text, max_length=64).input_ids)


def test_encode_text_works_offline(no_network):
    model = simla.create_model("simla_tiny", queue_size=16).eval()
    features = model.encode_text(["a red circle", "a blue square"])
    assert features.shape == (2, model.config.objectives.embed_dim)
    assert torch.allclose(features.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert no_network == []


def test_readme_tiny_pretraining_example_runs_offline(tmp_path, no_network, monkeypatch, capsys):
    records = [{**r, "image": r["image"].removeprefix("images/")} for r in make_pairs(tmp_path, 16)]
    write_json(tmp_path / "pairs.json", records)  # paths relative to images/, as in the README
    monkeypatch.chdir(tmp_path)
    code = main(["pretrain", "--config", str(REPO / "configs" / "pretrain_tiny.yaml"), "train_file=pairs.json",
                 "image_root=images/", "output_dir=runs/tiny",
                 # Shrink the run; everything else is the README's command and the shipped recipe.
                 "max_steps=2", "batch_size=4", "num_workers=0", "kmeans_fit_images=8", "log_every=1",
                 "progress=false", "model_config.queue_size=8"])
    assert code == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "runs/tiny/log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert no_network == []


def test_hub_name_offline_fails_in_one_line(no_network, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="bert-large-cased"):
        simla.get_tokenizer("bert-large-cased")
    write_json(tmp_path / "pairs.json", make_pairs(tmp_path, 8))
    code = main(["pretrain", f"train_file={tmp_path / 'pairs.json'}", f"image_root={tmp_path / 'images'}",
                 "model=simla_tiny", "text_encoder=null", "vision_encoder=null", "tokenizer=bert-large-cased",
                 f"output_dir={tmp_path / 'run'}", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("simla: error: ") and err.count("\n") == 1 and "bert-large-cased" in err
    assert "Traceback" not in err
