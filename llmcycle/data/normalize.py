"""The `normalize` step: repair and tidy text before it is filtered.

Operations, in this order, each one switchable and each counting the documents it changed
(`counters["mojibake_fixed"]`, `"html_stripped"`, `"unicode_normalized"`, `"control_removed"`,
`"whitespace_normalized"`):

1. `fix_mojibake` - ftfy repairs text decoded with the wrong codec ("cafÃ©" -> "café"), including
   C1 control characters that stand for Windows-1252 punctuation, and removes terminal escape codes.
   ftfy is told to do nothing else: no Unicode normalization (that is `form`), no HTML unescaping
   (that is `strip_html`), no quote uncurling, no ligature or full-width folding (NFKC's job), no
   line-break or control-character changes (the steps below). Pure-ASCII documents are skipped: they
   cannot hold mojibake.
2. `strip_html` - remnants of markup: comments, `<script>`/`<style>`/`<noscript>`/`<template>`
   blocks with their content, and tags of known HTML elements with well-formed attributes (`<div>`,
   `<br/>`, `<a href="...">`, `</p>`). Block-level tags become a newline, the end of a table cell a
   space, inline tags nothing. Entities that end in ";" are unescaped (`&amp;` `&#39;` `&#x27;`, `&nbsp;` to
   a plain space); "a < b and c > d", `vector<int>`, `#include <stdio.h>` and "&copy" without ";" are
   left alone.
3. `form` - Unicode normalization: NFC (default: composes characters, changes no meaning), NFKC
   (also folds compatibility characters: ligatures, full-width forms, superscripts), or none.
4. `remove_control` - control characters: C0 except tab and newline, DEL, C1, and the invisible
   format characters zero-width space (U+200B), word joiner (U+2060), byte-order mark (U+FEFF) and
   soft hyphen (U+00AD); "\\r\\n" and a lone "\\r" become "\\n"; ANSI escape sequences are removed whole.
   Kept on purpose: zero-width (non-)joiners U+200C/U+200D (needed by Indic and Persian scripts and
   emoji), bidirectional marks, and U+FFFD (a visible sign that text was lost, which later
   filters may want to see).
5. `whitespace` - line endings to "\\n"; non-breaking and other Unicode spaces (not the ideographic
   space U+3000) to " "; trailing whitespace of every line removed; runs of spaces *inside* a line
   (after its first non-space character) collapsed to one, so indentation of code is kept and tabs
   are kept; more than two consecutive blank lines reduced to two; blank lines at the start and
   whitespace at the end removed.

A document left empty is dropped ("empty").
"""

from __future__ import annotations

import dataclasses
import html
import re
import unicodedata
from typing import Any, Literal

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.steps import MapStep, register_step

_BLOCK_TAGS = (
    "address article aside blockquote body br caption center dd details dialog dir div dl dt fieldset "
    "figcaption figure footer form frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html iframe legend "
    "li main menu nav noframes ol optgroup option p pre section select summary table tbody textarea tfoot "
    "thead title tr ul"
).split()
_CELL_TAGS = ["td", "th"]
_INLINE_TAGS = _CELL_TAGS + (
    "a abbr acronym area audio b base basefont bdi bdo big button canvas cite code col colgroup data "
    "datalist del dfn em embed font i img input ins kbd label link map mark meta meter object output "
    "param picture progress q rp rt ruby s samp slot small source span strike strong sub sup svg "
    "time track tt u var video wbr"
).split()
_ATTRS = r"""(?:\s+[A-Za-z_:][\w:.-]*(?:\s*=\s*(?:"[^"]*"|'[^']*'|[^\s"'<>=`]+))?)*\s*/?"""


def _tag_pattern(names: list[str], closing: str = "/?") -> re.Pattern:
    return re.compile(rf"<{closing}(?:{'|'.join(names)})(?![\w-]){_ATTRS}>", re.IGNORECASE)


_HIDDEN_BLOCKS = re.compile(r"<(script|style|noscript|template)(?![\w-])[^>]*>.*?</\1\s*>",
                            re.IGNORECASE | re.DOTALL)
_COMMENTS = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK = _tag_pattern(_BLOCK_TAGS)
_CELL_END = _tag_pattern(_CELL_TAGS, closing="/")
_INLINE = _tag_pattern(_INLINE_TAGS)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9A-Fa-f]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff]")
_CR = re.compile("\r\n?")

