"""The dedup steps a recipe names: `exact_dedup`, `minhash_dedup`, `boilerplate_lines`.

All three are `GlobalStep`s (signature per document in the tasks, one decision over all tasks, apply
per document in the tasks of the next phase). The two document-level ones share the decision layout
described in `llmcycle.data.dedup`; see docs/data-dedup.md for what each one compares and costs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llmcycle.config import field_help as F
from llmcycle.data.dedup import is_dropped
from llmcycle.data.dedup.boilerplate import common_lines, line_hashes, remove_lines
from llmcycle.data.dedup.exact import exact_signature, find_exact_duplicates
from llmcycle.data.dedup.lsh import near_duplicates
from llmcycle.data.dedup.minhash import MinHasher
from llmcycle.data.document import Document
from llmcycle.data.steps import GlobalStep, register_step
from llmcycle.errors import ConfigError


def _at_least(step: str, params, name: str, low: int) -> None:
    value = getattr(params, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{step}.{name} must be an integer >= {low}, got {value!r}.")


@register_step
class ExactDedup(GlobalStep):
    """Keep the first of the documents whose normalized texts are equal (see `dedup.exact`)."""

    name = "exact_dedup"

    @dataclasses.dataclass
    class Params:
        pass

    def signature(self, doc: Document) -> np.ndarray:
        return exact_signature(doc.text)

    def decide(self, signatures: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        decision, groups = find_exact_duplicates(signatures)
        self.counters["clusters"] += groups
        self.counters["duplicates"] += len(decision["drop_index"])
        return decision

    def apply(self, doc: Document, task: int, index: int, decision: dict[str, np.ndarray]) -> Document | str:
        return "exact_duplicate" if is_dropped(decision, task, index) else doc


@register_step
class MinhashDedup(GlobalStep):
    """Near-duplicates by MinHash LSH; keep the first document of each cluster (see `dedup.lsh`)."""

    name = "minhash_dedup"

    @dataclasses.dataclass
    class Params:
        ngram: int = F(5, "words per shingle; documents with fewer words are one shingle")
        bands: int = F(14, "LSH bands; a pair with Jaccard s is caught with probability 1-(1-s^rows)^bands")
        rows: int = F(8, "signature values per band")
        seed: int = F(1, "seed of the hash functions; all runs that are compared must use the same")

    def __init__(self, params=None):
        super().__init__(params)
        for key in ("ngram", "bands", "rows"):
            _at_least(self.name, self.params, key, 1)
        _at_least(self.name, self.params, "seed", 0)
        self._hasher: MinHasher | None = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_hasher"] = None  # rebuilt where it is used: pickles stay small
        return state

    def setup(self) -> None:
        if self._hasher is None:
            p = self.params
            self._hasher = MinHasher(p.bands * p.rows, ngram=p.ngram, seed=p.seed)

    def signature(self, doc: Document) -> np.ndarray:
        if self._hasher is None:
            self.setup()
        return self._hasher.signature(doc.text)

    def decide(self, signatures: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        decision, clusters = near_duplicates(signatures, self.params.bands, self.params.rows)
        self.counters["clusters"] += clusters
        self.counters["duplicates"] += len(decision["drop_index"])
        return decision

    def apply(self, doc: Document, task: int, index: int, decision: dict[str, np.ndarray]) -> Document | str:
        return "near_duplicate" if is_dropped(decision, task, index) else doc


@register_step
class BoilerplateLines(GlobalStep):
    """Remove lines found in at least `min_docs` distinct documents (see `dedup.boilerplate`)."""

    name = "boilerplate_lines"

    @dataclasses.dataclass
    class Params:
        min_docs: int = F(10, "a line in at least this many distinct documents is boilerplate")
        min_line_chars: int = F(20, "lines shorter than this (whitespace collapsed) are never removed")

    def __init__(self, params=None):
        super().__init__(params)
        _at_least(self.name, self.params, "min_docs", 2)
        _at_least(self.name, self.params, "min_line_chars", 1)

    def signature(self, doc: Document) -> np.ndarray:
        return line_hashes(doc.text, self.params.min_line_chars)

    def decide(self, signatures: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        lines = common_lines(signatures, self.params.min_docs)
        self.counters["boilerplate_lines"] += len(lines)
        return {"boilerplate": lines}

    def apply(self, doc: Document, task: int, index: int, decision: dict[str, np.ndarray]) -> Document | str:
        text, removed = remove_lines(doc.text, decision["boilerplate"], self.params.min_line_chars)
        if not removed:
            return doc
        self.counters["lines_removed"] += removed
        if not text.strip():
            return "only_boilerplate"
        return dataclasses.replace(doc, text=text)
