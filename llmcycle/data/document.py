"""The unit of text that flows through the data pipeline, and its JSONL storage.

A `Document` is one piece of text with a stable id. Ids matter: the held-out split, deduplication
and corpus hashes are all keyed on them, so the same text must always get the same id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from llmcycle.artifacts import atomic_open
from llmcycle.errors import LlmcycleError


@dataclass
class Document:
    id: str
    text: str
    source: str
    metadata: dict = field(default_factory=dict)


def write_jsonl(docs: Iterable[Document], path: str | Path) -> None:
    """Write one JSON object per line: {"id", "text", "source", "metadata"}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", encoding="utf-8") as f:  # never half a corpus under the name
        for d in docs:
            row = {"id": d.id, "text": d.text, "source": d.source, "metadata": d.metadata}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | Path) -> list[Document]:
    """Read documents written by `write_jsonl`; a malformed line is an error naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LlmcycleError(f"{path}: document file does not exist.")
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc = Document(
                    id=str(row["id"]), text=row["text"], source=str(row.get("source", "")),
                    metadata=dict(row.get("metadata") or {}),
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise LlmcycleError(f"{path}:{lineno}: not a valid document line ({e}).") from None
            if not isinstance(doc.text, str):
                raise LlmcycleError(f"{path}:{lineno}: document 'text' must be a string.")
            docs.append(doc)
    return docs


def corpus_hash(docs: Iterable[Document]) -> str:
    """sha256 over ids and texts, in order. Length prefixes keep ("ab","c") and ("a","bc") apart."""
    h = hashlib.sha256()
    for d in docs:
        i, t = d.id.encode("utf-8"), d.text.encode("utf-8")
        h.update(f"{len(i)}:{len(t)}:".encode())
        h.update(i)
        h.update(t)
    return h.hexdigest()
