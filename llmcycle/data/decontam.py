"""Decontamination: drop training documents that share long word n-grams with evaluation sets.

`decontaminate` reads the evaluation sets named in `eval_files`, paths or glob patterns (`evals/*.jsonl`,
expanded and checked to exist when the recipe is loaded, before any work starts):

- `.jsonl`: one JSON object per line; the item is the string fields named in `text_keys` that the
  object has (lists of strings too, e.g. answer choices), joined in `text_keys` order, so a
  question and its answer make one item;
- `.txt`: one item per non-blank line.

Items and documents are compared as words: lowercase, accents removed (NFKD), split on everything that
is not a letter or a digit (`llmcycle.data.dedup.minhash.simple_words`, with numbers kept as they
are, since numbers are much of what a math benchmark's answers are). Every run of `ngram` consecutive
words of an item is hashed (xxh3-64 per word, combined as MinHash shingles are); an item with fewer
than `ngram` words but at least `min_item_words` is one n-gram of all its words (matched against the
document's runs of that many words); shorter items ("B", "yes", "42") are ignored, since any document
would contain them. A document is contaminated by an evaluation file when at least `min_matches`
distinct n-grams of the document are among that file's; it is dropped with reason
`eval_contamination` if any file contaminates it. `counters["contaminated_by:<file>"]` counts the
documents each file contaminates (a document may count for several files).
"""

from __future__ import annotations

import dataclasses
import glob
import json
from pathlib import Path

import numpy as np

from llmcycle.config import field_help as F
from llmcycle.data.dedup.minhash import ngram_hashes, word_bytes, word_hashes
from llmcycle.data.document import Document
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError, LlmcycleError


def _item_text(row: dict, keys: list[str]) -> str:
    parts = []
    for k in keys:
        v = row.get(k)
        if isinstance(v, str):
            parts.append(v)
        elif isinstance(v, list):
            parts.extend(x for x in v if isinstance(x, str))
    return "\n".join(parts)


def read_eval_items(path: str | Path, text_keys: list[str]) -> list[str]:
    """The items of one evaluation file (`.jsonl` or `.txt`, see the module docstring)."""
    path = Path(path)
    items = []
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".txt":
            return [line.strip() for line in f if line.strip()]
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmcycleError(f"{path}:{lineno}: not valid JSON ({e}).") from None
            if not isinstance(row, dict):
                raise LlmcycleError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}.")
            items.append(_item_text(row, text_keys))
    return items


@register_step
class Decontaminate(MapStep):
    name = "decontaminate"

    @dataclasses.dataclass
    class Params:
        eval_files: list[str] = F([], "evaluation sets (paths or globs): .jsonl (fields in text_keys) or .txt "
                                      "(one item per line)")
        text_keys: list[str] = F(["text", "question", "answer", "prompt"], "JSONL fields that make an item")
        ngram: int = F(13, "words per n-gram")
        min_matches: int = F(1, "distinct shared n-grams that make a document contaminated")
        min_item_words: int = F(8, "items with fewer words are ignored (shorter than ngram: one n-gram)")

    def __init__(self, params=None):
        super().__init__(params)
        p = self.params
        for key, low in (("ngram", 1), ("min_matches", 1), ("min_item_words", 1)):
            value = getattr(p, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{self.name}.{key} must be an integer >= {low}, got {value!r}.")
        if not p.eval_files:
            raise ConfigError(f"{self.name}.eval_files is empty: name at least one evaluation set.")
        if not p.text_keys:
            raise ConfigError(f"{self.name}.text_keys is empty: name the JSONL fields that hold the text.")
        # Patterns expanded now (sorted), so a glob that matches nothing is refused before any work.
        self.files: list[str] = []
        for pattern in p.eval_files:
            matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                raise ConfigError(f"{self.name}.eval_files: {pattern} matches no file.")
            for f in matches:
                path = Path(f)
                if not path.is_file():
                    raise ConfigError(f"{self.name}.eval_files: {f} does not exist.")
                if path.suffix not in (".jsonl", ".txt"):
                    raise ConfigError(f"{self.name}.eval_files: {f} is neither .jsonl nor .txt.")
                if f not in self.files:
                    self.files.append(f)
        # Resolved now: worker processes (Ray) may run in another directory.
        self._paths = [str(Path(f).resolve()) for f in self.files]
        # file -> n-gram length -> sorted unique hashes; built by setup() in the process that runs the step
        self._index: dict[str, dict[int, np.ndarray]] | None = None
        self.ignored_items: dict[str, int] = {}  # per file, items shorter than min_item_words (after setup)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_index"] = None
        return state

    def _hashes(self, text: str) -> np.ndarray:
        return word_hashes(word_bytes(text, numbers=False))

    def setup(self) -> None:
        if self._index is not None:
            return
        p = self.params
        index: dict[str, dict[int, np.ndarray]] = {}
        for f, path in zip(self.files, self._paths):
            by_len: dict[int, list[np.ndarray]] = {}
            self.ignored_items[f] = 0
            for item in read_eval_items(path, p.text_keys):
                h = self._hashes(item)
                if len(h) < p.min_item_words:
                    self.ignored_items[f] += 1
                    continue
                n = min(p.ngram, len(h))
                by_len.setdefault(n, []).append(ngram_hashes(h, n))
            index[f] = {n: np.unique(np.concatenate(parts)) for n, parts in sorted(by_len.items())}
        self._index = index

    def process(self, doc: Document) -> Document | str:
        if self._index is None:
            self.setup()
        h = self._hashes(doc.text)
        grams: dict[int, np.ndarray] = {}
        contaminated = False
        for f, by_len in self._index.items():
            shared = 0
            for n, table in by_len.items():
                if n > len(h):
                    continue
                if n not in grams:
                    grams[n] = np.unique(ngram_hashes(h, n))
                g = grams[n]
                pos = np.minimum(np.searchsorted(table, g), len(table) - 1)
                shared += int(np.count_nonzero(table[pos] == g))
            if shared >= self.params.min_matches:
                self.counters[f"contaminated_by:{f}"] += 1
                contaminated = True
        return "eval_contamination" if contaminated else doc
