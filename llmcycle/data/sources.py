"""Where the training text comes from when a recipe names a corpus.

`python` is the embedded corpus that ships with every Python. A path may be a `.jsonl` file of
documents ({"text": ...}, "id" optional), a `.txt` file (one document), or a folder of those (sorted,
recursive). The full data stage (`llmcycle data`) reads many more formats; this is the small set
pre-training accepts directly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from llmcycle.data.document import Document
from llmcycle.errors import LlmcycleError


def load_documents(corpus: str, max_bytes: int | None = None) -> list[Document]:
    if corpus == "python":
        from llmcycle.data.pycorpus import collect_python_corpus

        docs = collect_python_corpus(max_bytes=max_bytes)
    else:
        path = Path(corpus)
        if not path.exists():
            raise LlmcycleError(f"{path}: corpus not found (give 'python', a .jsonl/.txt file or a folder).")
        files = sorted(p for p in path.rglob("*") if p.suffix in (".jsonl", ".txt")) if path.is_dir() else [path]
        docs = []
        for f in files:
            docs.extend(_read_file(f))
        if max_bytes is not None:
            docs = _cap(docs, max_bytes)
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise LlmcycleError(f"corpus {corpus!r} holds no non-empty documents; there is nothing to train on.")
    return docs


def _read_file(f: Path) -> list[Document]:
    if f.suffix == ".txt":
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise LlmcycleError(f"{f}: not valid UTF-8 ({e}).") from None
        return [Document(id=f"file:{f.as_posix()}", text=text, source=str(f))]
    if f.suffix != ".jsonl":
        raise LlmcycleError(f"{f}: unsupported corpus file type {f.suffix!r} (use .jsonl or .txt).")
    docs = []
    with open(f, encoding="utf-8", errors="strict") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text = row["text"]
                if not isinstance(text, str):
                    raise TypeError("'text' is not a string")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise LlmcycleError(f"{f}:{lineno}: not a document line with a 'text' string ({e}).") from None
            doc_id = str(row.get("id") or hashlib.sha256(text.encode()).hexdigest()[:16])
            docs.append(Document(id=doc_id, text=text, source=str(f), metadata=row.get("metadata") or {}))
    return docs


def _cap(docs: list[Document], max_bytes: int) -> list[Document]:
    out, total = [], 0
    for d in docs:
        n = len(d.text.encode("utf-8"))
        if total + n > max_bytes and out:
            break
        out.append(d)
        total += n
    return out
