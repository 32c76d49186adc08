"""Hand-worked examples for the reference caption / question cleaning rules."""

from __future__ import annotations

import pytest

from simla.tokenizers.captions import pre_caption, pre_question


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # lower-case, "!" deleted, "-" becomes a space
        ("A Red-Circle!", "a red circle"),
        # apostrophes are deleted, not replaced: "man's" -> "mans"
        ("The man's dog, (a puppy), runs.", "the mans dog a puppy runs"),
        # every deleted character at once; nothing else is left between the words
        ('x,.\'!?"()*#:;~y', "xy"),
        # "/" becomes a space and the resulting double space is collapsed
        ("cats/dogs - friends", "cats dogs friends"),
        # lower-casing happens first, so "<PERSON>" is caught by the literal "<person>" rule
        ("<PERSON> riding a horse", "person riding a horse"),
        ("a <person> and <person>", "a person and person"),
        # "<" and ">" alone are not deleted
        ("a <b> tag", "a <b> tag"),
        # runs of >= 2 whitespace chars of any kind collapse; ends are stripped
        ("  two \t\n spaces   here \n", "two spaces here"),
        # a trailing newline alone is stripped
        ("a cat\n", "a cat"),
        # a single tab is not a run of two, so it survives (and glues the words for truncation)
        ("a\tcat", "a\tcat"),
        # a leading tab survives strip(" ") (reference quirk)
        ("\ta cat", "\ta cat"),
        ("", ""),
        ("!!!", ""),
    ],
)
def test_pre_caption_examples(raw: str, expected: str) -> None:
    assert pre_caption(raw) == expected


def test_pre_caption_truncates_to_max_words() -> None:
    words = [f"w{i}" for i in range(40)]
    assert pre_caption(" ".join(words)) == " ".join(words[:30])
    assert pre_caption("One, two. Three four!", max_words=2) == "one two"
    # exactly max_words words is left alone
    assert pre_caption("a b c", max_words=3) == "a b c"


def test_pre_caption_is_idempotent() -> None:
    once = pre_caption("  A  <Person>'s Day-Out / at: the (beach)!!  ")
    assert once == "a persons day out at the beach"
    assert pre_caption(once) == once


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("What color is the Cat?", "what color is the cat"),
        # no whitespace collapsing for questions: the double space stays
        ("Is  it red?", "is  it red"),
        # "-" and "/" become spaces, which are then not collapsed
        ("Is it a t-shirt/top?", "is it a t shirt top"),
        # no <person> rule for questions
        ("Where is <PERSON>?", "where is <person>"),
        # only the right side is stripped, and only spaces
        ("  why?  ", "  why"),
        ("what is this?\n", "what is this\n"),
    ],
)
def test_pre_question_examples(raw: str, expected: str) -> None:
    assert pre_question(raw) == expected


def test_pre_question_truncates() -> None:
    words = [f"q{i}" for i in range(60)]
    assert pre_question(" ".join(words)) == " ".join(words[:50])
    assert pre_question("How many dogs are there?", max_words=3) == "how many dogs"


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="caption"):
        pre_caption(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="question"):
        pre_question(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_words"):
        pre_caption("a", max_words=0)
