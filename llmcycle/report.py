"""The run report: `runs/<name>/report.md` and `report.html`, built from what `llmcycle run` recorded.

Everything in it is read back from the stage records (`stage.json`), the data stage's manifest, the
trainers' `metrics.jsonl` and the eval/serve result files, so the report says what the artifacts say and
can be rebuilt from them alone. The report is a list of sections, each a list of blocks (a paragraph, a
table, a chart); Markdown shows the text and tables, HTML adds the charts (inline SVG, llmcycle/svg.py:
one self-contained file, no scripts). The report stage also writes a model card into every model
directory of the run (llmcycle/card.py), with the evaluation results of that stage and the ones before.
"""

from __future__ import annotations

import html
import json
import math
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcycle import svg
from llmcycle.errors import LlmcycleError

if TYPE_CHECKING:
    from llmcycle.lifecycle import Lifecycle

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


def _metrics(results: dict, stage: str) -> dict:
    return (results.get(stage) or {}).get("metrics") or {}


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


def _stages(lc: Lifecycle) -> Section:
    results = lc.results
    shown = [s for s in lc.stages if s != "report"]
    rows = []
    for s in shown:
        r = results.get(s) or {}
        rows.append([s, r.get("status"), r.get("seconds"), r.get("peak_rss_mb"), r.get("peak_rss_workers_mb"),
                     str(lc.dir(s))])
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


def _data(lc: Lifecycle) -> list[Section]:
    m = _metrics(lc.results, "data")
    if not m:
        return []
    funnel = m.get("funnel") or []
    rows = [[f["step"], f["in"], f["out"], ", ".join(f"{k} {v}" for k, v in f.get("dropped", {}).items()) or None]
            for f in funnel]
    blocks: list[Block] = [
        ("p", f"{m.get('documents_read', 0):,} documents read, {m.get('documents_kept', 0):,} kept; malformed "
              f"input records: {sum((m.get('bad_input') or {}).values())}. Details (drops by reason and location, "
              f"samples of dropped documents): `{lc.dir('data') / 'stats.json'}`."),
        ("table", ["step", "documents in", "documents out", "dropped"], rows),
        ("chart", svg.funnel_chart([(f["step"], f["out"]) for f in funnel], title="Data funnel (documents)")),
    ]
    sections: list[Section] = [("Data", blocks)]
    tr, va = m.get("train") or {}, m.get("val") or {}
    if tr.get("num_tokens"):
        cfg = lc.cfg.data.tokenizer
        bpt_train = tr["num_bytes"] / tr["num_tokens"]
        bpt_val = va["num_bytes"] / va["num_tokens"] if va.get("num_tokens") else None
        tok: list[Block] = [
            ("p", f"{cfg.kind} tokenizer, {cfg.vocab_size} tokens, trained on the cleaned training text. "
                  f"{tr['num_tokens']:,} training tokens ({tr['num_docs']:,} documents), {va.get('num_tokens', 0):,} "
                  f"held-out tokens ({va.get('num_docs', 0):,} documents)."),
            ("table", ["text", "UTF-8 bytes", "tokens", "bytes per token"],
             [["training", tr["num_bytes"], tr["num_tokens"], bpt_train],
              ["held out", va.get("num_bytes"), va.get("num_tokens"), bpt_val]]),
            ("chart", svg.bar_chart(["raw UTF-8 bytes", "tokenizer: training text", "tokenizer: held-out text"],
                                    [1.0, bpt_train, bpt_val if bpt_val is not None else math.nan],
                                    title="Tokenizer compression (bytes per token)")),
        ]
        sections.append(("Tokenizer", tok))
    return sections


def _training(lc: Lifecycle) -> list[Section]:
    sections: list[Section] = []
    pre = _metrics(lc.results, "pretrain")
    if pre:
        blocks: list[Block] = [("table", ["steps", "held-out loss", "held-out bits/byte", "unigram baseline bits/byte"],
                                [[pre.get("steps", pre.get("step")), pre.get("val_loss"), pre.get("val_bpb"),
                                  pre.get("unigram_bpb")]])]
        curves = read_curves(lc.dir("pretrain") / "metrics.jsonl", "val_loss")
        if curves:
            blocks.append(("chart", svg.line_chart(curves, title="Pre-training loss", x_label="step",
                                                   y_label="loss (nats/token)")))
        sections.append(("Pre-training", blocks))
    for s in ("sft", "dpo"):
        m = _metrics(lc.results, s)
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            continue
        blocks = [("table", ["metric", "value"], [[k, v] for k, v in sorted(scalars.items())])]
        curves = read_curves(lc.dir(s) / "metrics.jsonl", "eval_loss")
        if curves:
            blocks.append(("chart", svg.line_chart(curves, title=f"{s.upper()} loss", x_label="step", y_label="loss")))
        sections.append((f"{s.upper()} (held-out, as the trainer measured it)", blocks))
    return sections


