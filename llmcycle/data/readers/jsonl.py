"""JSON Lines: one JSON object per line, plain, `.gz` or `.zst`."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from typing import Any

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.readers.base import FileParams, Problems, Reader, register_reader
from llmcycle.data.readers.compressed import iter_lines

PATHS_HELP = "Input files or glob patterns (** recurses); each matched file is one task."
# A \u escape of a UTF-16 surrogate. Paired ones (emoji) decode fine; a lone one gives a str that cannot
# be written as UTF-8, so rows where this matches are checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(row: dict[str, Any]) -> bool:
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def iter_json_rows(file: str, problems: Problems) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) per line; blank lines are skipped, other non-objects are `malformed_json`."""
    for lineno, line in iter_lines(file, problems):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
            problems.report("malformed_json", file, lineno, getattr(e, "msg", None) or type(e).__name__)
            continue
        if not isinstance(row, dict):
            problems.report("malformed_json", file, lineno, f"a JSON {type(row).__name__}, not an object")
            continue
        if _SURROGATE_ESCAPE.search(line) and _has_lone_surrogate(row):
            problems.report("invalid_utf8", file, lineno, "a \\u escape of a lone UTF-16 surrogate")
            continue
        yield lineno, row


def row_id(row: dict[str, Any], key: str | None, file: str, lineno: int) -> str:
    """The row's own id (any scalar, as a string) or, without one, `file:line`."""
    value = row.get(key) if key else None
    if value is None or isinstance(value, (dict, list)) or value == "":
        return f"{file}:{lineno}"
    return str(value)


def row_metadata(row: dict[str, Any], skip: tuple[str | None, ...]) -> dict[str, Any]:
    """Every field but `skip`; a `metadata` object is merged in flat, so llmcycle's own output reads back."""
    meta = dict(row["metadata"]) if isinstance(row.get("metadata"), dict) else {}
    for k, v in row.items():
        if k not in skip and not (k == "metadata" and isinstance(v, dict)):
            meta[k] = v
    return meta


@register_reader
class JsonlReader(Reader):
    name = "jsonl"

    @dataclasses.dataclass
    class Params(FileParams):
        paths: list[str] = F([], PATHS_HELP)
        text_key: str = F("text", "Field holding the document text (must be a string).")
        id_key: str | None = F("id", "Field holding the document id; without one the id is file:line.")

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        p = self.params
        for lineno, row in iter_json_rows(file, problems):
            text = row.get(p.text_key)
            if not isinstance(text, str):
                what = "absent" if p.text_key not in row else f"a {type(text).__name__}, not a string"
                problems.report("missing_text", file, lineno, f"{p.text_key!r} is {what}")
                continue
            yield Document(
                id=row_id(row, p.id_key, file, lineno), text=text, source=file,
                metadata=row_metadata(row, (p.text_key, p.id_key)),
            )
