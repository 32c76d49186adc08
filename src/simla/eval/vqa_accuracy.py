"""VQA v2 accuracy, following the rules of the official VQA challenge evaluation (``vqaEval.py``).

How one question is scored:

1. Newlines and tabs in the prediction and in every ground-truth answer become spaces, and the ends are
   stripped. This always happens.
2. The rest of the normalisation runs only when the question's ground-truth answers (after step 1) are
   not all the same string. It then applies to both the ground truth and the prediction. This is a quirk
   of the official script and we keep it. With ten ground-truth answers ``"2"``, the prediction ``"two"``
   (or ``"Two"``) is compared as it is and scores 0. Even lower-casing is skipped.
3. Punctuation: each symbol of :data:`PUNCTUATION` is deleted if the original string has a space right
   before or after it, or has a digit-comma-digit run anywhere (so ``"3,000"`` becomes ``"3000"``).
   Otherwise each copy of the symbol becomes a space (``"t-shirt"`` becomes ``"t shirt"``). Then every
   ``'.'`` that is not followed by a digit is removed (``"st. louis"`` → ``"st louis"``, ``"3.5"`` stays).
   The official script removes at most 32 of these periods, because it passes ``re.UNICODE`` (== 32) as
   the ``count`` argument of ``re.sub``.
4. Words: the string is lower-cased and split on whitespace. Number words from "none"/"zero" to "ten"
   become digits, the articles "a"/"an"/"the" are dropped, and apostrophe-less spellings of contractions
   become the apostrophed form (see :data:`CONTRACTIONS`). The words are then joined with single spaces.
5. Each of the n ground-truth answers is left out in turn (by position, so only one copy of a repeated
   answer goes). That round scores ``min(1, matches among the other n-1 / 3)``, where a match means exact
   string equality. The question scores the mean over the n rounds. With ten answers, k matches give
   0, 0.3, 0.6 and 0.9 for k = 0..3, and 1.0 from k = 4 on.

The dataset figures are 100 × the mean question score: overall, per answer type and per question type.
They are rounded to 2 decimals as the official script does, and an unrounded copy is kept too.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CONTRACTIONS", "PUNCTUATION", "VQAGroundTruth", "format_vqa_table", "normalize_answer",
    "question_accuracy", "vqa_accuracy",
]

#: Symbols handled by the punctuation rule, in the official order. The apostrophe is not among them, so
#: contractions survive. The period is handled separately.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
# The official pattern is "(?!<=\d)(\.)(?!\d)". Its first group is a mistyped lookbehind: as a lookahead
# at a '.', it can never see "<=" there, so it never blocks a match. What is left is "a period not
# followed by a digit".
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32  # official: re.UNICODE (== 32) passed positionally as `count`

_NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The full (apostrophed) forms. Every spelling with exactly ONE of its apostrophes removed maps to the
# full form, e.g. "couldn't've" gives "couldnt've" and "couldn'tve" but not "couldntve". That is the
# pattern of the official table.
_FULL_FORMS: tuple[str, ...] = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll", "how's",
    "i'd", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am", "mightn't",
    "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock", "oughtn't",
    "'ow's'at", "shan't", "she'd", "she'd've", "she's", "should've", "shouldn't", "shouldn't've",
    "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've", "'twas",
    "wasn't", "we'd", "we'd've", "we're", "we've", "weren't", "what'll", "what're", "what's", "what've",
    "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've",
    "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all", "y'all'll",
    "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
# Spellings the official table does NOT rewrite, even though the rule above would produce them:
# - ordinary English words: "id", "shed", "wed", "were" (and, in case the forms above ever gain it's,
#   i'll, he'll, she'll or we'll: "its", "ill", "hell", "shell", "well");
# - "im", "ive", "id've", "i'dve": the official keys are written "Im", "Ive", "Id've", "I'dve". Words are
#   lower-cased before the lookup, so those keys never match;
# - "lets", "shes": the official table only has the no-op entries "let's" -> "let's" and "she's" -> "she's".
_NOT_REWRITTEN = frozenset({
    "id", "shed", "wed", "were", "its", "ill", "hell", "shell", "well",
    "im", "ive", "id've", "i'dve", "lets", "shes",
})


def _build_contractions() -> dict[str, str]:
    table: dict[str, str] = {}
    for full in _FULL_FORMS:
        for i, char in enumerate(full):
            if char == "'":
                table[full[:i] + full[i + 1:]] = full
    for spelling in _NOT_REWRITTEN:
        table.pop(spelling, None)
    # The official table has this entry the wrong way round: "somebody'd" -> "somebodyd". Both spellings
    # still meet at the same string, but normalize_answer's output depends on which way it goes.
    del table["somebodyd"]
    table["somebody'd"] = "somebodyd"
    return table


#: Word-level rewrites of step 4 (apostrophe-less spelling -> official form); same entries as the
#: official table (lower-case keys).
CONTRACTIONS: dict[str, str] = _build_contractions()


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _process_punctuation(text: str) -> str:
    # Every test looks at the ORIGINAL string, not at the one being edited (official behaviour).
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for symbol in PUNCTUATION:
        if delete_all or (symbol + " ") in text or (" " + symbol) in text:
            out = out.replace(symbol, "")
        else:
            out = out.replace(symbol, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _process_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word not in _ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Apply the full normalisation to one answer: whitespace, punctuation, then number words, articles
    and contractions. :func:`question_accuracy` applies this only when the ground truth disagrees."""
    return _process_words(_process_punctuation(_clean_whitespace(text)))


