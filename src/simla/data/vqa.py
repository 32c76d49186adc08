"""VQA data in the reference JSON forms, checked record by record before any work starts.

Train: a list of {"image", "question", "answer": [str, ...] (VQA: every annotator's answer) or str (VG),
"dataset": "vqa" | "vg"}; `question_id` is optional. Answer weights as the reference computes them: each
distinct VQA answer weighs its share of the annotators (3 of 10 said "red": 0.3), a VG answer 0.5. A
record without a `dataset` tag counts as "vqa". Images are joined to `image_root` (VQA) or `vg_image_root`
(VG).
Eval: a list of {"image", "question", "question_id"} plus, when ground truth is known, "answer": [str, ...]
and optionally "answer_type" / "question_type" (for the per-type accuracy).
Answer list: a JSON list of candidate answer strings (the reference's answer_list.json).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DataError
from ..tokenizers.captions import pre_question
from ..tokenizers.text import tokenize_answers
from .images import BadSampleError, load_image
from .pretrain_data import image_reader
from .readers import DataFormatError
from .annotations import check_text, join_image_root, load_records, record_field
from .transforms import FinetuneView

logger = logging.getLogger(__name__)

DATASET_TAGS = ("vqa", "vg")
VG_ANSWER_WEIGHT = 0.5  # the reference's weight of a Visual Genome answer


@dataclass(frozen=True)
class VQARecord:
    image: str
    question: str  # cleaned as the reference cleans questions
    answers: tuple[str, ...]  # distinct answers
    weights: tuple[float, ...]  # one per answer
    origin: str  # "file[index]" for messages
    question_id: Any = None


@dataclass
class VQAEvalSet:
    images: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    question_ids: list[Any] = field(default_factory=list)
    answers: list[list[str] | None] = field(default_factory=list)  # ground truth, when the file has it
    answer_types: list[str | None] = field(default_factory=list)
    question_types: list[str | None] = field(default_factory=list)
    source: str = ""

    def __len__(self) -> int:
        return len(self.questions)

    @property
    def has_answers(self) -> bool:
        return bool(self.answers) and all(a is not None for a in self.answers)


def _error(path: str, index: int, key: str, message: str) -> DataFormatError:
    return DataFormatError(f"{path}, record {index}, field {key!r}: {message}", path=path, record=str(index), field=key)


def _question(path: str, index: int, obj: Any, max_words: int) -> str:
    question = pre_question(record_field(path, index, obj, "question", (str,)), max_words)
    if not question.strip():
        raise _error(path, index, "question", "empty question")
    return question


def _answers(path: str, index: int, obj: Any, key: str = "answer") -> list[str]:
    raw = record_field(path, index, obj, key, (str, list))
    answers = [raw] if isinstance(raw, str) else raw
    if not answers:
        raise _error(path, index, key, "empty answer list")
    for answer in answers:
        if not isinstance(answer, str) or not answer.strip():
            raise _error(path, index, key, f"answers must be non-empty strings, got {answer!r:.60}")
    return answers


def answer_weights(answers: Sequence[str], dataset: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Distinct answers and their weights: a VQA answer's share of the annotators, a VG answer 0.5."""
    if dataset == "vg":
        return (answers[0],), (VG_ANSWER_WEIGHT,)
    counts = Counter(answers)  # insertion-ordered: the first annotator's answer first
    return tuple(counts), tuple(n / len(answers) for n in counts.values())


