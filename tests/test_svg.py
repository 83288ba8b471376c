"""Tests for the report's inline SVG charts: well-formed XML, element counts, proportional bars, escaping."""

import math
import xml.etree.ElementTree as ET

import pytest

from llmcycle.svg import PALETTE, bar_chart, fmt, funnel_chart, grouped_bar_chart, line_chart, nice_ticks

NS = "{http://www.w3.org/2000/svg}"
HOSTILE = 'a<b & "c"\'</svg>'


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == NS + "svg"
    w, h = root.get("width"), root.get("height")
    assert root.get("viewBox") == f"0 0 {w} {h}" and float(w) > 0 and float(h) > 0
    assert root.find(NS + "title") is not None
    return root


def _all(root: ET.Element, tag: str, cls: str | None = None) -> list[ET.Element]:
    return [e for e in root.iter(NS + tag) if cls is None or e.get("class") == cls]


def _texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(NS + "text")]


def test_nice_ticks():
    assert nice_ticks(0, 1) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0], abs=0)
    assert nice_ticks(0.3, 7.9) == [0, 2, 4, 6, 8]
    assert nice_ticks(0, 10000) == [0, 2000, 4000, 6000, 8000, 10000]
    assert nice_ticks(2.1, 4.6) == [2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert nice_ticks(-3, 3) == [-4, -2, 0, 2, 4]
    assert nice_ticks(7.9, 0.3) == [0, 2, 4, 6, 8]  # reversed input
    flat = nice_ticks(5, 5)
    assert flat[0] < 5 < flat[-1]
    assert nice_ticks(0, 0) == [-1.0, -0.5, 0.0, 0.5, 1.0]


def test_fmt():
    assert [fmt(v) for v in (0, 1200, 3.4e6, 0.012, 0.5, 999999, -2500, 12.0, 7e9)] == [
        "0", "1.2k", "3.4M", "0.012", "0.5", "1M", "-2.5k", "12", "7G"]
    assert fmt(float("nan")) == fmt(None) == fmt(float("inf")) == "n/a"


def test_line_chart_counts_breaks_and_dots():
    series = {
        "train": [(0, 4.0), (10, 3.0), (20, float("nan")), (30, 2.5), (40, 2.0), (50, None)],
        "held-out": [(0, 4.2), (20, 3.1), (40, 2.4)],
        "dpo": [(50, 2.2)],
    }
    root = _parse(line_chart(series, title="Loss", x_label="step", y_label="loss"))
    polys = _all(root, "polyline", "series")
    assert len(polys) == 3  # train broken at the NaN into two lines, plus held-out
    assert [len(p.get("points").split()) for p in polys] == [2, 2, 3]
    assert len(_all(root, "circle", "series")) == 1  # dpo's single point
    assert len(_all(root, "rect", "legend")) == 3
    assert [p.get("stroke") for p in polys] == [PALETTE[0], PALETTE[0], PALETTE[1]]
    texts = _texts(root)
    assert {"step", "loss", "train", "held-out", "dpo"} <= set(texts)
    assert {"0", "10", "20", "30", "40", "50"} <= set(texts)  # x ticks
    # lower loss is drawn lower on the page: larger SVG y
    ys = [float(xy.split(",")[1]) for xy in polys[2].get("points").split()]
    assert ys[0] < ys[1] < ys[2]


def test_line_chart_log_y_and_single_series():
    series = {"loss": [(1, 100.0), (2, 10.0), (3, 0.0), (4, -1.0), (5, 0.01)]}
    root = _parse(line_chart(series, title="t", x_label="x", y_label="y", log_y=True))
    assert len(_all(root, "polyline", "series")) == 1 and len(_all(root, "circle", "series")) == 1
    assert not _all(root, "rect", "legend")  # one series: no legend
    assert {"0.01", "0.1", "1", "10", "100"} <= set(_texts(root))


@pytest.mark.parametrize("series", [{}, {"a": []}, {"a": [(0, float("nan")), (1, None)]}, {"a": [None]}])
def test_line_chart_no_data(series):
    root = _parse(line_chart(series, title="empty", x_label="x", y_label="y"))
    assert "no data" in _texts(root)
    assert not _all(root, "polyline")


def test_line_chart_flat_and_all_nonpositive_log():
    root = _parse(line_chart({"a": [(0, 1.0), (0, 1.0)]}, title="t", x_label="x", y_label="y"))
    assert len(_all(root, "polyline", "series")) == 1
    root = _parse(line_chart({"a": [(0, 0.0), (1, -2.0)]}, title="t", x_label="x", y_label="y", log_y=True))
    assert "no data" in _texts(root)


def test_bar_chart_proportional():
    values = [12.0, 3.0, 0.0, 6.0]
    root = _parse(bar_chart(["data", "pretrain", "sft", "dpo"], values, title="Seconds", unit="s"))
    rects = _all(root, "rect", "bar")
    assert len(rects) == 4
    widths = [float(r.get("width")) for r in rects]
    assert widths[2] == 0
    assert widths[0] / 12 == pytest.approx(widths[1] / 3, rel=1e-3) == pytest.approx(widths[3] / 6, rel=1e-3)
    assert widths[0] > 300  # largest bar fills most of the width
    assert {"12 s", "3 s", "0 s", "6 s"} <= set(_texts(root))
    taller = _parse(bar_chart([str(i) for i in range(10)], list(range(10)), title="t"))
    assert float(taller.get("height")) > float(root.get("height"))


def test_bar_chart_negative_missing_and_errors():
    root = _parse(bar_chart(["a", "b", "c"], [-2.0, 4.0, float("nan")], title="t"))
    rects = _all(root, "rect", "bar")
    assert len(rects) == 2  # NaN: no bar, 'n/a' text
    assert "n/a" in _texts(root)
    (xa, wa), (xb, wb) = [(float(r.get("x")), float(r.get("width"))) for r in rects]
    assert wb == pytest.approx(2 * wa, rel=1e-3) and xa + wa == pytest.approx(xb, abs=0.02)  # meet at zero
    assert "no data" in _texts(_parse(bar_chart([], [], title="t")))
    with pytest.raises(ValueError):
        bar_chart(["a"], [1.0, 2.0], title="t")


def test_grouped_bar_chart():
    groups = ["acc", "pass@1", "win-rate"]
    series = {"pretrain": [0.2, 0.1, None], "sft": [0.5, 0.3, 0.4], "dpo": [0.6, float("nan")]}
    root = _parse(grouped_bar_chart(groups, series, title="Eval by stage"))
    rects = _all(root, "rect", "bar")
    assert len(rects) == 6  # 9 slots minus None, NaN and the short list's missing entry
    assert len(_all(root, "rect", "legend")) == 3
    fills = [r.get("fill") for r in rects]
    assert fills == [PALETTE[0], PALETTE[1], PALETTE[2], PALETTE[0], PALETTE[1], PALETTE[1]]
    heights = [float(r.get("height")) for r in rects]
    assert heights[3] == pytest.approx(heights[0] / 2, rel=1e-3)  # 0.1 vs 0.2
    assert heights[2] == pytest.approx(heights[0] * 3, rel=1e-3)  # 0.6 vs 0.2
    texts = _texts(root)
    assert {"0", "0.2", "0.4", "0.6"} <= set(texts) and set(groups) <= set(texts)


def test_grouped_bar_chart_edge_cases():
    assert "no data" in _texts(_parse(grouped_bar_chart(["a"], {"s": [None]}, title="t")))
    assert "no data" in _texts(_parse(grouped_bar_chart([], {}, title="t")))
    root = _parse(grouped_bar_chart(["a", "b"], {"s": [0.0, -0.5]}, title="t"))
    rects = _all(root, "rect", "bar")
    assert len(rects) == 2 and float(rects[0].get("height")) == 0 and float(rects[1].get("height")) > 0
    assert not _all(root, "rect", "legend")


def test_funnel_chart():
    steps = [("read", 200), ("dedup", 187), ("quality", 150), ("decontam", 150)]
    root = _parse(funnel_chart(steps, title="Pipeline"))
    rects = _all(root, "rect", "bar")
    assert len(rects) == 4
    widths = [float(r.get("width")) for r in rects]
    assert [w / widths[0] for w in widths] == pytest.approx([1.0, 0.935, 0.75, 0.75], rel=1e-3)
    texts = _texts(root)
    assert "read  200 (100.0% of first)" in texts and "dedup  187 (93.5% of first)" in texts
    assert ["-13", "-37", "0"] == [t for t in texts if t in ("-13", "-37", "0")]


def test_funnel_chart_edge_cases():
    assert "no data" in _texts(_parse(funnel_chart([], title="t")))
    root = _parse(funnel_chart([("read", 0), ("keep", 0)], title="t"))
    assert [float(r.get("width")) for r in _all(root, "rect", "bar")] == [0, 0]
    assert "read  0 (n/a)" in _texts(root)


def test_hostile_labels_are_escaped():
    charts = [
        line_chart({HOSTILE: [(0, 1.0), (1, 2.0)], "b": [(0, 2.0)]}, title=HOSTILE, x_label=HOSTILE, y_label=HOSTILE),
        bar_chart([HOSTILE], [1.0], title=HOSTILE, unit=HOSTILE),
        grouped_bar_chart([HOSTILE], {HOSTILE: [0.5], "x": [0.2]}, title=HOSTILE),
        funnel_chart([(HOSTILE, 10), ("b", 5)], title=HOSTILE),
    ]
    for svg in charts:
        root = _parse(svg)
        assert root.find(NS + "title").text == HOSTILE
        assert svg.count("<svg") == 1 and svg.count("</svg>") == 1
        assert any(HOSTILE in t for t in _texts(root))


def test_outputs_are_deterministic_and_finite():
    series = {"a": [(i, math.exp(-i / 10)) for i in range(50)]}
    one = line_chart(series, title="t", x_label="x", y_label="y", log_y=True)
    assert one == line_chart(series, title="t", x_label="x", y_label="y", log_y=True)
    assert "nan" not in one.lower() and "inf" not in one.lower()
