"""VQA: decoder initialisation, the weighted/distilled answer loss, answer ranking, data checks, runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import simla
from simla.checkpoint import load_checkpoint, load_state_into, save_checkpoint
from simla.data.readers import DataFormatError
from simla.data.vqa import answer_weights, read_answer_list, read_vqa_eval, read_vqa_train
from simla.factory import build_model
from simla.models.vqa import add_decoder_init
from simla.tokenizers.text import tokenize_answers
from simla.task_objectives import answer_token_losses, weighted_answer_loss
from simla.tokenizers.text import get_tokenizer

from datasets import draw
from test_checkpoint import reference_pretrain_state

ANSWERS = ["red", "blue", "yes", "no", "light blue", "a red circle"]


@pytest.fixture(scope="module")
def tiny_config():
    return simla.get_config("simla_tiny", queue_size=16)


@pytest.fixture(scope="module")
def vqa_model(tiny_config):
    torch.manual_seed(0)
    model = build_model(simla.get_config("simla_tiny", queue_size=16), "vqa")
    model.tokenizer = get_tokenizer("bert-base-uncased")
    return model.eval()


# ------------------------------------------------------------------------ decoder initialisation
def test_decoder_layers_default_to_the_top_half_of_the_encoder(tiny_config):
    assert simla.get_config("simla_base").decoder_layers == 6
    assert tiny_config.decoder_layers == 1
    with pytest.raises(ValueError, match="vqa.decoder_layers"):
        simla.get_config("simla_tiny", decoder_layers=3)


@pytest.mark.parametrize("encoder_layers, decoder_layers", [(2, 1), (4, 2), (2, 2)])
def test_decoder_initialisation_map_on_reference_names(encoder_layers, decoder_layers):
    config = simla.get_config("simla_tiny", queue_size=16, **{"text.num_layers": encoder_layers},
                              decoder_layers=decoder_layers)
    state = reference_pretrain_state(config)
    mapped = add_decoder_init(state, decoder_layers)
    offset = encoder_layers - decoder_layers
    for suffix in ("", "_m"):
        for i in range(decoder_layers):
            for leaf in ("attention.self.query.weight", "crossattention.self.key.weight", "output.dense.bias"):
                source = state[f"text_encoder{suffix}.bert.encoder.layer.{i + offset}.{leaf}"]
                assert mapped[f"text_decoder{suffix}.bert.encoder.layer.{i}.{leaf}"] is source
        assert f"text_decoder{suffix}.bert.encoder.layer.{decoder_layers}.output.dense.bias" not in mapped
        assert (mapped[f"text_decoder{suffix}.bert.embeddings.word_embeddings.weight"]
                is state[f"text_encoder{suffix}.bert.embeddings.word_embeddings.weight"])
        # The MLM head is moved to the decoder (a VQA model has no MLM head of its own).
        assert mapped[f"text_decoder{suffix}.cls.predictions.bias"] is state[f"text_encoder{suffix}.cls.predictions.bias"]
        assert f"text_encoder{suffix}.cls.predictions.bias" not in mapped

    model = build_model(config, "vqa")
    report = load_state_into(model, state, source="reference")  # strict: every decoder tensor is found
    assert not report.missing and not report.mismatched
    top = state[f"text_encoder.bert.encoder.layer.{encoder_layers - 1}.crossattention.self.value.weight"]
    assert torch.equal(model.text_decoder.encoder.layer[decoder_layers - 1].crossattention.self.value.weight, top)
    assert torch.equal(model.answer_head.transform.dense.weight, state["text_encoder.cls.predictions.transform.dense.weight"])
    assert torch.equal(model.text_decoder.embeddings.word_embeddings.weight,
                       state["text_encoder.bert.embeddings.word_embeddings.weight"])


def test_our_pretraining_checkpoint_initialises_the_decoder_and_the_teachers_copy_after_loading(tmp_path, tiny_config):
    from simla.train.finetune_vqa import VQARecipe
    from simla.train.runner import TaskRun, load_task_model

    torch.manual_seed(1)
    pretrained = build_model(simla.get_config("simla_tiny", queue_size=16), "pretrain")
    with torch.no_grad():
        for p in pretrained.text_encoder_m.parameters():
            p.add_(1.0)  # teachers that differ from the students: they must not survive into the VQA model
    path = save_checkpoint(pretrained, tmp_path / "pretrain.pt")
    recipe = VQARecipe(checkpoint=str(path), train_file="unused.json", image_size=32)
    model = load_task_model(recipe, TaskRun(torch.device("cpu"), 0, 1, tmp_path, None))
    assert model.visual_encoder.pos_embed.shape[1] == 1 + 4 * 4  # resampled to the task resolution
    assert torch.equal(model.text_decoder.encoder.layer[0].intermediate.dense.weight,
                       pretrained.text_encoder.encoder.layer[1].intermediate.dense.weight)
    assert torch.equal(model.answer_head.bias, pretrained.mlm_head.bias)
    for online, teacher in model.momentum_pairs():
        for a, b in zip(online.parameters(), teacher.parameters()):
            assert torch.equal(a, b)


def test_vqa_checkpoint_loads_back_strictly(tmp_path, vqa_model):
    path = save_checkpoint(vqa_model, tmp_path / "vqa.pt")
    loaded = load_checkpoint(path)
    assert type(loaded).__name__ == "SimlaForVQA"
    for key, value in vqa_model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# ------------------------------------------------------------------------------------ the loss
def test_weighted_answer_loss_and_distillation_match_hand_computation():
    g = torch.Generator().manual_seed(0)
    vocab = 7
    ids = torch.tensor([[1, 4, 2, 0], [1, 5, 6, 2], [1, 3, 2, 0]])  # [CLS]=1, [SEP]=2, [PAD]=0
    mask = (ids != 0).long()
    logits = torch.randn(3, 3, vocab, generator=g)
    teacher = torch.randn(3, 3, vocab, generator=g)
    weights, alpha = torch.tensor([0.7, 0.3, 1.0]), 0.4

    def by_hand(row: int, with_teacher: bool) -> float:
        total = 0.0
        for t in range(ids.shape[1] - 1):
            target = int(ids[row, t + 1])
            if target == 0:
                continue
            log_p = F.log_softmax(logits[row, t], -1)
            nll = -float(log_p[target])
            if with_teacher:
                soft = F.softmax(teacher[row, t], -1)
                nll = (1 - alpha) * nll + alpha * -float((soft * log_p).sum())
            total += nll
        return total

    plain = answer_token_losses(logits, ids, mask)
    distilled = answer_token_losses(logits, ids, mask, teacher, alpha)
    for row in range(3):
        assert math.isclose(float(plain[row]), by_hand(row, False), rel_tol=1e-5)
        assert math.isclose(float(distilled[row]), by_hand(row, True), rel_tol=1e-5)
    # Two questions: answers 0-1 belong to the first, answer 2 to the second; divided by the questions.
    expected = sum(float(w) * by_hand(r, False) for r, w in enumerate(weights)) / 2
    assert math.isclose(float(weighted_answer_loss(plain, weights, 2)), expected, rel_tol=1e-5)


def _batch(model, questions=("what color is the shape", "is there a circle")):
    tokenizer = model.tokenizer
    q = tokenizer(list(questions), max_length=25, clean=False)
    answers, weights, counts = ["red", "light blue", "yes"], [0.6, 0.4, 1.0], [2, 1]
    a_ids, a_mask = tokenize_answers(tokenizer, answers, model.config.text.sep_token_id)
    return {"image": torch.randn(len(questions), 3, 64, 64, generator=torch.Generator().manual_seed(0)),
            "question_ids": q.input_ids, "question_mask": q.attention_mask, "answer_ids": a_ids, "answer_mask": a_mask,
            "answer_weights": torch.tensor(weights), "answer_counts": torch.tensor(counts)}


def test_answers_end_with_the_end_of_answer_token(vqa_model):
    ids, mask = tokenize_answers(vqa_model.tokenizer, ["red", "light blue"], sep_token_id=102)
    assert ids[0].tolist()[:3] == [101, vqa_model.tokenizer.backend.convert_tokens_to_ids("red"), 102]
    assert ids[0, 3] == 0 and mask[0].tolist() == [1, 1, 1, 0]
    assert ids[1, 3] == 102 and mask[1].tolist() == [1, 1, 1, 1]


def test_no_teacher_runs_when_alpha_is_zero_and_distillation_is_real_otherwise(tiny_config):
    torch.manual_seed(0)
    model = build_model(simla.get_config("simla_tiny", queue_size=16), "vqa")
    model.tokenizer = get_tokenizer("bert-base-uncased")
    model.train()
    batch = _batch(model)
    calls = []
    model.text_decoder_m.register_forward_hook(lambda *args: calls.append(1))
    before = model.text_decoder_m.encoder.layer[0].output.dense.weight.clone()
    with torch.no_grad():
        for p in model.answer_head_m.parameters():
            p.mul_(0.5)  # a teacher that disagrees with the student
    loss_plain = model(batch, alpha=0.0)["vqa"]
    assert calls == [] and torch.equal(model.text_decoder_m.encoder.layer[0].output.dense.weight, before)
    model.update_momentum = False
    loss_distilled = model(batch, alpha=0.4)["vqa"]
    assert calls == [1]
    assert not torch.isclose(loss_plain, loss_distilled)
    loss_distilled.backward()
    assert model.text_decoder.encoder.layer[0].output.dense.weight.grad is not None


# --------------------------------------------------------------------------------- answer ranking
def _brute_force_scores(model, states, q_mask, candidates) -> torch.Tensor:
    """Every (question, candidate) scored alone: the summed log-probability of its tokens."""
    scores = torch.empty(states.shape[0], len(candidates.answers))
    for q in range(states.shape[0]):
        for a in range(len(candidates.answers)):
            length = int(candidates.mask[a].sum())
            ids = candidates.ids[a:a + 1, :length]
            logits = model.next_token_logits(states[q:q + 1], q_mask[q:q + 1], ids, torch.ones_like(ids))
            log_p = F.log_softmax(logits[0], -1)
            scores[q, a] = sum(float(log_p[t, ids[0, t + 1]]) for t in range(length - 1))
    return scores


def test_ranking_equals_brute_force_scoring_of_every_candidate(vqa_model):
    batch = _batch(vqa_model)
    with torch.no_grad():
        states = vqa_model.encode_question(batch["image"], batch["question_ids"], batch["question_mask"])
        candidates = vqa_model.answer_candidates(ANSWERS)
        expected = _brute_force_scores(vqa_model, states, batch["question_mask"], candidates)
        index, scores = vqa_model.rank_answers(states, batch["question_mask"], candidates, k=len(ANSWERS),
                                               max_sequences=5)  # chunks that span questions
    assert torch.equal(index, expected.argsort(dim=1, descending=True))
    assert torch.allclose(scores, expected.sort(dim=1, descending=True).values, atol=1e-4)


def test_top_k_keeps_the_best_first_tokens_and_reference_scoring_counts_the_first_token_twice(vqa_model):
    batch = _batch(vqa_model)
    with torch.no_grad():
        states = vqa_model.encode_question(batch["image"], batch["question_ids"], batch["question_mask"])
        candidates = vqa_model.answer_candidates(ANSWERS)
        full = _brute_force_scores(vqa_model, states, batch["question_mask"], candidates)
        start = candidates.ids[:1, :1].expand(2, 1)
        first = vqa_model.next_token_logits(states, batch["question_mask"], torch.cat([start, start], 1),
                                            torch.ones(2, 2, dtype=torch.long))[:, 0].log_softmax(-1)
        first = first[:, candidates.ids[:, 1]]
        index, scores = vqa_model.rank_answers(states, batch["question_mask"], candidates, k=3)
        vqa_model.config.vqa.answer_scoring = "reference"
        try:
            ref_index, ref_scores = vqa_model.rank_answers(states, batch["question_mask"], candidates, k=3)
        finally:
            vqa_model.config.vqa.answer_scoring = "simla"
    for q in range(2):
        kept = set(first[q].topk(3).indices.tolist())
        assert set(index[q].tolist()) == kept
        assert torch.allclose(scores[q], full[q, index[q]], atol=1e-4)
        assert torch.allclose(ref_scores[q], full[q, ref_index[q]] + first[q, ref_index[q]], atol=1e-4)


def test_answer_returns_the_top_answers_with_probabilities(vqa_model):
    images = [draw("red", "dot"), draw("blue", "square")]
    result = vqa_model.answer(images, ["What colour is it?", "Is there a square?"], ANSWERS, top=3, k=4)
    assert len(result) == 2
    for answers in result:
        assert len(answers) == 3 and all(a in ANSWERS for a, _ in answers)
        probabilities = [p for _, p in answers]
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6


# ------------------------------------------------------------------------------------------ data
def _write(path: Path, records) -> str:
    path.write_text(json.dumps(records), encoding="utf-8")
    return str(path)


def test_answer_weights_follow_the_reference():
    assert answer_weights(["red", "red", "blue", "red"], "vqa") == (("red", "blue"), (0.75, 0.25))
    assert answer_weights(["a dog"], "vg") == (("a dog",), (0.5,))


@pytest.mark.parametrize("record, field, message", [
    ({"image": "a.png", "answer": ["red"]}, "question", "missing"),
    ({"image": "a.png", "question": "?!", "answer": ["red"]}, "question", "empty question"),
    ({"image": "a.png", "question": "what?", "answer": []}, "answer", "empty answer list"),
    ({"image": "a.png", "question": "what?", "answer": ["red", ""]}, "answer", "non-empty strings"),
    ({"image": "a.png", "question": "what?", "answer": "red", "dataset": "coco"}, "dataset", "unknown dataset tag"),
    ({"question": "what?", "answer": "red"}, "image", "missing"),
])
def test_malformed_training_records_name_file_record_and_field(tmp_path, record, field, message):
    good = {"image": "b.png", "question": "what color?", "answer": ["red"], "dataset": "vqa"}
    path = _write(tmp_path / "train.json", [good, record])
    with pytest.raises(DataFormatError, match=message) as err:
        read_vqa_train(path)
    assert err.value.path == path and err.value.record == "1" and err.value.field == field


def test_eval_files_need_unique_question_ids_and_answer_lists_need_strings(tmp_path):
    missing_id = _write(tmp_path / "a.json", [{"image": "a.png", "question": "what?"}])
    with pytest.raises(DataFormatError, match="question_id"):
        read_vqa_eval(missing_id)
    duplicate = _write(tmp_path / "b.json", [{"image": "a.png", "question": "what?", "question_id": 7}] * 2)
    with pytest.raises(DataFormatError, match="duplicate question id 7"):
        read_vqa_eval(duplicate)
    for bad, message in (({"red": 1}, "non-empty JSON list"), (["red", 3], "entry 1"), (["red", "red"], "duplicate")):
        with pytest.raises(DataFormatError, match=message):
            read_answer_list(_write(tmp_path / "answers.json", bad))
    assert read_answer_list(_write(tmp_path / "answers.json", ["red", "no"])) == ["red", "no"]


def test_vg_records_use_their_own_image_root(tmp_path):
    path = _write(tmp_path / "train.json", [{"image": "x.jpg", "question": "q?", "answer": "tree", "dataset": "vg"},
                                            {"image": "y.jpg", "question": "q?", "answer": ["no"] * 3}])
    vg, vqa = read_vqa_train(path, image_root="/coco", vg_image_root="/vg")
    assert vg.image == "/vg/x.jpg" and vg.weights == (0.5,)
    assert vqa.image == "/coco/y.jpg" and vqa.answers == ("no",) and vqa.weights == (1.0,)
