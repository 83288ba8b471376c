"""Web archives: WARC files (HTML responses, text extracted with resiliparse) and WET files (text as is)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.readers.base import FileParams, Problems, Reader, register_reader
from llmcycle.data.readers.compressed import open_stream, os_error, stream_error

HTML_SNIFF = 1024


def _is_html(content_type: str | None, payload: bytes) -> bool:
    if content_type:
        return "html" in content_type.lower()
    head = payload[:HTML_SNIFF].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<html" in head


def html_to_text(payload: bytes, charset: str | None, main_content: bool) -> tuple[str, str]:
    """(text, encoding used): decode with the HTTP charset or resiliparse's detection, then extract."""
    from resiliparse.extract.html2text import extract_plain_text
    from resiliparse.parse.encoding import bytes_to_str, detect_encoding

    html = None
    encoding = charset
    if charset:
        try:
            html = bytes_to_str(payload, charset)
        except (LookupError, UnicodeError):
            html = None
    if html is None:
        encoding = detect_encoding(payload, from_html_meta=True)
        html = bytes_to_str(payload, encoding)
    return extract_plain_text(html, main_content=main_content), str(encoding)


@register_reader
class WarcReader(Reader):
    name = "warc"

    @dataclasses.dataclass
    class Params(FileParams):
        paths: list[str] = F([], "WARC or WET files (.warc, .warc.gz, .wet.gz...), globs; one task each.")
        main_content: bool = F(True, "Keep only the page's main content (drop navigation, headers, footers).")
        max_record_bytes: int = F(50_000_000, "Larger records are skipped unread (skipped_oversized).")

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        from fastwarc.warc import ArchiveIterator, WarcRecordType

        try:
            stream = open_stream(file)  # decompressed here, so a truncated .gz is noticed (see compressed.py)
        except OSError as e:
            problems.report("unreadable_file", file, None, os_error(e))
            return
        n = 0
        with stream:
            try:
                kinds = WarcRecordType.response | WarcRecordType.conversion
                records = ArchiveIterator(stream, record_types=kinds, parse_http=False)
                for record in records:
                    n += 1
                    doc = self._record(record, file, n, problems, stream)
                    if doc is not None:
                        yield doc
            except (OSError, ValueError) as e:  # fastwarc: an invalid record header; it cannot go past it
                if not stream_error(stream):
                    problems.report("malformed_record", file, n + 1, f"stops reading after {n} records: {e}")
                    return
            except BaseException as e:
                # fastwarc is written in Rust: an internal failure surfaces as pyo3's PanicException, which
                # derives from BaseException. It is this file's problem, not a reason to end the job.
                if type(e).__name__ != "PanicException":
                    raise
                problems.report("malformed_record", file, n + 1, f"stops reading after {n} records: {e}")
                return
            err = stream_error(stream)
        if err:
            problems.report("truncated_compressed", file, n + 1, f"{n} records read: {err}")

    def _record(self, record: Any, file: str, n: int, problems: Problems, stream: Any) -> Document | None:
        """The document of record `n`, or None (reported) for a broken or non-HTML record."""
        from fastwarc.warc import WarcRecordType

        headers = record.headers
        record_id = (headers.get("WARC-Record-ID") or "").strip().strip("<>")
        declared = (headers.get("Content-Length") or "").strip()
        if declared.isdigit() and int(declared) > self.params.max_record_bytes:
            what = headers.get("WARC-Target-URI") or record_id
            problems.report("skipped_oversized", file, n, f"{what}: {declared} bytes")
            return None
        try:
            record.freeze()
            block = record.reader.read()
        except OSError as e:
            problems.report("malformed_record", file, n, f"cannot read the record ({e})")
            return None
        if not record_id or not declared.isdigit() or len(block) != int(declared):
            if stream_error(stream):  # cut by the truncation, which is reported once for the file
                return None
            what = record_id or "(no WARC-Record-ID)"
            problems.report("malformed_record", file, n, f"incomplete record {what}")
            return None
        url = headers.get("WARC-Target-URI") or ""
        meta: dict[str, Any] = {"url": url, "date": headers.get("WARC-Date") or ""}
        if record.record_type == WarcRecordType.conversion:
            try:
                text = block.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.report("invalid_utf8", file, n, f"{url}: invalid byte at offset {e.start}")
                return None
            meta.update(content_type=headers.get("Content-Type") or "text/plain", record_type="conversion")
            return Document(id=record_id, text=text, source=file, metadata=meta)
        try:
            record.reader.seek(0)
            record.parse_http(auto_decode="all")
            payload = record.reader.read()
        except (OSError, ValueError) as e:
            problems.report("malformed_record", file, n, f"{url}: bad HTTP response ({e})")
            return None
        content_type = record.http_content_type
        if not _is_html(content_type, payload):
            problems.report("skipped_non_html", file, n, f"{url}: {content_type or 'no content type'}")
            return None
        try:
            text, encoding = html_to_text(payload, record.http_charset, self.params.main_content)
        except Exception as e:  # a third-party parser on untrusted bytes: any failure is this record's
            problems.report("malformed_record", file, n, f"{url}: HTML extraction failed ({e})")
            return None
        status = record.http_headers.status_code if record.http_headers is not None else None
        meta.update(
            content_type=content_type or "text/html", record_type="response", status=status, encoding=encoding
        )
        return Document(id=record_id, text=text, source=file, metadata=meta)
