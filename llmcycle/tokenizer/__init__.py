"""Tokenizers: train BPE / Unigram / WordPiece, encode, chat templates, transformers-compatible files."""

from llmcycle.tokenizer.chat import CHAT_ROLES, DEFAULT_CHAT_TEMPLATE
from llmcycle.tokenizer.tokenizer import ROLE_TOKENS, SPECIAL_TOKENS, UNK_TOKEN, Tokenizer
from llmcycle.tokenizer.train import KINDS, bytes_per_token, train_tokenizer

__all__ = [
    "CHAT_ROLES", "DEFAULT_CHAT_TEMPLATE", "KINDS", "ROLE_TOKENS", "SPECIAL_TOKENS", "UNK_TOKEN", "Tokenizer",
    "bytes_per_token", "train_tokenizer",
]
