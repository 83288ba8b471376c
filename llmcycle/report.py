"""The run report: `runs/<name>/report.md` and `report.html`, built from what `llmcycle run` recorded.

Everything in it is read back from the stage records (`runs/<name>/*/stage.json`, as a `Records`), the
trainers' `metrics.jsonl` and the eval/serve result files, so the report says what the artifacts say and
can be rebuilt from them alone: `write_report(Records("runs/default"))`. The report is a list of
sections, each a list of blocks (a paragraph, a table, a chart): the stages' table here, then each
stage's own sections (its `Stage.report`). Markdown shows the text and tables, HTML adds the charts
(inline SVG, llmcycle/svg.py: one self-contained file, no scripts). The report stage also writes a model
card into every model directory of the run (llmcycle/card.py), with the evaluation results of that stage
and the ones before.
"""

from __future__ import annotations

import html
import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcycle import svg
from llmcycle.artifacts import atomic_write_text

if TYPE_CHECKING:
    from llmcycle.lifecycle.records import Records

Block = tuple  # ("p", text) | ("table", header, rows) | ("chart", svg) | ("list", items); `code` in text
Section = tuple[str, list[Block]]


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def read_curves(path: Path, eval_key: str) -> dict[str, list[tuple[float, float]]]:
    """Training loss and held-out loss by step from a trainer's metrics.jsonl (a resumed run's repeated
    steps: the last record wins, as it is the one the final model descends from)."""
    train: dict[int, float] = {}
    held: dict[int, float] = {}
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if not isinstance(r, dict) or "step" not in r:
            continue
        if r.get("eval") and isinstance(r.get(eval_key), (int, float)):
            held[int(r["step"])] = float(r[eval_key])
        elif not r.get("eval") and isinstance(r.get("loss"), (int, float)):
            train[int(r["step"])] = float(r["loss"])
    return {name: sorted(d.items()) for name, d in (("training loss", train), ("held-out loss", held)) if d}


# ---- sections -----------------------------------------------------------------------------------------


def _stages(run: Records) -> Section:
    results = run.records
    shown = [s.name for s in run.stages if s.name != "report"]
    rows = []
    for s in shown:
        r = results.get(s) or {}
        rows.append([s, r.get("status"), r.get("seconds"), r.get("peak_rss_mb"), r.get("peak_rss_workers_mb"),
                     str(run.dir(s))])
    total = sum(r[2] or 0 for r in rows)
    scope = {(results.get(s) or {}).get("peak_rss_scope") for s in shown} - {None}
    blocks: list[Block] = [
        ("table", ["stage", "status", "seconds", "peak RSS (MB)", "worker peak RSS (MB)", "artifacts"], rows),
        ("p", f"Total: {total / 60:.1f} minutes (a stage skipped as up to date counts the time it took). Peak RSS "
              + ("is each stage's own high-water mark of this process" if scope == {"stage"} else
                 "is the process's peak so far (this OS cannot reset it per stage)")
              + "; the data stage's worker processes report the largest of theirs."),
        ("chart", svg.bar_chart(shown, [r[2] or 0.0 for r in rows], title="Time per stage", unit="s")),
        ("chart", svg.bar_chart(shown, [r[3] or 0.0 for r in rows], title="Peak memory per stage", unit="MB")),
    ]
    return "Stages", blocks


def build(run: Records) -> tuple[str, list[str], list[Section]]:
    """Title, head lines and sections: the stages' table, then every recorded stage's own sections."""
    import torch

    from llmcycle import __version__

    title = f"llmcycle run `{run.name}`"
    head = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; llmcycle {__version__}, torch "
            f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()}."]
    final = run.final_model()
    if final is not None:  # a recipe without model stages still gets a report
        head.append(f"Final model: `{final}` (model card: `{final / 'README.md'}`). "
                    f"Lineage: `llmcycle lineage {final}`.")
    sections = [_stages(run)]
    for stage in run.stages:
        sections += stage.report(run)
    return title, head, sections


# ---- rendering --------------------------------------------------------------------------------------------


def render_markdown(title: str, head: list[str], sections: list[Section]) -> str:
    out = [f"# {title}", "", *head, "", "Charts: report.html."]
    for name, blocks in sections:
        out += ["", f"## {name}"]
        for b in blocks:
            if b[0] == "p":
                out += ["", b[1]]
            elif b[0] == "list":
                out += [""] + [f"- {x}" for x in b[1]]
            elif b[0] == "table":
                out += ["", "| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(_fmt(c).replace("|", "\\|") for c in row) + " |" for row in b[2]]
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then turn `code` spans into <code> (the only Markdown the report's text uses)."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


CSS = """body{font:14px/1.5 system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}code{background:#f3f3f3;padding:0 3px}
h2{border-bottom:1px solid #ddd;margin-top:1.6em}.chart{margin:.8em 0}"""


def render_html(title: str, head: list[str], sections: list[Section]) -> str:
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{html.escape(title.replace('`', ''))}</title><style>{CSS}</style></head><body>",
           f"<h1>{_inline(title)}</h1>", *(f"<p>{_inline(h)}</p>" for h in head)]
    for name, blocks in sections:
        out.append(f"<h2>{_inline(name)}</h2>")
        for b in blocks:
            if b[0] == "p":
                out.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "list":
                out.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif b[0] == "table":
                out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in b[1]) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in b[2]]
                out.append("</table>")
            elif b[0] == "chart":
                out.append(f'<div class="chart">{b[1]}</div>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_model_cards(run: Records) -> list[Path]:
    """A card in every model directory of the run, with the suite's results of that stage and those before."""
    from llmcycle.card import write_model_card

    per_stage = run.metrics("eval").get("by_stage") or {}
    written, seen = [], {}
    for s in run.model_stages():
        if not (run.dir(s) / "model" / "manifest.json").is_file():
            continue
        if s in per_stage:
            seen[s] = per_stage[s]
        written.append(write_model_card(run.dir(s) / "model", dict(seen) or None, name=f"{run.name}-{s}"))
    return written


def write_report(run: Records, copy_to: Path | None = None) -> Path:
    """report.md and report.html in runs/<name>/ (and a copy in `copy_to`: the report stage's folder), and
    the model cards. Returns the path of report.md."""
    title, head, sections = build(run)
    md, page = render_markdown(title, head, sections), render_html(title, head, sections)
    for folder in (run.root, *([copy_to] if copy_to is not None else [])):
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "report.md", md)
        atomic_write_text(folder / "report.html", page)
    write_model_cards(run)
    return run.root / "report.md"
