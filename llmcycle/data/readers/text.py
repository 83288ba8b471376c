"""Plain-text trees: every matched file is one document."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.readers.base import FileParams, Problems, Reader, register_reader
from llmcycle.data.readers.compressed import is_compressed, os_error, read_limited

BINARY_SNIFF = 8192  # a NUL byte in the first this many bytes marks a binary file


@register_reader
class TextReader(Reader):
    name = "text"

    @dataclasses.dataclass
    class Params(FileParams):
        paths: list[str] = F([], "Text files or glob patterns ('corpus/**/*.txt'); one document each.")
        max_file_bytes: int = F(10_000_000, "Files larger than this (after decompression) are not read.")

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        limit = self.params.max_file_bytes
        try:
            size = None if is_compressed(file) else os.stat(file).st_size
            if size is not None and size > limit:
                problems.report("oversized_file", file, None, f"{size} bytes > {limit}")
                return
            data = read_limited(file, limit + 1)
        except OSError as e:
            problems.report("unreadable_file", file, None, os_error(e))
            return
        except EOFError as e:
            problems.report("truncated_compressed", file, None, str(e))
            return
        if len(data) > limit:
            problems.report("oversized_file", file, None, f"more than {limit} bytes")
            return
        if b"\0" in data[:BINARY_SNIFF]:
            problems.report("binary_file", file, None, "NUL byte")
            return
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            problems.report("invalid_utf8", file, line, f"invalid byte at offset {e.start}")
            return
        yield Document(id=file, text=text.removeprefix("\ufeff"), source=file, metadata={})