def question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official VQA accuracy of one prediction against the question's ground-truth answers, in [0, 1].

    Normalisation beyond whitespace happens only when the ground-truth answers are not all identical
    (official quirk: ``"two"`` against ten ``"2"`` scores 0.0). With a single ground-truth answer the
    leave-one-out rule leaves nothing to match, so the score is always 0, as in the official script.

    Raises:
        ValueError: if ``gt_answers`` is empty.
    """
    if len(gt_answers) == 0:
        raise ValueError("gt_answers is empty: a VQA question needs at least one ground-truth answer")
    answers = [_clean_whitespace(a) for a in gt_answers]
    pred = _clean_whitespace(prediction)
    if len(set(answers)) > 1:
        answers = [_process_words(_process_punctuation(a)) for a in answers]
        pred = _process_words(_process_punctuation(pred))
    hits = [answer == pred for answer in answers]
    total = sum(hits)
    # Leaving out answer i leaves total - hits[i] matches among the others.
    return sum(min(1.0, (total - hit) / 3) for hit in hits) / len(answers)


@dataclass
class VQAGroundTruth:
    """One question's ground truth: its answers (normally 10) and optional answer/question types."""

    question_id: int | str
    answers: list[str]
    answer_type: str | None = None
    question_type: str | None = None


def _summary(scores: list[float]) -> dict[str, Any]:
    exact = 100.0 * sum(scores) / len(scores)  # same operation order as the official script
    return {"accuracy": round(exact, 2), "accuracy_exact": exact, "questions": len(scores)}


def _describe(ids: list[Any]) -> str:
    shown = ", ".join(repr(i) for i in ids[:5])
    return f"{len(ids)} (e.g. {shown}{', ...' if len(ids) > 5 else ''})"


def vqa_accuracy(
    predictions: Mapping[int | str, str], ground_truth: Sequence[VQAGroundTruth]
) -> dict[str, Any]:
    """Score predictions (question id -> answer) against the ground truth, with the official rules.

    Returns ``{"accuracy", "accuracy_exact", "questions", "per_answer_type", "per_question_type"}``.
    Accuracies are percentages: ``accuracy`` is rounded to 2 decimals and ``accuracy_exact`` is not.
    Each per-type dict maps a type to ``{"accuracy", "accuracy_exact", "questions"}`` and only covers
    questions that have that type. It is empty when no question has one.

    Raises:
        ValueError: if the ground truth is empty or repeats a question id, if a ground-truth question has
            no prediction, or if there is a prediction for an id the ground truth lacks. The official
            script also requires the two id sets to be equal.
    """
    if len(ground_truth) == 0:
        raise ValueError("ground_truth is empty")
    gt_ids = [gt.question_id for gt in ground_truth]
    known = set(gt_ids)
    if len(known) != len(gt_ids):
        seen: set[Any] = set()
        dupes = [i for i in gt_ids if i in seen or seen.add(i)]
        raise ValueError(f"duplicate question ids in ground_truth: {_describe(list(dict.fromkeys(dupes)))}")
    problems = []
    missing = [i for i in gt_ids if i not in predictions]
    if missing:
        problems.append(f"missing predictions for {_describe(missing)} ground-truth questions")
    extra = [i for i in predictions if i not in known]
    if extra:
        problems.append(f"predictions for {_describe(extra)} question ids not in the ground truth")
    if problems:
        raise ValueError("; ".join(problems))

    scores: list[float] = []
    by_answer_type: dict[str, list[float]] = {}
    by_question_type: dict[str, list[float]] = {}
    for gt in ground_truth:
        score = question_accuracy(predictions[gt.question_id], gt.answers)
        scores.append(score)
        if gt.answer_type is not None:
            by_answer_type.setdefault(gt.answer_type, []).append(score)
        if gt.question_type is not None:
            by_question_type.setdefault(gt.question_type, []).append(score)
    return {
        **_summary(scores),
        "per_answer_type": {t: _summary(s) for t, s in sorted(by_answer_type.items())},
        "per_question_type": {t: _summary(s) for t, s in sorted(by_question_type.items())},
    }


def format_vqa_table(metrics: Mapping[str, Any]) -> str:
    """Render :func:`vqa_accuracy`'s result as an aligned plain-text table: overall, then answer types."""
    rows = [("overall", metrics["accuracy"], metrics["questions"])]
    rows += [(t, m["accuracy"], m["questions"]) for t, m in metrics.get("per_answer_type", {}).items()]
    width = max(len("answer type"), *(len(name) for name, _, _ in rows))
    lines = [f"{'answer type':<{width}}  {'accuracy':>8}  {'questions':>9}"]
    lines += [f"{name:<{width}}  {acc:>8.2f}  {n:>9d}" for name, acc, n in rows]
    return "\n".join(lines)
