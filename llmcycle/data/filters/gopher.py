"""Gopher quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A).

Rule for rule the same as datatrove's `GopherQualityFilter` and `GopherRepetitionFilter`: the same
order of checks, the same defaults, the same drop reasons, and words as datatrove's English
`split_into_words` gives them (see `words.py`). A threshold set to null (or 0) turns its rule off, as in
datatrove. Two deliberate differences, both on contrived input only: a document with no words at
all is "gopher_short_doc" even when `min_doc_words` is off (datatrove divides by zero), and repeated
n-grams (5- to 10-grams) are compared word by word where datatrove compares the words glued together
without spaces (so "ab c" and "a bc" are different 2-word sequences here and the same one there).
"""

from __future__ import annotations

import dataclasses
import re
from operator import methodcaller

import numpy as np

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.filters import check_range
from llmcycle.data.filters.words import analyze
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError

STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]

_starts_bullet = methodcaller("startswith", ("•", "-"))
_ends_ellipsis = methodcaller("endswith", ("...", "…"))


@dataclasses.dataclass
class GopherQualityParams:
    min_doc_words: int | None = F(50, "Drop documents with fewer non-symbol words (Gopher: 50).")
    max_doc_words: int | None = F(100_000, "Drop documents with more non-symbol words (Gopher: 100,000).")
    min_avg_word_length: float | None = F(3, "Drop when the mean non-symbol word is shorter (Gopher: 3).")
    max_avg_word_length: float | None = F(10, "Drop when the mean non-symbol word is longer (Gopher: 10).")
    max_symbol_word_ratio: float | None = F(
        0.1, "Drop when '#' per word, or '...'/'…' per word, is above this (Gopher: 0.1).")
    max_bullet_lines_ratio: float | None = F(
        0.9, "Drop when more than this fraction of lines start with '•' or '-' (Gopher: 0.9).")
    max_ellipsis_lines_ratio: float | None = F(
        0.3, "Drop when more than this fraction of lines end with '...' or '…' (Gopher: 0.3).")
    max_non_alpha_words_ratio: float | None = F(
        0.8, "Drop when fewer than this fraction of words hold a letter (Gopher: 0.8; datatrove's name).")
    min_stop_words: int | None = F(2, "Drop documents with fewer distinct stop words (Gopher: 2).")
    stop_words: list[str] = F(STOP_WORDS, "The stop words (Gopher's eight; case-sensitive, as datatrove).")


