"""Official VQA v2 accuracy (simla.eval.vqa_accuracy): expected values worked out by hand from the rules."""

from __future__ import annotations

import pytest

from simla.eval.vqa_accuracy import (
    CONTRACTIONS,
    VQAGroundTruth,
    format_vqa_table,
    normalize_answer,
    question_accuracy,
    vqa_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two", "2"),
        ("one two three", "1 2 3"),
        ("ten", "10"),
        ("none", "0"),
        ("zero", "0"),
        ("a dog", "dog"),
        ("The Dog", "dog"),
        ("an", ""),
        ("yes!", "yes"),
        ("t-shirt", "t shirt"),  # no space next to '-': it becomes a space
        ("yes - x-ray", "yes xray"),  # " -" in the ORIGINAL string: every '-' is deleted
        ("3,000", "3000"),
        ("1,2 and a-b", "12 and ab"),  # a digit-comma-digit run deletes ALL punctuation symbols
        ("red, blue", "red blue"),
        ("st. louis", "st louis"),
        ("3.5", "3.5"),
        ("1.", "1"),
        ("dr. who?", "dr who"),
        (" yes\n", "yes"),
        ("\tred\tcar ", "red car"),
        ("red\n\ncar", "red car"),
        ("x" + "." * 40, "x" + "." * 8),  # at most 32 periods are removed (official count=re.UNICODE)
        ("dont", "don't"),
        ("Isnt", "isn't"),
        ("youre", "you're"),
        ("hes", "he's"),
        ("whos", "who's"),
        ("couldnt've", "couldn't've"),
        ("couldn'tve", "couldn't've"),
        ("couldntve", "couldntve"),  # only one apostrophe may be missing
        ("yall", "y'all"),
        ("twas", "'twas"),
        ("somebody'd", "somebodyd"),  # the official entry points the wrong way
        ("im", "im"),  # official keys "Im"/"Ive" are capitalised and never match lower-cased words
        ("ive", "ive"),
        ("lets", "lets"),
        ("its", "its"),
        ("well", "well"),
        ("don't", "don't"),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_contraction_exclusions() -> None:
    for word in ("its", "id", "ill", "hell", "shell", "well", "were", "wed", "shed", "im", "ive", "lets"):
        assert word not in CONTRACTIONS
    assert CONTRACTIONS["dont"] == "don't"
    assert CONTRACTIONS["wont"] == "won't"
    assert CONTRACTIONS["y'all'dve"] == "y'all'd've"
    assert len(CONTRACTIONS) == 114  # the number of usable entries in the official table


def _mixed(hits: int, answer: str, filler: str = "other") -> list[str]:
    return [answer] * hits + [filler] * (10 - hits)


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("Two", ["2"] * 9 + ["3"], 1.0),  # answers disagree, so "Two" -> "2": 9 matches
        ("two", ["2"] * 10, 0.0),  # official quirk: identical answers, no normalisation
        ("Yes", ["yes"] * 10, 0.0),  # ... not even lower-casing
        ("2", ["2"] * 10, 1.0),
        (" yes\n", ["yes"] * 10, 1.0),  # whitespace cleaning always applies
        ("yes\t", ["yes\t"] * 9 + [" yes"], 1.0),
        ("dog", ["a dog"] * 3 + ["cat"] * 7, 0.9),
        ("the dog", ["dog"] * 4 + ["cat"] * 6, 1.0),
        ("dont", ["don't"] * 2 + ["no"] * 8, 0.6),
        ("t shirt", ["t-shirt"] + ["shirt"] * 9, 0.3),
        ("3000", ["3,000"] * 4 + ["3"] * 6, 1.0),
        ("st louis", ["st. louis"] * 3 + ["chicago"] * 7, 0.9),
        ("3.5", ["3.5"] * 2 + ["35"] * 8, 0.6),
        ("35", ["3.5"] * 2 + ["35"] * 8, 1.0),
        ("1", ["1."] * 3 + ["2"] * 7, 0.9),
        ("ten", ["10"] * 2 + ["9"] * 8, 0.6),
        ("none", ["0"] + ["1"] * 9, 0.3),
        ("im", ["i'm"] * 5 + ["no"] * 5, 0.0),
        ("cat", ["dog"] * 5 + ["bird"] * 5, 0.0),
    ],
)
def test_question_accuracy_cases(prediction: str, answers: list[str], expected: float) -> None:
    assert question_accuracy(prediction, answers) == pytest.approx(expected, abs=1e-12)


# k matches among 10: (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
@pytest.mark.parametrize(
    ("hits", "expected"),
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (9, 1.0), (10, 1.0)],
)
def test_match_count_rule(hits: int, expected: float) -> None:
    assert question_accuracy("yes", _mixed(hits, "yes", "no")) == pytest.approx(expected, abs=1e-12)


