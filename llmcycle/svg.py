"""Dependency-free inline SVG charts for the run report (`runs/<name>/report.html`).

The report is one self-contained HTML file (no JavaScript, no external assets), and it needs only a few
charts, so they are drawn here as plain SVG strings instead of pulling in matplotlib. Every chart is one
`<svg>` element with width/height/viewBox, a <title> for screen readers, 12px sans-serif text and "nice"
(1/2/5 x 10^k) ticks. All text goes through `_esc`: labels (run, stage, metric names) come from user data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from html import escape

# Tableau 10 (first 8): distinguishable and colour-blind friendlier than a rainbow. Fixed order, so series i
# has the same colour in every chart of a report.
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#9c755f")
CHAR_W = 7.0  # rough width of a 12px sans-serif character: SVG cannot measure text without a renderer


def _esc(s: object) -> str:
    return escape(str(s), quote=True)


def _num(v: object) -> float | None:
    """float(v) if it is a finite number, else None (NaN, inf, None and junk all mean 'no value')."""
    try:
        return f if math.isfinite(f := float(v)) else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def fmt(v: float | None) -> str:
    """Compact number: 1234 -> '1.23k', 3.4e6 -> '3.4M', 0.012 -> '0.012', 0.5 -> '0.5'; NaN/None -> 'n/a'."""
    f = _num(v)
    if f is None:
        return "n/a"
    r = float(f"{f:.3g}")  # round first, so 999999 becomes '1M', not '1e+03k'
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(r) >= div:
            return f"{r / div:.3g}{suffix}"
    return f"{r:.3g}" if r else "0"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n+1 round ticks (step 1, 2 or 5 x 10^k) covering [lo, hi]: (0.3, 7.9) -> [0, 2, 4, 6, 8]."""
    lo, hi = min(lo, hi), max(lo, hi)
    if hi == lo:  # a flat series still needs a visible range around its value
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    digits = max(0, -math.floor(math.log10(step))) + 1  # round away float noise such as 0.6000000000000001
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    return [round(i * step, digits) + 0.0 for i in range(first, last + 1)]  # + 0.0 turns -0.0 into 0.0


def _scale(d0: float, d1: float, r0: float, r1: float) -> Callable[[float], float]:
    """Linear map from data [d0, d1] to pixels [r0, r1]."""
    k = (r1 - r0) / ((d1 - d0) or 1.0)
    return lambda v: r0 + (v - d0) * k


def _clip(s: str, px: float) -> str:
    n = max(int(px / CHAR_W), 2)
    return s if len(s) <= n else s[: n - 1] + "\u2026"


def _text(x: float, y: float, s: object, anchor: str = "start", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_esc(s)}</text>'


def _line(x1: float, y1: float, x2: float, y2: float, stroke: str = "#555") -> str:
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}"/>'


def _svg(title: str, width: float, height: float, body: list[str]) -> str:
    w, h = round(width), round(height)
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
            f'font-family="sans-serif" font-size="12"><title>{_esc(title)}</title>')
    return head + _text(w / 2, 18, title, "middle", ' font-size="14" font-weight="bold"') + "".join(body) + "</svg>"


def _empty(title: str, width: float, height: float) -> str:
    return _svg(title, width, height, [_text(width / 2, height / 2 + 10, "no data", "middle", ' fill="#888"')])


def _legend(names: list[str], left: float, top: float, right: float) -> tuple[list[str], float]:
    """Colour swatch + name per series, wrapping onto new rows; returns (elements, height used)."""
    parts, x, y = [], left, top + 10
    for i, name in enumerate(names):
        name = _clip(name, 200)
        w = 14 + CHAR_W * len(name) + 14
        if x > left and x + w > right:
            x, y = left, y + 16
        parts.append(f'<rect class="legend" x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" '
                     f'fill="{PALETTE[i % len(PALETTE)]}"/>')
        parts.append(_text(x + 14, y, name))
        x += w
    return parts, y - top + 8


def _y_axis(ticks: list[float], labels: list[str], sy: Callable[[float], float],
            left: float, right: float) -> list[str]:
    """Horizontal grid line and label per tick, plus the left axis line."""
    out = []
    for t, lab in zip(ticks, labels):
        y = sy(t)
        out += [_line(left, y, right, y, "#e3e3e3"), _text(left - 6, y + 4, lab, "end")]
    return out + [_line(left, sy(ticks[0]), left, sy(ticks[-1]))]


