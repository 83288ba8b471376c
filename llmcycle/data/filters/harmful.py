"""Harmful-content filter: weighted word and phrase lists, and an optional classifier hook.

Word lists are text files with one word or phrase per line, optionally followed by a tab and a
weight (default 1); blank lines and lines starting with `#` are ignored. Matching is whole-word and
case-insensitive: the text and every entry are cut into words (runs of letters, digits and `_`,
lower-cased), and an entry matches wherever its words appear consecutively ("bad word" matches
"Bad  word" and "bad\\nword", not "badword"). Every occurrence of every entry counts, overlapping
entries included.

    score = 1000 * (sum of the weights of all matches) / (number of words in the text)

i.e. weighted matches per 1000 words. The document is dropped ("harmful_words") when the score is
above `threshold`; the default 0 drops any document with a match, as C4's bad-words filter does.

`classifier` names a function "package.module:function" that takes the text and returns a float in
[0, 1]; documents scoring at or above `classifier_threshold` are dropped ("harmful_classifier"). It
is imported once per worker in `setup()`. Scores go to `metadata["harmful_score"]` and
`metadata["harmful_classifier_score"]`.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.filters import check_range
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError, LlmcycleError

_WORD = re.compile(r"\w+")
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


def load_word_list(path: str) -> dict[tuple[str, ...], float]:
    """{entry as a tuple of lower-cased words: weight}; a malformed weight names the file and line."""
    entries: dict[tuple[str, ...], float] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            phrase, _, weight_text = line.partition("\t")
            weight = 1.0
            if weight_text.strip():
                try:
                    weight = float(weight_text)
                except ValueError:
                    raise ConfigError(
                        f"{path}:{lineno}: weight {weight_text.strip()!r} is not a number.") from None
            words = tuple(_WORD.findall(phrase.lower()))
            if words:
                entries[words] = entries.get(words, 0.0) + weight
    return entries


@dataclasses.dataclass
class HarmfulParams:
    word_lists: list[str] = F([], "Word list files: one word or phrase per line, optional <TAB>weight.")
    threshold: float = F(0.0, "Drop when weighted matches per 1000 words are above this (0: any match).")
    classifier: str | None = F(None, "Optional 'package.module:function' scoring a text in [0, 1].")
    classifier_threshold: float = F(0.5, "Drop when the classifier's score is at or above this.")


@register_step
class Harmful(MapStep):
    """Drop documents with too many listed words or phrases, or that a classifier flags."""

    name = "harmful"
    Params = HarmfulParams

    def __init__(self, params: HarmfulParams | None = None):
        super().__init__(params)
        p = self.params
        check_range(self.name, "threshold", p.threshold, lo=0, allow_none=False)
        check_range(self.name, "classifier_threshold", p.classifier_threshold, lo=0, hi=1, allow_none=False)
        for i, path in enumerate(p.word_lists):
            if not Path(path).is_file():
                raise ConfigError(f"{self.name}.word_lists[{i}]: {path} is not a file.")
        if p.classifier is not None and not _SPEC.match(p.classifier):
            raise ConfigError(f"{self.name}.classifier = {p.classifier!r} must be of the form "
                              f"'package.module:function'.")
        if not p.word_lists and p.classifier is None:
            raise ConfigError(f"{self.name}: give word_lists, a classifier, or both.")
        self._by_length: dict[int, dict[tuple[str, ...], float]] | None = None
        self._classifier: Callable[[str], float] | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_classifier"] = None  # imported again by setup() in the worker
        return state

    def setup(self) -> None:
        p = self.params
        if self._by_length is None:
            by_length: dict[int, dict[tuple[str, ...], float]] = {}
            for path in p.word_lists:
                for words, weight in load_word_list(path).items():
                    table = by_length.setdefault(len(words), {})
                    table[words] = table.get(words, 0.0) + weight
            self._by_length = by_length
        if p.classifier is not None and self._classifier is None:
            module_name, _, func_name = p.classifier.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as e:
                raise ConfigError(f"{self.name}.classifier: cannot import {module_name!r} ({e}).") from None
            func = getattr(module, func_name, None)
            if not callable(func):
                raise ConfigError(f"{self.name}.classifier: {module_name!r} has no function {func_name!r}.")
            self._classifier = func

    def score(self, text: str) -> float:
        """Weighted matches per 1000 words (see the module docstring)."""
        if self._by_length is None:
            self.setup()
        assert self._by_length is not None
        if not self._by_length:
            return 0.0
        words = _WORD.findall(text.lower())
        if not words:
            return 0.0
        total = 0.0
        for n, table in self._by_length.items():
            if n > len(words):
                continue
            grams = Counter(zip(*(words[i:] for i in range(n))))
            if len(table) < len(grams):
                total += sum(weight * grams[key] for key, weight in table.items() if key in grams)
            else:
                total += sum(count * table[key] for key, count in grams.items() if key in table)
        return 1000.0 * total / len(words)

    def process(self, doc: Document) -> Document | str:
        if self._by_length is None or (self.params.classifier is not None and self._classifier is None):
            self.setup()
        p = self.params
        if self._by_length:
            score = self.score(doc.text)
            doc.metadata["harmful_score"] = round(score, 4)
            if score > p.threshold:
                return "harmful_words"
        if self._classifier is not None:
            value = self._classifier(doc.text)
            try:
                value = float(value)
            except (TypeError, ValueError):
                value = float("nan")
            if not 0.0 <= value <= 1.0:
                raise LlmcycleError(f"{self.name}: classifier {p.classifier} returned {value!r}; "
                                    f"it must return a number in [0, 1].")
            doc.metadata["harmful_classifier_score"] = round(value, 4)
            if value >= p.classifier_threshold:
                return "harmful_classifier"
        return doc