def test_leave_one_out_removes_a_single_copy() -> None:
    # Removing every copy of a left-out answer would give 8 * (2/3) / 10 = 0.5333 instead of 0.6.
    assert question_accuracy("yes", ["yes", "yes"] + ["no"] * 8) == pytest.approx(0.6, abs=1e-12)
    # Three answers: left-out "yes" -> 1 match (1/3) twice, left-out "no" -> 2 matches (2/3): 4/9.
    assert question_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(4 / 9, abs=1e-12)
    assert question_accuracy("yes", ["yes"]) == 0.0  # nothing left to match


def test_question_accuracy_rejects_empty_ground_truth() -> None:
    with pytest.raises(ValueError, match="empty"):
        question_accuracy("yes", [])


def _dataset() -> tuple[dict[int, str], list[VQAGroundTruth]]:
    gts = [
        VQAGroundTruth(1, ["yes"] * 10, "yes/no", "is the"),  # 1.0
        VQAGroundTruth(2, ["yes"] * 10, "yes/no", "is the"),  # 0.0
        VQAGroundTruth(3, ["2"] * 2 + ["3"] * 8, "number", "how many"),  # 0.6
        VQAGroundTruth(4, ["red"] + ["blue"] * 9, "other", "what color"),  # 0.3
        VQAGroundTruth(5, ["red", "red", "blue"], "other", "what color"),  # 4/9
    ]
    return {1: "yes", 2: "no", 3: "two", 4: "Red", 5: "red"}, gts


def test_vqa_accuracy_aggregates() -> None:
    predictions, gts = _dataset()
    result = vqa_accuracy(predictions, gts)
    # overall: 100 * (1 + 0 + 0.6 + 0.3 + 4/9) / 5 = 46.888...
    assert result["accuracy"] == 46.89
    assert result["accuracy_exact"] == pytest.approx(100 * (1.9 + 4 / 9) / 5, abs=1e-9)
    assert result["questions"] == 5
    per_answer = {t: (m["accuracy"], m["questions"]) for t, m in result["per_answer_type"].items()}
    assert per_answer == {"number": (60.0, 1), "other": (37.22, 2), "yes/no": (50.0, 2)}
    per_question = {t: (m["accuracy"], m["questions"]) for t, m in result["per_question_type"].items()}
    assert per_question == {"how many": (60.0, 1), "is the": (50.0, 2), "what color": (37.22, 2)}
    assert result["per_answer_type"]["other"]["accuracy_exact"] == pytest.approx(100 * (0.3 + 4 / 9) / 2)


def test_vqa_accuracy_without_types_and_with_string_ids() -> None:
    gts = [VQAGroundTruth("a", ["yes"] * 10), VQAGroundTruth("b", ["dog"] * 3 + ["cat"] * 7)]
    result = vqa_accuracy({"a": "yes", "b": "dog"}, gts)
    assert result["accuracy"] == 95.0
    assert result["per_answer_type"] == {}
    assert result["per_question_type"] == {}


def test_missing_predictions_raise() -> None:
    predictions, gts = _dataset()
    del predictions[4]
    with pytest.raises(ValueError, match=r"missing predictions for 1 \(e\.g\. 4\)"):
        vqa_accuracy(predictions, gts)
    many = [VQAGroundTruth(i, ["yes"] * 10) for i in range(7)]
    with pytest.raises(ValueError, match=r"missing predictions for 7 \(e\.g\. 0, 1, 2, 3, 4, \.\.\.\)"):
        vqa_accuracy({}, many)


def test_extra_predictions_raise() -> None:
    predictions, gts = _dataset()
    predictions[99] = "yes"
    with pytest.raises(ValueError, match=r"predictions for 1 \(e\.g\. 99\) question ids not in"):
        vqa_accuracy(predictions, gts)
    with pytest.raises(ValueError, match="not in the ground truth"):
        vqa_accuracy({**predictions, "3": "two"}, gts)  # "3" is not 3


def test_bad_ground_truth_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy({}, [])
    gts = [VQAGroundTruth(1, ["yes"] * 10), VQAGroundTruth(1, ["no"] * 10)]
    with pytest.raises(ValueError, match="duplicate question ids"):
        vqa_accuracy({1: "yes"}, gts)


def test_format_vqa_table() -> None:
    predictions, gts = _dataset()
    table = format_vqa_table(vqa_accuracy(predictions, gts))
    assert table.splitlines() == [
        "answer type  accuracy  questions",
        "overall         46.89          5",
        "number          60.00          1",
        "other           37.22          2",
        "yes/no          50.00          2",
    ]
