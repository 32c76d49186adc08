"""Tokenizers: text (BERT WordPiece, reference sequence form) and visual (image patches -> discrete ids)."""

from .text import TextTokenizer, TokenizedText, get_tokenizer
from .visual import DalleTokenizer, KMeansTokenizer, VisualTokenizer, load_visual_tokenizer

__all__ = [
    "DalleTokenizer",
    "KMeansTokenizer",
    "TextTokenizer",
    "TokenizedText",
    "VisualTokenizer",
    "get_tokenizer",
    "load_visual_tokenizer",
]