_UNICODE_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f]")
_TRAILING = re.compile(r"[^\S\n]+$", re.MULTILINE)
_INNER_SPACES = re.compile(r"(?<=\S) {2,}(?=\S)")
_BLANK_RUNS = re.compile(r"\n{4,}")
_LEADING_BLANK = re.compile(r"\A(?:[^\S\n]*\n)+")

_FTFY_CONFIG: Any = None


def _ftfy_fix(text: str) -> str:
    global _FTFY_CONFIG
    import ftfy

    if _FTFY_CONFIG is None:
        _FTFY_CONFIG = ftfy.TextFixerConfig(
            unescape_html=False, remove_terminal_escapes=True, fix_encoding=True, restore_byte_a0=True,
            replace_lossy_sequences=True, decode_inconsistent_utf8=True, fix_c1_controls=True,
            fix_latin_ligatures=False, fix_character_width=False, uncurl_quotes=False, fix_line_breaks=False,
            fix_surrogates=True, remove_control_chars=False, normalization=None, explain=False,
        )
    return ftfy.fix_text(text, _FTFY_CONFIG)


def _unescape(m: re.Match) -> str:
    entity = m.group()
    if entity.lower() == "&nbsp;":
        return " "
    return html.unescape(entity)


def strip_html(text: str) -> str:
    if "<" in text:
        text = _HIDDEN_BLOCKS.sub("", text)
        text = _COMMENTS.sub("", text)
        text = _BLOCK.sub("\n", text)
        text = _CELL_END.sub(" ", text)
        text = _INLINE.sub("", text)
    if "&" in text:
        text = _ENTITY.sub(_unescape, text)
    return text


def remove_control(text: str) -> str:
    if "\x1b" in text:
        text = _ANSI.sub("", text)
    if "\r" in text:
        text = _CR.sub("\n", text)
    return _CONTROL.sub("", text)


def normalize_whitespace(text: str) -> str:
    if "\r" in text:
        text = _CR.sub("\n", text)
    text = _UNICODE_SPACES.sub(" ", text)
    text = _TRAILING.sub("", text)
    text = _INNER_SPACES.sub(" ", text)
    text = _BLANK_RUNS.sub("\n\n\n", text)
    text = _LEADING_BLANK.sub("", text)
    return text.rstrip()


@dataclasses.dataclass
class NormalizeParams:
    form: Literal["NFC", "NFKC", "none"] = F("NFC", "Unicode normalization form (NFKC also folds ligatures, "
                                                    "full-width forms, superscripts).")
    fix_mojibake: bool = F(True, "Repair mis-decoded text with ftfy ('cafÃ©' -> 'café'); no other ftfy fix.")
    strip_html: bool = F(True, "Remove leftover HTML tags, comments, script/style blocks; unescape entities.")
    remove_control: bool = F(True, "Remove control and invisible format characters (tab and newline kept).")
    whitespace: bool = F(True, "Tidy whitespace: trailing spaces, runs inside lines, 3+ blank lines, ends.")


@register_step
class Normalize(MapStep):
    """Repair mojibake, strip HTML remnants, normalize Unicode, remove control characters, tidy whitespace."""

    name = "normalize"
    Params = NormalizeParams

    def process(self, doc: Document) -> Document | str:
        p = self.params
        text = doc.text
        counters = self.counters
        if p.fix_mojibake and not text.isascii():
            fixed = _ftfy_fix(text)
            if fixed != text:
                counters["mojibake_fixed"] += 1
                text = fixed
        if p.strip_html and ("<" in text or "&" in text):
            stripped = strip_html(text)
            if stripped != text:
                counters["html_stripped"] += 1
                text = stripped
        if p.form != "none" and not text.isascii() and not unicodedata.is_normalized(p.form, text):
            counters["unicode_normalized"] += 1
            text = unicodedata.normalize(p.form, text)
        if p.remove_control:
            cleaned = remove_control(text)
            if cleaned != text:
                counters["control_removed"] += 1
                text = cleaned
        if p.whitespace:
            tidy = normalize_whitespace(text)
            if tidy != text:
                counters["whitespace_normalized"] += 1
                text = tidy
        if not text.strip():
            return "empty"
        if text != doc.text:
            doc.text = text
        return doc
