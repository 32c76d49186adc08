"""Caption and question cleaning, exactly as the reference pipeline does it (docs/reference-behaviour.md).

The reference checkpoints were trained and evaluated on text cleaned this way, so the rules are
reproduced literally, quirks included (e.g. a single tab survives because only runs of two or more
whitespace characters are collapsed, and words are split on the space character only).
"""

from __future__ import annotations

import re

__all__ = ["pre_caption", "pre_question"]

# Step 2: punctuation that is deleted outright (not replaced by a space), so "don't" -> "dont".
_DELETED_CHARS = re.compile(r"[,.'!?\"()*#:;~]")
# Step 5: only runs of >= 2 whitespace characters are collapsed; a lone "\t" or "\n" is kept.
_WHITESPACE_RUN = re.compile(r"\s{2,}")


def _basic_clean(text: str) -> str:
    """Steps 1-3, shared by captions and questions: lower-case, delete punctuation, split on - and /."""
    # Lower-casing comes first, so "<PERSON>" later matches the literal "<person>" rule.
    text = _DELETED_CHARS.sub("", text.lower())
    return text.replace("-", " ").replace("/", " ")


def _truncate_words(text: str, max_words: int) -> str:
    """Keep the first ``max_words`` words, splitting on the space character only (as the reference)."""
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def _check_args(text: object, max_words: int, what: str) -> None:
    """Reject inputs that would otherwise fail deep inside ``re`` with an unhelpful message."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1:
        raise ValueError(f"max_words must be a positive int, got {max_words!r}")


def pre_caption(caption: str, max_words: int = 30) -> str:
    """Clean a caption as the reference ``pre_caption`` does (steps 1-7 below).

    1. lower-case; 2. delete ``, . ' ! ? " ( ) * # : ; ~``; 3. replace ``-`` and ``/`` with a space;
    4. replace the literal ``<person>`` with ``person``; 5. collapse runs of >= 2 whitespace characters
    to one space; 6. strip a trailing newline, then spaces at both ends; 7. keep the first ``max_words``
    space-separated words.

    Args:
        caption: the raw caption.
        max_words: how many space-separated words to keep (30 in pretraining).

    Returns:
        The cleaned caption (possibly empty).
    """
    _check_args(caption, max_words, "caption")
    text = _basic_clean(caption).replace("<person>", "person")
    text = _WHITESPACE_RUN.sub(" ", text)
    # rstrip("\n") before strip(" "): only newlines at the very end go, tabs/newlines at the start stay.
    text = text.rstrip("\n").strip(" ")
    return _truncate_words(text, max_words)


def pre_question(question: str, max_words: int = 50) -> str:
    """Clean a VQA question as the reference ``pre_question`` does (its question variant).

    Steps 1-3 of :func:`pre_caption`, then right-strip spaces and keep the first ``max_words``
    space-separated words. Unlike captions there is no whitespace collapsing and no ``<person>`` rule.

    Args:
        question: the raw question.
        max_words: how many words to keep (the reference uses 30 for training and 50 for testing).

    Returns:
        The cleaned question.
    """
    _check_args(question, max_words, "question")
    text = _basic_clean(question).rstrip(" ")
    return _truncate_words(text, max_words)