@register_step
class GopherQuality(MapStep):
    """datatrove's GopherQualityFilter: length, word length, symbols, bullets, letters, stop words."""

    name = "gopher_quality"
    Params = GopherQualityParams

    def __init__(self, params: GopherQualityParams | None = None):
        super().__init__(params)
        p = self.params
        for key in ("min_doc_words", "max_doc_words", "min_avg_word_length", "max_avg_word_length",
                    "max_symbol_word_ratio", "min_stop_words"):
            check_range(self.name, key, getattr(p, key), lo=0)
        for key in ("max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "max_non_alpha_words_ratio"):
            check_range(self.name, key, getattr(p, key), lo=0, hi=1)
        if p.min_doc_words and p.max_doc_words and p.min_doc_words > p.max_doc_words:
            raise ConfigError(f"{self.name}.min_doc_words ({p.min_doc_words}) is above max_doc_words "
                              f"({p.max_doc_words}).")
        self._stop = frozenset(p.stop_words)

    def process(self, doc: Document) -> Document | str:
        p = self.params
        text = doc.text
        w = analyze(text)
        n_words = w.n_words
        n_non_symbol = w.n_non_symbol
        if p.min_doc_words and n_non_symbol < p.min_doc_words:
            return "gopher_short_doc"
        if p.max_doc_words and n_non_symbol > p.max_doc_words:
            return "gopher_long_doc"
        if n_words == 0:
            return "gopher_short_doc"
        if n_non_symbol:  # datatrove: the mean of no lengths is NaN and fails neither test
            avg = w.non_symbol_chars / n_non_symbol
            if p.min_avg_word_length and avg < p.min_avg_word_length:
                return "gopher_below_avg_threshold"
            if p.max_avg_word_length and avg > p.max_avg_word_length:
                return "gopher_above_avg_threshold"
        if p.max_symbol_word_ratio:
            if text.count("#") / n_words > p.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if (text.count("...") + text.count("…")) / n_words > p.max_symbol_word_ratio:
                return "gopher_too_many_ellipsis"
        if p.max_bullet_lines_ratio or p.max_ellipsis_lines_ratio:
            lines = text.splitlines()
            if p.max_bullet_lines_ratio and (
                    sum(map(_starts_bullet, map(str.lstrip, lines))) / len(lines) > p.max_bullet_lines_ratio):
                return "gopher_too_many_bullets"
            if p.max_ellipsis_lines_ratio and (
                    sum(map(_ends_ellipsis, map(str.rstrip, lines))) / len(lines)
                    > p.max_ellipsis_lines_ratio):
                return "gopher_too_many_end_ellipsis"
        if p.max_non_alpha_words_ratio and w.n_alpha / n_words < p.max_non_alpha_words_ratio:
            return "gopher_below_alpha_threshold"
        if p.min_stop_words and len(self._stop.intersection(w.words)) < p.min_stop_words:
            return "gopher_enough_stop_words"
        return doc


@dataclasses.dataclass
class GopherRepetitionParams:
    dup_line_frac: float | None = F(0.3, "Drop when over this fraction of lines are repeats (Gopher: 0.3).")
    dup_para_frac: float | None = F(
        0.3, "Drop when more than this fraction of paragraphs are duplicates (Gopher: 0.3).")
    dup_line_char_frac: float | None = F(
        0.2, "Drop when duplicate lines hold more than this fraction of characters (Gopher: 0.2).")
    dup_para_char_frac: float | None = F(
        0.2, "Drop when duplicate paragraphs hold more than this fraction of characters (Gopher: 0.2).")
    top_n_grams: list[list[float]] = F(
        [[2, 0.2], [3, 0.18], [4, 0.16]],
        "[n, fraction] pairs: drop when the most frequent n-gram covers more than the fraction of "
        "characters (Gopher: 2-grams 0.2, 3-grams 0.18, 4-grams 0.16).")
    dup_n_grams: list[list[float]] = F(
        [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]],
        "[n, fraction] pairs: drop when repeated n-grams cover more than the fraction of characters "
        "(Gopher: 5-grams 0.15 down to 10-grams 0.10).")