def _evaluation(lc: Lifecycle) -> list[Section]:
    per_stage = _metrics(lc.results, "eval").get("by_stage") or {}
    if not per_stage:
        return []
    stages = list(per_stage)
    names = sorted({k for m in per_stage.values() for k, v in m.items() if isinstance(v, (int, float))})
    blocks: list[Block] = [
        ("p", "`llmcycle eval` suite v1 on every model of the run: held-out bits per byte on the held-out shards, "
              "multiple choice by log-likelihood and greedy exact match on the held-out embedded tasks "
              f"(docs/eval.md). Per-stage details: `{lc.dir('eval')}/<stage>.json`."),
        ("table", ["metric", *stages], [[n, *(per_stage[s].get(n) for s in stages)] for n in names]),
    ]
    contamination = []
    for s in stages:
        path = lc.dir("eval") / f"{s}.json"
        report = (json.loads(path.read_text()).get("decontamination") or {}) if path.is_file() else {}
        where = report.get("sources") or {}
        named = {k: ", ".join(v) if isinstance(v, list) else str(v) for k, v in where.items()}
        contamination += [[s, f"{source}: {named[source]}" if source in named else source, report.get("items"),
                           found["prompts"],
                           found.get("prompt_and_answer")]
                          for source, found in report.items() if isinstance(found, dict) and "prompts" in found]
    if contamination:
        blocks.append(("p", "Decontamination: held-out evaluation items whose prompt (and prompt followed by its "
                            "answer) occur verbatim, as tokens, in each model's training data:"))
        blocks.append(("table", ["model", "training data", "items", "prompt found", "prompt + answer found"],
                       contamination))
    accuracy = [n for n in ("mc_accuracy", "exact_match", "win_rate") if n in names]
    if accuracy:
        blocks.append(("chart", svg.grouped_bar_chart(accuracy, {s: [per_stage[s].get(n) for n in accuracy]
                                                                  for s in stages}, title="Task accuracy by stage")))
    if "heldout_bpb" in names:
        labels, values = stages[:], [per_stage[s].get("heldout_bpb") for s in stages]
        unigram = _metrics(lc.results, "pretrain").get("unigram_bpb")
        if unigram is not None:
            labels.append("unigram baseline")
            values.append(unigram)
        blocks.append(("chart", svg.bar_chart(labels, values, title="Held-out bits per byte (lower is better)")))
    return [("Evaluation by stage", blocks)]


def _serving(lc: Lifecycle) -> list[Section]:
    srv = _metrics(lc.results, "serve")
    if not srv:
        return []
    blocks: list[Block] = [("p", f"The final model `{lc.final_model()}` behind the real HTTP server on loopback "
                                 "(OpenAI chat API, streamed), answering held-out task prompts.")]
    blocks.append(("table", ["requests", "concurrency", "output tok/s", "median TTFT (s)", "median e2e (s)",
                             "stream == plain", "/metrics == usage"],
                   [[srv.get("requests"), srv.get("concurrency"), srv.get("output_tokens_per_s"),
                     srv.get("ttft_median_s"), srv.get("e2e_median_s"), srv.get("stream_equals_plain"),
                     srv.get("metrics_match_usage")]]))
    path = lc.dir("serve") / "serve.json"
    answers = json.loads(path.read_text()).get("answers", []) if path.is_file() else []
    timed = [a for a in answers if a.get("e2e_s") is not None]
    if timed:
        ttft = [(i + 1, a["ttft_s"] * 1000) for i, a in enumerate(timed) if a.get("ttft_s") is not None]
        e2e = [(i + 1, a["e2e_s"] * 1000) for i, a in enumerate(timed)]
        blocks.append(("chart", svg.line_chart({"time to first token": ttft, "end to end": e2e},
                                               title="Serving latency", x_label="request", y_label="ms")))
    if answers:
        blocks.append(("p", "Sample answers from the served model:"))
        blocks.append(("table", ["prompt", "answer"], [[repr(a["prompt"]), repr(a["text"])] for a in answers[:5]]))
    return [("Serving smoke test (real HTTP server on loopback)", blocks)]


def build(lc: Lifecycle) -> tuple[str, list[str], list[Section]]:
    import torch

    from llmcycle import __version__

    title = f"llmcycle run `{lc.cfg.name}`"
    head = [f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; llmcycle {__version__}, torch "
            f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()}."]
    try:
        final = lc.final_model()
        head.append(f"Final model: `{final}` (model card: `{final / 'README.md'}`). "
                    f"Lineage: `llmcycle lineage {final}`.")
    except LlmcycleError:  # a recipe without model stages still gets a report
        pass
    sections = [_stages(lc), *_data(lc), *_training(lc), *_evaluation(lc), *_serving(lc)]
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


def write_model_cards(lc: Lifecycle) -> list[Path]:
    """A card in every model directory of the run, with the suite's results of that stage and those before."""
    from llmcycle.card import write_model_card
    from llmcycle.lifecycle import MODEL_STAGES

    per_stage = _metrics(lc.results, "eval").get("by_stage") or {}
    written, seen = [], {}
    for s in lc.stages:
        if s not in MODEL_STAGES or not (lc.dir(s) / "model" / "manifest.json").is_file():
            continue
        if s in per_stage:
            seen[s] = per_stage[s]
        written.append(write_model_card(lc.dir(s) / "model", dict(seen) or None, name=f"{lc.cfg.name}-{s}"))
    return written


def write_report(lc: Lifecycle) -> Path:
    """report.md and report.html in runs/<name>/ (and a copy in the report stage's folder), model cards."""
    title, head, sections = build(lc)
    md, page = render_markdown(title, head, sections), render_html(title, head, sections)
    lc.dir("report").mkdir(parents=True, exist_ok=True)
    for folder in (lc.root, lc.dir("report")):
        (folder / "report.md").write_text(md)
        (folder / "report.html").write_text(page)
    write_model_cards(lc)
    return lc.root / "report.md"
