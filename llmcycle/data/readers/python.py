"""The embedded Python corpus (docs/corpus.md) as a reader, split into parts by a hash of the id."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.readers.base import Problems, Reader, register_reader
from llmcycle.errors import ConfigError


def part_of(doc_id: str, parts: int) -> int:
    """The part a document belongs to: stable across runs, machines and Python versions."""
    return int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % parts


@functools.lru_cache(maxsize=1)
def _corpus(max_bytes: int | None) -> tuple[Document, ...]:
    """Collected once per process: the tasks of one run all need the same corpus."""
    from llmcycle.data.pycorpus import collect_python_corpus

    return tuple(collect_python_corpus(max_bytes=max_bytes))


@register_reader
class PythonReader(Reader):
    name = "python"

    @dataclasses.dataclass
    class Params:
        parts: int = F(8, "Tasks the corpus is split into (by a hash of each document id).")
        max_bytes: int | None = F(None, "Keep the corpus prefix of at most this many bytes (null: all).")

    def files(self) -> list[str]:
        p = self.params
        if p.parts < 1:
            raise ConfigError(f"recipe: python reader: parts must be at least 1, got {p.parts}.")
        if p.max_bytes is not None and p.max_bytes <= 0:
            raise ConfigError(f"recipe: python reader: max_bytes must be positive, got {p.max_bytes}.")
        return sorted(f"python:{i}" for i in range(p.parts))

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        prefix, _, index = file.partition(":")
        if prefix != "python" or not index.isdigit() or int(index) >= self.params.parts:
            last = self.params.parts - 1
            problems.report("unreadable_file", file, None, f"not a part (python:0..{last})")
            return
        k = int(index)
        for d in _corpus(self.params.max_bytes):
            if part_of(d.id, self.params.parts) == k:
                # A fresh copy: steps may change documents, and the cached corpus serves every task.
                meta = dict(d.metadata, origin=d.source)
                yield Document(id=d.id, text=d.text, source=file, metadata=meta)
