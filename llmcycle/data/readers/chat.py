"""Conversations: JSON Lines whose rows hold a list of {role, content} messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.readers.base import FileParams, Problems, Reader, register_reader
from llmcycle.data.readers.jsonl import PATHS_HELP, iter_json_rows, row_id, row_metadata

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: Any) -> str | None:
    """Why `messages` is not a usable conversation, or None if it is."""
    if not isinstance(messages, list):
        return f"messages must be a list, got {type(messages).__name__}"
    if not messages:
        return "messages is empty"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is a {type(m).__name__}, not an object"
        if m.get("role") not in ROLES:
            return f"message {i} has role {m.get('role')!r}; known roles: {', '.join(ROLES)}"
        if not isinstance(m.get("content"), str):
            return f"message {i} has no string content"
    return None


def render(messages: list[dict[str, Any]]) -> str:
    """`role: content` per message, separated by blank lines."""
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


@register_reader
class ChatReader(Reader):
    name = "chat"

    @dataclasses.dataclass
    class Params(FileParams):
        paths: list[str] = F([], PATHS_HELP)
        messages_key: str = F("messages", "Field holding the list of {role, content} messages.")
        id_key: str | None = F("id", "Field holding the conversation id; without it the id is file:line.")

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        p = self.params
        for lineno, row in iter_json_rows(file, problems):
            if p.messages_key not in row:
                problems.report("malformed_record", file, lineno, f"no {p.messages_key!r} field")
                continue
            messages = row[p.messages_key]
            why = check_messages(messages)
            if why:
                problems.report("malformed_record", file, lineno, why)
                continue
            meta = row_metadata(row, (p.messages_key, p.id_key))
            meta["messages"] = messages
            doc_id = row_id(row, p.id_key, file, lineno)
            yield Document(id=doc_id, text=render(messages), source=file, metadata=meta)