def _n_gram_rules(step: str, key: str, pairs: list[list[float]]) -> tuple[tuple[int, float], ...]:
    out = []
    for i, pair in enumerate(pairs):
        if len(pair) != 2 or not float(pair[0]).is_integer() or pair[0] < 1 or not 0 <= pair[1] <= 1:
            raise ConfigError(f"{step}.{key}[{i}] = {pair!r} must be [n, fraction] with n a whole number "
                              f">= 1 and 0 <= fraction <= 1.")
        out.append((int(pair[0]), float(pair[1])))
    return tuple(out)


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(number of repeated elements, their characters): every occurrence after the first counts."""
    unique = set(items)
    return len(items) - len(unique), sum(map(len, items)) - sum(map(len, unique))


class _NGrams:
    """Exact ids of a text's word n-grams: the id of the n-gram at position i is the first position where
    the same n-gram occurs. The ids of n-grams come from those of (n-1)-grams paired with the next word,
    so each size costs one numpy sort of integers instead of building n-word strings.
    """

    def __init__(self, words: list[str]):
        n_words = len(words)
        first = dict(zip(reversed(words), range(n_words - 1, -1, -1)))
        self.n_words = n_words
        self.tokens = np.fromiter(map(first.__getitem__, words), dtype=np.int64, count=n_words)
        self.cum = np.zeros(n_words + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=n_words), out=self.cum[1:])
        self.ids: dict[int, np.ndarray] = {1: self.tokens}
        self.unique: dict[int, int] = {1: len(first)}

    def of(self, n: int) -> np.ndarray:
        """Ids of the n-grams (n <= number of words)."""
        ids = self.ids.get(n)
        if ids is None:
            keys = self.of(n - 1)[:-1] * self.n_words + self.tokens[n - 1:]
            unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
            ids = self.ids[n] = first[inverse]
            self.unique[n] = len(unique)
        return ids

    def top_chars(self, n: int) -> int:
        """datatrove's find_top_duplicate: characters of the most frequent n-gram (words joined by
        spaces) times its count; among equally frequent ones the first seen (Counter.most_common)."""
        counts = np.bincount(self.of(n))
        top = int(counts.argmax())
        return int(self.cum[top + n] - self.cum[top] + n - 1) * int(counts[top])

    def repeated_chars(self, n: int) -> int:
        """datatrove's find_all_duplicate: scan left to right; an n-gram already seen at a visited
        position adds its characters and the scan jumps past it, otherwise it is remembered and the scan
        moves one word. Only positions whose n-gram occurred before can be repeats, so the sequential
        part runs over those alone."""
        ids = self.of(n)
        m = len(ids)
        if self.unique[n] == m:
            return 0
        candidates = np.flatnonzero(ids != np.arange(m))
        starts = ids[candidates].tolist()
        span = (self.cum[candidates + n] - self.cum[candidates]).tolist()
        skipped: set[int] = set()
        seen_again: set[int] = set()
        nxt = 0
        chars = 0
        for c, f, length in zip(candidates.tolist(), starts, span):
            if c < nxt:
                continue
            if f not in skipped or f in seen_again:  # an earlier occurrence was visited
                chars += length
                skipped.update(range(c + 1, c + n))
                nxt = c + n
            else:
                seen_again.add(f)
                nxt = c + 1
        return chars


_PARAGRAPHS = re.compile(r"\n{2,}")
_LINES = re.compile("\n+")


@register_step
class GopherRepetition(MapStep):
    """datatrove's GopherRepetitionFilter: duplicate paragraphs and lines, top and repeated n-grams."""

    name = "gopher_repetition"
    Params = GopherRepetitionParams

    def __init__(self, params: GopherRepetitionParams | None = None):
        super().__init__(params)
        p = self.params
        for key in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            check_range(self.name, key, getattr(p, key), lo=0, hi=1)
        self._top = _n_gram_rules(self.name, "top_n_grams", p.top_n_grams)
        self._dup = _n_gram_rules(self.name, "dup_n_grams", p.dup_n_grams)

    def process(self, doc: Document) -> Document | str:
        p = self.params
        text = doc.text
        if not text:
            return "empty"
        size = len(text)
        paragraphs = _PARAGRAPHS.split(text.strip())
        dup, chars = _duplicates(paragraphs)
        if p.dup_para_frac and dup / len(paragraphs) > p.dup_para_frac:
            return "dup_para_frac"
        if p.dup_para_char_frac and chars / size > p.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINES.split(text)
        dup, chars = _duplicates(lines)
        if p.dup_line_frac and dup / len(lines) > p.dup_line_frac:
            return "dup_line_frac"
        if p.dup_line_char_frac and chars / size > p.dup_line_char_frac:
            return "dup_line_char_frac"
        if not self._top and not self._dup:
            return doc
        words = analyze(text).words
        grams = _NGrams(words)
        n_words = len(words)
        for n, frac in self._top:
            if n_words >= n and grams.top_chars(n) / size > frac:
                return f"top_{n}_gram"
        no_repeats_from = None  # no repeated n-gram of some size means none of any larger size
        for n, frac in self._dup:
            if n_words < n or (no_repeats_from is not None and n >= no_repeats_from):
                continue
            chars = grams.repeated_chars(n)
            if chars == 0:
                no_repeats_from = n if no_repeats_from is None else min(n, no_repeats_from)
            elif chars / size > frac:
                return f"duplicated_{n}_n_grams"
        return doc