def line_chart(series: dict[str, list[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
               log_y: bool = False, width: int = 640, height: int = 320) -> str:
    """Several polylines sharing x and y axes (e.g. train and held-out loss vs step, per stage).

    Non-finite or None points break a line rather than crash; a run of a single point is drawn as a dot.
    With log_y the y axis has decade ticks and non-positive values are skipped (log of them is undefined).
    """
    runs: dict[str, list[list[tuple[float, float]]]] = {}
    for name, pts in series.items():
        runs[name], cur = [], []
        for p in pts:
            x, y = (None, None) if p is None else (_num(p[0]), _num(p[1]))
            if x is None or y is None or (log_y and y <= 0):
                cur = []  # the next good point starts a new run
            else:
                if not cur:
                    runs[name].append(cur)
                cur.append((x, math.log10(y) if log_y else y))
    pts = [p for rs in runs.values() for r in rs for p in r]
    if not pts:
        return _empty(title, width, height)
    left, right, bottom = 62.0, width - 16.0, height - 40.0
    legend, leg_h = _legend(list(series), left, 28, right) if len(series) > 1 else ([], 0.0)
    top = 30.0 + leg_h
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    xt = nice_ticks(min(xs), max(xs), max(2, int((right - left) // 90)))
    if log_y:  # ticks at whole decades, thinned out when the data spans many of them
        lo, hi = math.floor(min(ys)), math.ceil(max(ys))
        hi += hi == lo
        step = max(1, math.ceil((hi - lo) / 6))
        yt = [float(k) for k in range(lo, hi + step, step)]
        ylabels = [fmt(10.0 ** k) for k in yt]
    else:
        yt = nice_ticks(min(ys), max(ys), max(2, int((bottom - top) // 45)))
        ylabels = [fmt(t) for t in yt]
    sx, sy = _scale(xt[0], xt[-1], left, right), _scale(yt[0], yt[-1], bottom, top)
    body = legend + _y_axis(yt, ylabels, sy, left, right)
    body.append(_line(left, bottom, right, bottom))
    for t in xt:
        body += [_line(sx(t), bottom, sx(t), bottom + 4), _text(sx(t), bottom + 16, fmt(t), "middle")]
    body.append(_text((left + right) / 2, height - 6, x_label, "middle"))
    body.append(_text(14, (top + bottom) / 2, y_label, "middle",
                      f' transform="rotate(-90 14 {(top + bottom) / 2:.1f})"'))
    for i, (name, rs) in enumerate(runs.items()):
        colour, tip = PALETTE[i % len(PALETTE)], f"<title>{_esc(name)}</title>"
        for r in rs:
            if len(r) == 1:
                body.append(f'<circle class="series" cx="{sx(r[0][0]):.1f}" cy="{sy(r[0][1]):.1f}" r="3" '
                            f'fill="{colour}">{tip}</circle>')
            else:
                coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in r)
                body.append(f'<polyline class="series" fill="none" stroke="{colour}" stroke-width="1.5" '
                            f'stroke-linejoin="round" points="{coords}">{tip}</polyline>')
    return _svg(title, width, height, body)


def bar_chart(labels: list[str], values: list[float], *, title: str, unit: str = "", width: int = 640) -> str:
    """Horizontal bars, one per label, with the value at the bar end; the height grows with the bar count.

    Bars start at zero (negative values extend left of it); a missing or non-finite value gets no bar, only 'n/a'.
    """
    if len(labels) != len(values):
        raise ValueError(f"bar_chart: {len(labels)} labels but {len(values)} values")
    if not labels:
        return _empty(title, width, 80)
    vals = [_num(v) for v in values]
    known = [v for v in vals if v is not None]
    lo, hi = min([0.0, *known]), max([0.0, *known])
    label_w = min(max(len(str(s)) for s in labels) * CHAR_W + 12, width * 0.35)
    left, right, top, row = 8 + label_w, width - 90.0, 30.0, 22.0
    sx = _scale(lo, hi if hi > lo else 1.0, left, right)
    body = [_line(sx(0), top, sx(0), top + row * len(labels))]
    for i, (lab, v) in enumerate(zip(labels, vals)):
        y = top + i * row
        body.append(_text(left - 6, y + 15, _clip(str(lab), label_w - 8), "end"))
        if v is None:
            body.append(_text(sx(0) + 4, y + 15, "n/a", "start", ' fill="#888"'))
            continue
        x0, x1 = sorted((sx(0), sx(v)))
        body.append(f'<rect class="bar" x="{x0:.2f}" y="{y + 3:.1f}" width="{x1 - x0:.2f}" height="{row - 6:.1f}" '
                    f'fill="{PALETTE[0]}"><title>{_esc(lab)}: {_esc(fmt(v))}</title></rect>')
        body.append(_text(max(x1, sx(0)) + 4, y + 15, fmt(v) + (f" {unit}" if unit else "")))
    return _svg(title, width, top + row * len(labels) + 10, body)


def grouped_bar_chart(groups: list[str], series: dict[str, list[float | None]], *, title: str,
                      width: int = 640, height: int = 320) -> str:
    """Vertical grouped bars: one group per x label (a metric), one bar per series (a model stage).

    None (or NaN, or a list shorter than `groups`) means a missing bar; its slot stays empty so the
    series keep their positions and colours across groups.
    """
    names = list(series)
    vals = {n: [_num(vs[g]) if g < len(vs) else None for g in range(len(groups))] for n, vs in series.items()}
    known = [v for vs in vals.values() for v in vs if v is not None]
    if not groups or not known:
        return _empty(title, width, height)
    left, right, bottom = 52.0, width - 16.0, height - 30.0
    legend, leg_h = _legend(names, left, 28, right) if len(names) > 1 else ([], 0.0)
    top = 30.0 + leg_h
    lo, hi = min(0.0, *known), max(0.0, *known)
    yt = nice_ticks(lo, hi if hi > lo else 1.0, max(2, int((bottom - top) // 45)))
    sy = _scale(yt[0], yt[-1], bottom, top)
    body = legend + _y_axis(yt, [fmt(t) for t in yt], sy, left, right)
    gw = (right - left) / len(groups)
    bw = gw * 0.8 / max(len(names), 1)
    for g, group in enumerate(groups):
        gx = left + g * gw
        body.append(_text(gx + gw / 2, bottom + 16, _clip(str(group), gw - 4), "middle"))
        for j, name in enumerate(names):
            v = vals[name][g]
            if v is None:
                continue
            x, (y0, y1) = gx + gw * 0.1 + j * bw, sorted((sy(0), sy(v)))
            body.append(f'<rect class="bar" x="{x:.2f}" y="{y0:.2f}" width="{bw - 1:.2f}" height="{y1 - y0:.2f}" '
                        f'fill="{PALETTE[j % len(PALETTE)]}"><title>{_esc(name)} / {_esc(group)}: '
                        f'{_esc(fmt(v))}</title></rect>')
            if bw >= 24:  # value above the bar only where it fits
                body.append(_text(x + bw / 2, y0 - 3, fmt(v), "middle", ' font-size="10"'))
    body.append(_line(left, sy(0), right, sy(0)))
    return _svg(title, width, height, body)


def funnel_chart(steps: list[tuple[str, int]], *, title: str, width: int = 640) -> str:
    """Data-pipeline funnel: per step (name, documents left after it) a bar proportional to the count,
    'name  count (pct% of first)' above it, and the drop from the previous step at the right (e.g. '-13').
    """
    if not steps:
        return _empty(title, width, 80)
    first = steps[0][1]
    biggest = max(max(c for _, c in steps), 1)
    left, right, top, row = 8.0, width - 80.0, 30.0, 38.0
    body = []
    for i, (name, count) in enumerate(steps):
        y = top + i * row
        pct = f"{100 * count / first:.1f}% of first" if first > 0 else "n/a"
        body.append(f'<text x="{left:.1f}" y="{y + 13:.1f}"><tspan font-weight="bold">'
                    f'{_esc(_clip(str(name), right - left - 200))}</tspan>  {count:,} ({pct})</text>')
        w = max(count, 0) / biggest * (right - left)
        body.append(f'<rect class="bar" x="{left:.1f}" y="{y + 18:.1f}" width="{w:.2f}" height="14" '
                    f'fill="{PALETTE[0]}"><title>{_esc(name)}: {count:,}</title></rect>')
        if i:
            drop = steps[i - 1][1] - count
            label, colour = (f"-{drop:,}", "#c0392b") if drop > 0 else (f"+{-drop:,}" if drop else "0", "#555")
            body.append(_text(width - 8, y + 29, label, "end", f' fill="{colour}"'))
    return _svg(title, width, top + row * len(steps) + 6, body)
