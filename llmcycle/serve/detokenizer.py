"""Incremental detokenization: the text of each new token in O(1), for streaming and stop strings.

Decoding the whole output after every token is quadratic in its length. Instead we decode a short window
(the tokens since the previous emitted boundary), as Hugging Face TGI and vLLM do: the text of the window
with the new token, minus the text of the window without it, is the new text. A window that ends in the
middle of a multi-byte character decodes to U+FFFD; we then wait for more tokens before emitting, so a
streamed character is never split or replaced.
"""

from __future__ import annotations

from llmcycle.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas whose concatenation is the decoded text."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_offset = 0  # start of the context window (its text is already emitted)
        self.read_offset = 0  # tokens before this are fully emitted
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: list[int], final: bool = False) -> str:
        """New text for `ids` (all output tokens so far); `final` flushes an incomplete character."""
        if len(ids) <= self.read_offset:
            return ""
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        full = self._decode(ids[self.prefix_offset :])
        if full.endswith(_REPLACEMENT) and not final:
            return ""  # a character split across tokens: wait for its remaining bytes
        delta = full[len(prefix) :] if full.startswith(prefix) else full
        self.prefix_offset, self.read_offset = self.read_offset, len(ids)
        self.text += delta
        return delta
