"""Tokenizers: text (BERT WordPiece, reference sequence form)."""

from .text import TextTokenizer, TokenizedText, get_tokenizer
