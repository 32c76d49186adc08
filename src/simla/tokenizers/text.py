"""BERT WordPiece text tokenizer producing the reference SIMLA sequence form.

The reference (ALBEF's modified BertTokenizer) encodes a single sequence as ``[CLS] w1 ... wn`` with
**no trailing [SEP]**, right-padded with [PAD]=0. Reference checkpoints only ever saw that form, so we
reproduce it on top of a stock Hugging Face ``BertTokenizerFast``: the wordpieces come from the fast
tokenizer with ``add_special_tokens=False`` and we add [CLS] and the padding ourselves. Doing the special
tokens by hand keeps the output identical across transformers versions (whose post-processors differ).
The standard uncased WordPiece vocabulary (30,522 entries, the one every BERT-base uncased checkpoint
uses) ships with simla, so the default name ``"bert-base-uncased"`` needs no network; any other name is a
local directory or a Hugging Face hub id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
# transformers >= 5 exports this lazily (an alias of BertTokenizer); its stubs do not list it.
from transformers import BertTokenizerFast  # type: ignore[attr-defined]

from .captions import pre_caption
from ..errors import HubError, InvalidTextError
from ..unicode_text import describe_surrogate, lone_surrogate

__all__ = ["TextTokenizer", "TokenizedText", "WordPieces", "get_tokenizer"]

logger = logging.getLogger(__name__)

#: ``pre_caption`` word cap applied when ``clean=True`` (the reference pretraining value).
CAPTION_MAX_WORDS = 30
#: Reference pretraining text length, [CLS] included.
DEFAULT_MAX_LENGTH = 25
#: Files fetched from the hub: only what a WordPiece tokenizer needs, never model weights.
_HUB_TOKENIZER_FILES = [
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
]
_TRUE_VALUES = {"1", "on", "yes", "true"}
#: Vocabularies shipped with simla, by the hub name they stand for. The file is the 30,522-line vocab.txt
#: of bert-base-uncased (identical in every uncased BERT-base checkpoint), so resolving the name locally
#: gives exactly the tokenizer the hub would, offline.
BUNDLED_VOCABULARIES = {"bert-base-uncased": Path(__file__).parent / "vocab" / "bert-base-uncased"}


@dataclass(frozen=True)
class TokenizedText:
    """A padded batch of token ids.

    Attributes:
        input_ids: (B, L) long tensor, ``[CLS] wordpieces [PAD]...``.
        attention_mask: (B, L) long tensor, 1 on real tokens (including [CLS]), 0 on padding.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError(
                "input_ids and attention_mask must both be (B, L); got "
                f"{tuple(self.input_ids.shape)} and {tuple(self.attention_mask.shape)}"
            )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenizedText:
        """Return a copy with both tensors moved to ``device``."""
        return TokenizedText(
            self.input_ids.to(device, non_blocking=non_blocking),
            self.attention_mask.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        """The batch size B."""
        return int(self.input_ids.shape[0])


@dataclass(frozen=True)
class WordPieces:
    """One text's token ids with, for each token, the index of the typed word it belongs to ([CLS]: -1)."""

    ids: list[int]
    word_of_token: list[int]
    words: list[str]
    truncated: bool  # the text had more tokens than max_length allowed


def _offline_requested() -> bool:
    """Whether hub access is disabled.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once at import time; we also read the environment now,
    so setting the variable later in the process (e.g. in a launcher or a test) still takes effect.
    """
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except (ImportError, AttributeError):  # very old/new hub layouts: fall back to the environment
        pass
    return any(
        os.environ.get(var, "").strip().lower() in _TRUE_VALUES
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a mistyped path."""
    return (
        name.startswith((".", "/", "~"))
        or "\\" in name
        or name.count("/") > 1
        or Path(name).expanduser().exists()
    )


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the hub could not be reached" (httpx is what recent hubs use)."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    return tuple(errors)


def _download_from_hub(repo_id: str, local_files_only: bool) -> Path:
    """Fetch only the tokenizer files of ``repo_id`` (or find them in the cache) and return their folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, RepositoryNotFoundError

    hint = (
        "Pass a local directory containing the tokenizer files (vocab.txt and/or tokenizer.json), "
        "e.g. one saved with BertTokenizerFast.from_pretrained(...).save_pretrained(dir) on a machine "
        "with network access."
    )
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=_HUB_TOKENIZER_FILES, local_files_only=local_files_only
        )
    except HFValidationError as err:
        raise HubError(
            f"Tokenizer {repo_id!r} is not a local directory and not a valid Hugging Face hub id. {hint}"
        ) from err
    except RepositoryNotFoundError as err:  # an OSError subclass, so it must come first
        raise HubError(
            f"Tokenizer {repo_id!r} is not a local directory and the Hugging Face hub has no such "
            f"(public) repository. {hint}"
        ) from err
    except _network_errors() as err:
        why = "offline mode is enabled" if local_files_only else "no network connection, or the hub is down"
        raise HubError(
            f"Could not load tokenizer {repo_id!r}: it is not a local directory and the Hugging Face "
            f"hub could not be reached ({why}), nor is it in the local cache. {hint}"
        ) from err
    return Path(folder)


def _check_tokenizer_dir(directory: Path, name: str) -> None:
    """Refuse a folder without vocabulary files.

    transformers >= 5 silently builds a 5-token tokenizer when it finds no vocabulary, which would
    otherwise surface much later as nonsense ids; failing here gives a clear message instead.
    """
    if not any((directory / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        raise FileNotFoundError(
            f"Tokenizer {name!r}: {str(directory)!r} contains neither vocab.txt nor tokenizer.json."
        )


def _check_unicode(text: str, what: str) -> None:
    """Refuse a text the fast tokenizer cannot encode (a lone surrogate), naming it (a query, a caption)."""
    index = lone_surrogate(text)
    if index is not None:
        raise InvalidTextError(f"{what} {text!r:.80} (a query or caption) is {describe_surrogate(text, index)}")


class TextTokenizer:
    """Reference-form text tokenizer: ``[CLS] wordpieces`` (no [SEP]), right-padded with [PAD].

    Wraps a Hugging Face ``BertTokenizerFast`` for the WordPiece split only.
    """

    def __init__(self, tokenizer: BertTokenizerFast) -> None:
        """Wrap an already loaded fast BERT tokenizer, checking it has all five special tokens."""
        names = ("pad", "cls", "sep", "mask", "unk")
        ids: dict[str, int] = {}
        for n in names:
            token_id = getattr(tokenizer, f"{n}_token_id", None)
            if token_id is not None:
                ids[n] = int(token_id)
        missing = [f"[{n.upper()}]" for n in names if n not in ids]
        if missing:
            raise ValueError(f"tokenizer lacks special tokens: {', '.join(missing)}")
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"tokenizer special token ids are not distinct: {ids}")
        if len(tokenizer) <= len(ids):
            raise ValueError(f"tokenizer vocabulary has only {len(tokenizer)} entries (no wordpieces loaded)")
        self._tok = tokenizer
        self._pad, self._cls, self._sep, self._mask, self._unk = (ids[n] for n in names)
        if self._pad != 0:
            # The reference pads with id 0; other code may assume it, so make a mismatch visible.
            logger.warning("tokenizer [PAD] id is %d, not 0 as in bert-base-uncased", self._pad)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, local_files_only: bool = False) -> TextTokenizer:
        """Load from a local directory or a Hugging Face hub id (e.g. ``"bert-base-uncased"``).

        Args:
            name_or_path: a directory with ``vocab.txt``/``tokenizer.json``, or a hub repository id.
            local_files_only: never contact the hub; use only its local cache. Also implied by
                ``HF_HUB_OFFLINE=1`` / ``TRANSFORMERS_OFFLINE=1``.

        Raises:
            OSError: the directory lacks tokenizer files, the path does not exist, or the hub id could
                not be resolved (hub unreachable and not cached, or no such repository).
        """
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"name_or_path must be a str or path, got {type(name_or_path).__name__}")
        name = os.fspath(name_or_path)
        local = Path(name).expanduser()
        if name in BUNDLED_VOCABULARIES and not local.exists():
            return cls.bundled(name)
        if local.is_dir():
            directory = local
        elif _looks_like_path(name):
            raise FileNotFoundError(f"Tokenizer path {name!r} is not an existing directory.")
        else:
            offline = local_files_only or _offline_requested()
            logger.info("resolving tokenizer %r from the Hugging Face hub (offline=%s)", name, offline)
            directory = _download_from_hub(name, offline)
        _check_tokenizer_dir(directory, name)
        return cls(BertTokenizerFast.from_pretrained(str(directory)))

    @classmethod
    def bundled(cls, name: str = "bert-base-uncased") -> TextTokenizer:
        """The tokenizer of a vocabulary shipped with simla (no file or network access beyond the package)."""
        if name not in BUNDLED_VOCABULARIES:
            raise HubError(f"no bundled vocabulary {name!r}; bundled: {sorted(BUNDLED_VOCABULARIES)}")
        # A folder holding only vocab.txt: transformers applies BERT's uncased defaults (lower-casing,
        # accent stripping, CJK splitting), exactly bert-base-uncased's tokenizer_config.
        backend = BertTokenizerFast.from_pretrained(str(BUNDLED_VOCABULARIES[name]))
        backend.name_or_path = name
        return cls(backend)

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        texts: str | Sequence[str],
        max_length: int = DEFAULT_MAX_LENGTH,
        padding: Literal["longest", "max_length"] = "longest",
        clean: bool = True,
    ) -> TokenizedText:
        """Tokenize one text or a batch into the reference form.

        Args:
            texts: a string (batch of one) or a sequence of strings.
            max_length: maximum length including [CLS]; longer texts lose their trailing wordpieces.
            padding: ``"longest"`` pads to the longest row in the batch, ``"max_length"`` to ``max_length``.
            clean: run :func:`~simla.tokenizers.captions.pre_caption` (30 words) on each text first.

        Returns:
            A :class:`TokenizedText` with (B, L) long tensors.
        """
        batch = self._as_batch(texts)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length must be an int >= 1 (room for [CLS]), got {max_length!r}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if clean:
            batch = [pre_caption(t, max_words=CAPTION_MAX_WORDS) for t in batch]

        budget = max_length - 1  # one slot is taken by [CLS]
        if budget > 0:
            # Truncating inside the tokenizer avoids its "sequence longer than model_max_length" warning.
            pieces = self._tok(
                batch,
                add_special_tokens=False,
                truncation=True,
                max_length=budget,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
        else:
            pieces = [[] for _ in batch]
        # Slice again so the length contract holds whatever the tokenizer's truncation strategy.
        rows = [[self._cls, *p[:budget]] for p in pieces]

        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        ids = [r + [self._pad] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        return TokenizedText(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))

    @staticmethod
    def _as_batch(texts: str | Sequence[str]) -> list[str]:
        """Normalise the input to a non-empty list of strings, naming the first offending index."""
        if isinstance(texts, str):
            return [texts]
        if not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
        batch = list(texts)
        if not batch:
            raise ValueError("texts is empty: nothing to tokenize")
        for i, t in enumerate(batch):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
            _check_unicode(t, "the text" if len(batch) == 1 else f"texts[{i}]")
        return batch

    def tokenize_words(self, text: str, max_length: int) -> WordPieces:
        """Tokenize one text as :meth:`__call__` does (cleaned, ``[CLS]`` first) but remember, for every
        wordpiece, which whitespace-separated word of the ORIGINAL text it came from.

        Each typed word is cleaned on its own (cleaning works within words), so the ids equal those of
        ``self(text, max_length)`` except that no 30-word cap applies: the text is cut only at
        ``max_length`` tokens. A typed word that cleaning empties (a lone dash) yields no piece and no word.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        _check_unicode(text, "the text")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 ([CLS] and one wordpiece), got {max_length!r}")
        typed = text.split()
        cleaned = [pre_caption(word, max_words=max(1, len(word))) for word in typed]
        pieces = self._tok(cleaned, add_special_tokens=False, return_attention_mask=False,
                           return_token_type_ids=False)["input_ids"] if typed else []
        ids, owner, words = [self._cls], [-1], []
        truncated = False
        for word, word_pieces in zip(typed, pieces):
            if not word_pieces:
                continue
            if len(ids) + len(word_pieces) > max_length:
                truncated = True
                word_pieces = word_pieces[: max_length - len(ids)]
                if not word_pieces:
                    break
            owner.extend([len(words)] * len(word_pieces))
            ids.extend(word_pieces)
            words.append(word)
            if truncated:
                break
        return WordPieces(ids, owner, words, truncated)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Turn one sequence of ids back into text (wordpieces merged, as BERT's decoder does)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode takes one sequence (1-D ids), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> BertTokenizerFast:
        """The wrapped Hugging Face tokenizer (for sentence pairs or other non-reference uses)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the size an embedding table needs)."""
        return len(self._tok)

    @property
    def pad_token_id(self) -> int:
        """Id of [PAD] (0 for bert-base-uncased)."""
        return self._pad

    @property
    def cls_token_id(self) -> int:
        """Id of [CLS] (101 for bert-base-uncased)."""
        return self._cls

    @property
    def sep_token_id(self) -> int:
        """Id of [SEP] (102 for bert-base-uncased); never emitted by :meth:`__call__`."""
        return self._sep

    @property
    def mask_token_id(self) -> int:
        """Id of [MASK] (103 for bert-base-uncased)."""
        return self._mask

    @property
    def unk_token_id(self) -> int:
        """Id of [UNK] (100 for bert-base-uncased)."""
        return self._unk

    @property
    def special_token_ids(self) -> tuple[int, int, int, int, int]:
        """(pad, cls, sep, mask, unk) ids, e.g. for excluding them from MLM or PSL keyword voting."""
        return (self._pad, self._cls, self._sep, self._mask, self._unk)

    def __repr__(self) -> str:
        return f"TextTokenizer(name_or_path={self._tok.name_or_path!r}, vocab_size={self.vocab_size})"


def get_tokenizer(name_or_path: str = "bert-base-uncased") -> TextTokenizer:
    """Load the text tokenizer (``bert-base-uncased`` by default, as the reference)."""
    return TextTokenizer.from_pretrained(name_or_path)


def tokenize_answers(tokenizer, answers: Sequence[str], sep_token_id: int,
                     max_length: int = 511) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of answers as the decoder reads and writes them: `[CLS] wordpieces [SEP]`, padded to the longest.

    Answers are not cleaned and not truncated below `max_length` (the reference leaves them untruncated).
    """
    text = tokenizer(list(answers), max_length=max_length, clean=False)
    lengths = text.attention_mask.sum(1)
    rows = torch.arange(len(answers))
    ids = torch.cat([text.input_ids, torch.zeros_like(text.input_ids[:, :1])], dim=1)
    mask = torch.cat([text.attention_mask, torch.zeros_like(text.attention_mask[:, :1])], dim=1)
    ids[rows, lengths] = sep_token_id
    mask[rows, lengths] = 1
    return ids, mask
