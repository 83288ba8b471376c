"""MediaWiki XML dumps (`pages-articles.xml`, `.xml.bz2` including multistream): articles as plain text."""

from __future__ import annotations

import dataclasses
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.readers.base import FileParams, Problems, Reader, register_reader
from llmcycle.data.readers.compressed import open_stream, os_error, stream_error

# Links into these namespaces are images and categories, not prose. The dump's <siteinfo> adds the
# wiki's own names for namespaces 6 and 14 (Datei, Kategorie, ...).
MEDIA_NAMESPACES = {"file", "image", "media", "category"}
DROPPED_TAGS = {"ref", "references", "gallery", "math", "score", "timeline", "graph", "templatedata"}
_BLANK_LINES = re.compile(r"\n{3,}")
_SPACES = re.compile(r"[ \t]{2,}")


def _local(tag: str) -> str:
    """A tag name without its `{namespace}`: the export schema's version changes the namespace."""
    return tag.rpartition("}")[2]


def _child(elem: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in elem if _local(c.tag) == name), None)


def _child_text(elem: ET.Element, name: str) -> str | None:
    c = _child(elem, name)
    return None if c is None else (c.text or "")


def wikitext_to_text(wikitext: str, media_namespaces: set[str] = MEDIA_NAMESPACES) -> str:
    """Plain text of wikitext: mwparserfromhell's strip_code (templates, markup and tables' syntax go,
    link texts stay), after dropping references and image/category links; lines are stripped, runs of
    spaces become one and 3+ newlines become 2."""
    import mwparserfromhell

    code = mwparserfromhell.parse(wikitext)
    for node in code.filter_tags(matches=lambda n: str(n.tag).strip().lower() in DROPPED_TAGS):
        _remove(code, node)
    for link in code.filter_wikilinks():
        title = str(link.title).strip()  # a leading ':' ([[:Category:X|...]]) is a visible link: kept
        prefix, colon, _ = title.partition(":")
        if colon and prefix.strip().lower() in media_namespaces:
            _remove(code, link)
    text = code.strip_code(normalize=True, collapse=True)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.splitlines())
    return _BLANK_LINES.sub("\n\n", text).strip()


def _remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # inside a node removed already
        pass


@register_reader
class WikiReader(Reader):
    name = "wiki"

    @dataclasses.dataclass
    class Params(FileParams):
        paths: list[str] = F([], "MediaWiki XML dumps (.xml, .xml.bz2) or glob patterns; one task each.")

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        try:
            stream = open_stream(file)
        except OSError as e:
            problems.report("unreadable_file", file, None, os_error(e))
            return
        media = set(MEDIA_NAMESPACES)
        pages = 0
        with stream:
            root = None
            try:
                for event, elem in ET.iterparse(stream, events=("start", "end")):
                    if root is None:
                        root = elem
                    if event != "end":
                        continue
                    tag = _local(elem.tag)
                    if tag == "namespace" and elem.get("key") in ("6", "14") and elem.text:
                        media.add(elem.text.strip().lower())
                    elif tag == "page":
                        pages += 1
                        doc = self._page(elem, file, pages, media, problems)
                        root.clear()  # drop the page (and the ones before it) from the tree
                        if doc is not None:
                            yield doc
            except ET.ParseError as e:
                err = stream_error(stream)
                if err:
                    problems.report("truncated_compressed", file, pages + 1, f"after {pages} pages: {err}")
                else:
                    detail = f"XML ends or breaks after {pages} pages: {e}"
                    problems.report("malformed_record", file, pages + 1, detail)
                return
            except OSError as e:
                problems.report("unreadable_file", file, pages + 1, os_error(e))
                return
            err = stream_error(stream)
        if err:
            problems.report("truncated_compressed", file, pages + 1, f"after {pages} pages: {err}")

    def _page(
        self, page: ET.Element, file: str, n: int, media: set[str], problems: Problems
    ) -> Document | None:
        """The article in `page` (number `n` in the file), None for other namespaces and redirects."""
        title, page_id, ns = _child_text(page, "title"), _child_text(page, "id"), _child_text(page, "ns")
        if (ns or "0").strip() != "0" or _child(page, "redirect") is not None:
            return None
        if not title or not page_id or not page_id.strip().isdigit():
            problems.report("malformed_record", file, n, f"no title or numeric page id (title {title!r})")
            return None
        revision = _child(page, "revision")
        if revision is None:
            problems.report("malformed_record", file, n, f"page {title!r} has no revision")
            return None
        wikitext = _child_text(revision, "text") or ""
        if wikitext.lstrip()[:9].upper() == "#REDIRECT":
            return None
        try:
            text = wikitext_to_text(wikitext, media)
        except Exception as e:  # a third-party parser on untrusted markup: any failure is this page's
            problems.report("malformed_record", file, n, f"page {title!r}: markup does not parse ({e})")
            return None
        page_id = page_id.strip()
        meta = {"title": title, "page_id": int(page_id)}
        rev_id, stamp = _child_text(revision, "id"), _child_text(revision, "timestamp")
        if rev_id and rev_id.strip().isdigit():
            meta["revision_id"] = int(rev_id)
        if stamp:
            meta["timestamp"] = stamp
        return Document(id=f"wiki:{page_id}", text=text, source=file, metadata=meta)
