"""The `normalize` step: mojibake, HTML remnants, Unicode forms, control characters, whitespace."""

from __future__ import annotations

import pytest

from llmcycle.data.document import Document
from llmcycle.data.normalize import Normalize, NormalizeParams
from llmcycle.data.steps import build_step
from llmcycle.errors import ConfigError

ONLY = dict(fix_mojibake=False, strip_html=False, remove_control=False, whitespace=False, form="none")


def norm(text: str, **params) -> str:
    result = Normalize(NormalizeParams(**params)).process(Document(id="d", text=text, source="t"))
    return result.text if isinstance(result, Document) else result


def only(text: str, **params) -> str:
    """Apply just the named operation(s)."""
    return norm(text, **{**ONLY, **params})


def test_unicode_forms():
    decomposed = "cafe\u0301 \ufb01ne \uff21\u00b2"
    assert only(decomposed, form="NFC") == "caf\u00e9 \ufb01ne \uff21\u00b2"  # composed; ligature kept
    assert only(decomposed, form="NFKC") == "caf\u00e9 fine A2"  # compatibility forms folded
    assert only(decomposed) == decomposed  # form: none


def test_mojibake_repair():
    assert only("cafÃ©", fix_mojibake=True) == "café"
    assert only("The Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows.", fix_mojibake=True) == (
        "The Mona Lisa doesn\u2019t have eyebrows.")  # curly quote kept: no uncurling
    # Nothing but the encoding: ligatures, full-width letters, entities and line breaks are left alone.
    untouched = "\ufb01ne \uff21 &amp; a\r\nb caf\u00e9"
    assert only(untouched, fix_mojibake=True) == untouched
    assert only("cafÃ©") == "cafÃ©"


def test_html_remnants():
    text = ('<div class="post"><p>First&nbsp;line<br/>second &amp; third &#39;quoted&#39; &#x263A;</p>'
            '<script type="text/javascript">var x = "<p>";</script><style>p {color: red}</style>'
            '<!-- a comment --><span>inline</span> <a href="https://x.org">link</a>'
            '<table><tr><td>cell</td><td>cell2</td></tr></table></div>')
    assert only(text, strip_html=True) == (
        "\n\nFirst line\nsecond & third 'quoted' \u263a\ninline link\n\ncell cell2 \n\n\n")
    kept = ("if a < b and c > d: print(a<b) # vector<int> v; #include <stdio.h> List<String> "
            "&copy no semicolon, AT&T, x &= 1;")
    assert only(kept, strip_html=True) == kept
    assert norm(text) == "First line\nsecond & third 'quoted' \u263a\ninline link\n\ncell cell2"


def test_control_characters():
    text = "a\x00b\x07c\x1b[31mred\x1b[0m\u200bd\u00ade\ufeff\u2060f\tg\r\nh\ri\x85j\u200dk\ufffd"
    # Kept: tab, newline (CR LF and lone CR become LF), zero-width joiner, U+FFFD.
    assert only(text, remove_control=True) == "abcreddef\tg\nh\nij\u200dk\ufffd"


def test_whitespace():
    text = ("\n\n  \nTitle   with  gaps   \n\n\n\n\n\nBody\u00a0text\u2009here\t\ttabs\n"
            "    def f():\n        return  1   \n\n\n\n   ")
    assert only(text, whitespace=True) == (
        "Title with gaps\n\n\nBody text here\t\ttabs\n    def f():\n        return 1")


def test_all_together_with_counters():
    step = Normalize()
    docs = ["cafÃ© <b>bold</b>", "plain ascii text", "e\u0301\x00  x ", "   \n\u200b\n"]
    results = [step.process(Document(id=str(i), text=t, source="t")) for i, t in enumerate(docs)]
    assert [r.text if isinstance(r, Document) else r for r in results] == [
        "café bold", "plain ascii text", "\u00e9 x", "empty"]
    assert dict(step.counters) == {"mojibake_fixed": 1, "html_stripped": 1, "unicode_normalized": 1,
                                   "control_removed": 2, "whitespace_normalized": 2}


def test_bad_parameters():
    with pytest.raises(ConfigError, match=r"steps\[0\]\.normalize\.form"):
        build_step({"normalize": {"form": "NFD"}}, "steps[0]")
    with pytest.raises(ConfigError, match=r"steps\[0\]\.normalize\.strip_html"):
        build_step({"normalize": {"strip_html": "yes"}}, "steps[0]")
    assert build_step({"normalize": {"form": "NFKC"}}, "steps[0]").params.form == "NFKC"
