"""Opening input files by suffix, streaming, and reading them line by line without trusting them.

`.gz` (gzip, several members allowed), `.zst`/`.zstd` (zstandard, several frames allowed) and `.bz2`
(several streams allowed, as in Wikipedia's multistream dumps) are decompressed as they are read;
anything else is read as is. Decompression is done here rather than by `gzip.open` & co. so that a
truncated or corrupt stream ends the data cleanly with a note (`stream_error`) instead of an exception
that would lose the lines already decompressed.
"""

from __future__ import annotations

import bz2
import io
import zlib
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from llmcycle.data.readers.base import Problems

CHUNK = 1 << 16  # compressed bytes read at a time
BUFFER = 1 << 20  # size of the buffered reader over a file


def _zstd() -> Any:
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


def _decompressor(path: str) -> Callable[[], Any] | None:
    name = path.lower()
    if name.endswith(".gz"):
        return lambda: zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    if name.endswith((".zst", ".zstd")):
        return _zstd
    if name.endswith(".bz2"):
        return bz2.BZ2Decompressor
    return None


def is_compressed(path: str) -> bool:
    return _decompressor(path) is not None


class _Decompressing(io.RawIOBase):
    """A raw stream of decompressed bytes; never raises on bad data, sets `error` and ends instead."""

    def __init__(self, raw: BinaryIO, new: Callable[[], Any]):
        self._raw, self._new = raw, new
        self._d: Any = None  # the decompressor of the member being read; None between members
        self._pending = b""  # input left over after the end of a member
        self._buf, self._pos, self._done = b"", 0, False
        self._offset = 0  # decompressed bytes handed out so far
        self.error: str | None = None

    def readable(self) -> bool:
        return True

    def tell(self) -> int:  # fastwarc asks where the stream is; it never seeks
        return self._offset

    def readinto(self, b: Any) -> int:
        while self._pos >= len(self._buf):
            if self._done:
                return 0
            self._fill()
        n = min(len(b), len(self._buf) - self._pos)
        b[:n] = self._buf[self._pos : self._pos + n]
        self._pos += n
        self._offset += n
        return n

    def _fill(self) -> None:
        self._buf, self._pos = b"", 0
        data, self._pending = (self._pending or self._raw.read(CHUNK)), b""
        if not data:
            self._done = True
            if self._d is not None:
                self.error = "the compressed stream ends early (truncated file)"
            return
        if self._d is None:
            self._d = self._new()
        try:
            self._buf = self._d.decompress(data)
        except Exception as e:  # zlib.error, zstandard.ZstdError, OSError/EOFError from bz2
            self._done = True
            self.error = f"corrupt compressed data ({e})"
            return
        if self._d.eof:  # end of one member; what follows (if anything) starts the next one
            self._pending, self._d = self._d.unused_data, None

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_stream(path: str) -> BinaryIO:
    """A buffered binary stream of the file's (decompressed) bytes. Raises OSError if it cannot be opened."""
    raw = open(path, "rb", buffering=0)  # closed with the returned stream
    new = _decompressor(path)
    if new is None:
        return io.BufferedReader(raw, buffer_size=BUFFER)
    return io.BufferedReader(_Decompressing(raw, new), buffer_size=BUFFER)


def stream_error(stream: BinaryIO) -> str | None:
    """Why the decompressed data of `stream` ended early, or None if it is complete (so far)."""
    return getattr(getattr(stream, "raw", None), "error", None)


def os_error(e: OSError) -> str:
    return e.strerror or str(e)


def read_limited(path: str, limit: int) -> bytes:
    """At most `limit` decompressed bytes of a file (raises OSError; a truncated stream raises EOFError)."""
    with open_stream(path) as f:
        data = f.read(limit)
        err = stream_error(f)
    if err:
        raise EOFError(err)
    return data


def iter_lines(file: str, problems: Problems) -> Iterator[tuple[int, str]]:
    """(line number from 1, text without its line ending) for each line that decodes as UTF-8.

    Reported, never raised: `unreadable_file` (cannot open or read), `invalid_utf8` (that line is
    skipped, the others go on), `truncated_compressed` (the stream stops there: the complete lines
    before it are kept, a last partial line is dropped).
    """
    try:
        stream = open_stream(file)
    except OSError as e:
        problems.report("unreadable_file", file, None, os_error(e))
        return
    lineno = 0
    broke = None
    with stream:
        try:
            for raw in stream:
                lineno += 1
                if not raw.endswith(b"\n") and stream_error(stream):
                    broke = lineno  # a partial line cut by the truncation
                    break
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems.report("invalid_utf8", file, lineno, f"invalid byte at offset {e.start}")
                    continue
                if lineno == 1 and text.startswith("\ufeff"):
                    text = text[1:]
                yield lineno, text.rstrip("\r\n")
        except OSError as e:
            problems.report("unreadable_file", file, lineno + 1, os_error(e))
            return
        err = stream_error(stream)
    if err:
        problems.report("truncated_compressed", file, broke or lineno + 1, err)