def read_vqa_train(paths: str | os.PathLike | Sequence[str | os.PathLike], image_root: str | None = None,
                   vg_image_root: str | None = None, max_words: int = 30) -> list[VQARecord]:
    """Every training question of the file(s); a malformed record is an error naming file, record and field."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    records = []
    for path in map(str, paths):
        for i, obj in enumerate(load_records(path)):
            image = record_field(path, i, obj, "image", (str,))
            question = _question(path, i, obj, max_words)
            dataset = obj.get("dataset", "vqa")
            if dataset not in DATASET_TAGS:
                raise _error(path, i, "dataset", f"unknown dataset tag {dataset!r}; expected one of {list(DATASET_TAGS)}")
            answers, weights = answer_weights(_answers(path, i, obj), dataset)
            root = vg_image_root if dataset == "vg" else image_root
            records.append(VQARecord(join_image_root(root, image), question, answers, weights, f"{path}[{i}]",
                                     obj.get("question_id")))
    return records


def read_vqa_eval(path: str | os.PathLike, image_root: str | None = None, max_words: int = 50) -> VQAEvalSet:
    """An evaluation file; question ids must be present and unique (results are keyed by them)."""
    path = str(path)
    data = VQAEvalSet(source=path)
    seen: dict[Any, int] = {}
    for i, obj in enumerate(load_records(path)):
        image = record_field(path, i, obj, "image", (str,))
        question = _question(path, i, obj, max_words)
        question_id = record_field(path, i, obj, "question_id", (int, str))
        if question_id in seen:
            raise _error(path, i, "question_id", f"duplicate question id {question_id!r} (also record {seen[question_id]})")
        seen[question_id] = i
        data.images.append(join_image_root(image_root, image))
        data.questions.append(question)
        data.question_ids.append(question_id)
        data.answers.append(_answers(path, i, obj) if "answer" in obj else None)
        data.answer_types.append(obj.get("answer_type"))
        data.question_types.append(obj.get("question_type"))
    if not data.questions:
        raise DataFormatError(f"{path}: no questions to evaluate", path=path)
    return data


def read_answer_list(path: str | os.PathLike) -> list[str]:
    """The candidate answers: a JSON list of distinct, non-empty strings."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such answer list: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            answers = json.load(handle)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}", path=path) from err
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: not UTF-8 text (byte {err.start}); answer lists must be UTF-8 JSON",
                              path=path) from err
    if not isinstance(answers, list) or not answers:
        raise DataFormatError(f"{path}: the answer list must be a non-empty JSON list of strings", path=path)
    seen: set[str] = set()
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise DataFormatError(f"{path}, entry {i}: answers must be non-empty strings, got {answer!r:.60}",
                                  path=path, record=str(i))
        check_text(path, i, "answer", answer)
        if answer in seen:
            raise DataFormatError(f"{path}, entry {i}: duplicate answer {answer!r}", path=path, record=str(i))
        seen.add(answer)
    return answers


def overlapping_questions(data: VQAEvalSet, train: Sequence[VQARecord]) -> list[Any]:
    """Eval question ids that also occur in the training records (by id, or by image + question when the
    training records carry no ids): answers learnt by heart are no measure of a model."""
    train_ids = {r.question_id for r in train if r.question_id is not None}
    if train_ids:
        return [q for q in data.question_ids if q in train_ids]
    pairs = {(os.path.basename(r.image), r.question) for r in train}
    return [q for q, image, question in zip(data.question_ids, data.images, data.questions)
            if (os.path.basename(image), question) in pairs]


# ----------------------------------------------------------------------------------- batches
@dataclass
class VQASampleBuilder:
    view: FinetuneView

    def build(self, record: VQARecord, rng) -> dict[str, Any]:
        return {"image": self.view(image_reader(record), rng), "question": record.question,
                "answers": record.answers, "weights": record.weights}


def collate_vqa(samples: list[dict[str, Any]], tokenizer, max_length: int, sep_token_id: int) -> dict[str, Any]:
    """Stack images, tokenise questions (truncated to max_length) and every answer as `[CLS] a [SEP]`."""
    questions = tokenizer([s["question"] for s in samples], max_length=max_length, clean=False)
    answer_ids, answer_mask = tokenize_answers(tokenizer, [a for s in samples for a in s["answers"]], sep_token_id)
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "question_ids": questions.input_ids, "question_mask": questions.attention_mask,
        "answer_ids": answer_ids, "answer_mask": answer_mask,
        "answer_weights": torch.tensor([w for s in samples for w in s["weights"]], dtype=torch.float),
        "answer_counts": torch.tensor([len(s["answers"]) for s in samples], dtype=torch.long),
    }


def load_eval_image(path: str, view) -> tuple[torch.Tensor, str | None]:
    """(pixels, None), or a blank image and the reason when the file is unusable: the question is still
    answered (and counted), so the result file has every question."""
    try:
        return view(load_image(path)), None
    except BadSampleError as err:
        size = view.image_size
        return torch.zeros(3, size, size), f"{err.kind}: {err.reason}"


def check_overlap(data: VQAEvalSet, train: list[VQARecord], allow: bool) -> None:
    """Refuse an evaluation whose questions were trained on, unless allowed (then warn)."""
    overlap = overlapping_questions(data, train)
    if not overlap:
        return
    message = (f"{data.source}: {len(overlap)} question(s) also occur in the training data (e.g. {overlap[:5]}); "
               "accuracy on them measures memory, not answering")
    if not allow:
        raise DataError(message + ". Pass allow_overlap=true (--allow-overlap) to evaluate anyway.")
    logger.warning("%s (allowed)", message)
