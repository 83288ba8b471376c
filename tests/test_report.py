"""The report's own pieces: loss curves read back from metrics.jsonl, and the HTML renderer."""

import json
from xml.etree import ElementTree

from llmcycle.report import read_curves, render_html, render_markdown
from llmcycle.svg import bar_chart


def test_curves_keep_the_last_record_of_a_step_and_skip_torn_lines(tmp_path):
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "eval": True, "val_loss": 4.5},
             {"step": 2, "samples": []}, {"step": 2, "loss": 3.9}]  # a resumed run redid step 2
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"step": 3, "lo')
    assert read_curves(path, "val_loss") == {"training loss": [(1, 5.0), (2, 3.9)], "held-out loss": [(2, 4.5)]}
    assert read_curves(tmp_path / "absent.jsonl", "val_loss") == {}


def test_html_escapes_text_and_keeps_charts_whole():
    sections = [("Data <b>", [("p", "made from `a<b>` & more"), ("table", ["step", "n"], [["x<y", 3]]),
                              ("chart", bar_chart(["a", "b"], [1.0, 2.0], title="t")), ("list", ["`q`"])])]
    page = render_html("run `x`", ["head"], sections)
    assert "<h2>Data &lt;b&gt;</h2>" in page and "<code>a&lt;b&gt;</code> &amp; more" in page
    assert "<td>x&lt;y</td><td>3</td>" in page and "<li><code>q</code></li>" in page
    svg = page[page.index("<svg"): page.index("</svg>") + 6]
    ElementTree.fromstring(svg)  # the chart went in as markup, not escaped text
    md = render_markdown("run `x`", ["head"], sections)
    assert "| x<y | 3 |" in md and "<svg" not in md
