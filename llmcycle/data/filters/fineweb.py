"""FineWeb's extra quality rules (Penedo et al. 2024), as datatrove's `FineWebQualityFilter`.

Same order of checks, defaults and drop reasons as datatrove; words for the newline ratio as
datatrove's English `split_into_words` gives them (see `words.py`).
"""

from __future__ import annotations

import dataclasses
from operator import itemgetter, methodcaller

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.filters import check_range
from llmcycle.data.filters.gopher import _duplicates
from llmcycle.data.filters.words import TERMINAL_PUNCTUATION, analyze
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError

_last_char = itemgetter(-1)


@dataclasses.dataclass
class FineWebQualityParams:
    line_punct_thr: float = F(
        0.12, "Drop when fewer than this fraction of non-blank lines end in terminal punctuation "
              "(FineWeb: 0.12).")
    line_punct_exclude_zero: bool = F(False, "Do not drop documents where no line ends in punctuation.")
    stop_chars: list[str] | None = F(
        None, "What counts as terminal punctuation (null: datatrove's TERMINAL_PUNCTUATION, ~160 chars).")
    short_line_thr: float = F(
        0.67, "Drop when more than this fraction of non-blank lines are short (FineWeb: 0.67).")
    short_line_length: int = F(30, "A line of at most this many characters is short (FineWeb: 30).")
    char_duplicates_ratio: float = F(
        0.01, "Drop when duplicate lines hold more than this fraction of the characters (FineWeb: 0.01).")
    new_line_ratio: float = F(0.3, "Drop with more than this many newlines per word (FineWeb: 0.3).")


@register_step
class FineWebQuality(MapStep):
    """datatrove's FineWebQualityFilter: line punctuation, short lines, duplicated lines, list-like text."""

    name = "fineweb_quality"
    Params = FineWebQualityParams

    def __init__(self, params: FineWebQualityParams | None = None):
        super().__init__(params)
        p = self.params
        for key in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio"):
            check_range(self.name, key, getattr(p, key), lo=0, hi=1, allow_none=False)
        check_range(self.name, "new_line_ratio", p.new_line_ratio, lo=0, allow_none=False)
        check_range(self.name, "short_line_length", p.short_line_length, lo=0, allow_none=False)
        if p.stop_chars is not None and not all(p.stop_chars):
            raise ConfigError(f"{self.name}.stop_chars must not hold empty strings.")
        stop = TERMINAL_PUNCTUATION if p.stop_chars is None else p.stop_chars
        # One-character endings (the default) are tested with a set lookup; longer ones with endswith.
        self._stop_set = frozenset(stop) if all(len(s) == 1 for s in stop) else None
        self._ends_stop = methodcaller("endswith", tuple(stop))

    def process(self, doc: Document) -> Document | str:
        p = self.params
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        n_lines = len(lines)
        if self._stop_set is not None:
            ending = sum(map(self._stop_set.__contains__, map(_last_char, lines)))
        else:
            ending = sum(map(self._ends_stop, lines))
        ratio = ending / n_lines
        if ratio < p.line_punct_thr and not (ratio == 0 and p.line_punct_exclude_zero):
            return "line_punct_ratio"
        short = p.short_line_length
        if sum(1 for line in lines if len(line) <= short) / n_lines > p.short_line_thr:
            return "short_line_ratio"
        if _duplicates(lines)[1] / len(text.replace("\n", "")) > p.char_duplicates_ratio:
            return "char_dup_ratio"
        n_words = analyze(text).n_words
        if n_words == 0 or text.count("\n") / n_words > p.new_line_ratio:
            return "list_ratio"
        return doc
