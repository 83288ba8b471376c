"""The run report: `runs/<name>/report.md`, built from the stage records `llmcycle run` leaves.

Everything in it is read back from `stage.json` files (and the manifests they point to), so the report
says what the artifacts say, and can be rebuilt from them alone.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmcycle.lifecycle import Lifecycle


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def _eval_rows(results: dict) -> list[list[Any]]:
    """Evaluation by stage: one row per metric, one column per model stage."""
    per_stage = (results.get("eval") or {}).get("metrics", {}).get("by_stage", {})
    if not per_stage:
        return []
    names = sorted({k for m in per_stage.values() for k, v in m.items() if isinstance(v, (int, float))})
    return [[name, *(per_stage[s].get(name) for s in per_stage)] for name in names]


def write_report(lc: Lifecycle) -> Path:
    import torch

    from llmcycle import __version__

    results = lc.results
    out: list[str] = [f"# llmcycle run `{lc.cfg.name}`", ""]
    out.append(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; llmcycle {__version__}, torch "
               f"{torch.__version__}, Python {platform.python_version()}, {platform.machine()}.")
    out.append(f"Final model: `{lc.final_model()}`. Lineage: `llmcycle lineage {lc.final_model()}`.")
    out += ["", "## Stages", ""]
    rows = [[s, (results.get(s) or {}).get("status"), (results.get(s) or {}).get("seconds"),
             (results.get(s) or {}).get("peak_rss_mb"), str(lc.dir(s))] for s in lc.stages if s != "report"]
    out += _table(["stage", "status", "seconds", "peak RSS (MB, process)", "artifacts"], rows)
    total = sum(r[2] or 0 for r in rows)
    out += ["", f"Total: {total / 60:.1f} minutes (stages skipped as up to date count the time they took)."]

    pre = (results.get("pretrain") or {}).get("metrics") or {}
    if pre:
        out += ["", "## Pre-training", ""]
        out += _table(["steps", "held-out loss", "held-out bits/byte", "unigram baseline bits/byte"],
                      [[pre.get("steps", pre.get("step")), pre.get("val_loss"), pre.get("val_bpb"),
                        pre.get("unigram_bpb")]])
    for s in ("sft", "dpo"):
        m = (results.get(s) or {}).get("metrics") or {}
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            out += ["", f"## {s.upper()} (held-out, as the trainer measured it)", ""]
            out += _table(["metric", "value"], [[k, v] for k, v in sorted(scalars.items())])
    ev = _eval_rows(results)
    if ev:
        stages = list((results["eval"]["metrics"]).get("by_stage", {}))
        out += ["", "## Evaluation by stage (`llmcycle eval`)", ""]
        out += _table(["metric", *stages], ev)
    srv = (results.get("serve") or {}).get("metrics") or {}
    if srv:
        out += ["", "## Serving smoke test (real HTTP server on loopback)", ""]
        out += _table(["requests", "concurrency", "output tok/s", "median TTFT (s)", "median e2e (s)",
                       "stream == plain", "/metrics == usage"],
                      [[srv.get("requests"), srv.get("concurrency"), srv.get("output_tokens_per_s"),
                        srv.get("ttft_median_s"), srv.get("e2e_median_s"), srv.get("stream_equals_plain"),
                        srv.get("metrics_match_usage")]])
        answers = json.loads((lc.dir("serve") / "serve.json").read_text()).get("answers", [])[:3]
        if answers:
            out += ["", "Sample answers from the served model:", ""]
            out += [f"- {a['prompt']!r} -> {a['text']!r}" for a in answers]
    path = lc.root / "report.md"
    path.write_text("\n".join(out) + "\n")
    (lc.dir("report") / "report.md").parent.mkdir(parents=True, exist_ok=True)
    (lc.dir("report") / "report.md").write_text("\n".join(out) + "\n")
    return path
