"""`llmcycle monitor usage|export`: the request log read back.

`usage --by key|model|route|day|hour|user|status` prints one line per group: requests, errors (status >= 400),
tokens (prompt, of which cached, completion), cost, and latency (median and p95 of the request time, mean
time to first token); `--json` prints the same as JSON. `export --format jsonl|parquet` writes the rows.
`drift` compares a current window with a reference (monitor/drift.py) and exits 1 when a feature drifted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError
from llmcycle.monitor.request_log import NAMES, ensure_schema
from llmcycle.monitor.store import LogStore, as_store
from llmcycle.monitor.usage import COLUMNS, GROUPS, by_group


def default_logs() -> list[Path]:
    """Where `llmcycle serve` puts its log by default: beside the default key database (`--keys
    runs/keys.sqlite`), else in $XDG_STATE_HOME/llmcycle."""
    from llmcycle.serve.auth import DEFAULT_DB
    from llmcycle.serve.config import ServeConfig

    return [Path(DEFAULT_DB).parent / "requests.sqlite", ServeConfig().request_log_path()]


def default_log() -> Path:
    """The first default place that holds a log (the last one when none does, for the message)."""
    candidates = default_logs()
    found = next((p for p in candidates if p.exists()), None)
    if found is None:
        raise LlmcycleError(f"no request log at {' or '.join(map(str, candidates))}; give --log FILE (serve writes "
                            "requests.sqlite beside its --keys database, else in the second place).")
    return found


def _open(target: LogStore | Path | str) -> LogStore:
    store = as_store(target)
    if not store.exists():
        raise LlmcycleError(f"no request log at {store} (serve writes one; give --log FILE for another).")
    ensure_schema(store, con := store.connect())  # an older log gains the newer columns before it is read
    con.close()
    return store


def _where(since_days: float | None) -> tuple[str, tuple]:
    return ('WHERE "time" >= ?', (time.time() - since_days * 86400,)) if since_days else ("", ())


def usage(path: LogStore | Path | str, by: str, since_days: float | None = None) -> list[dict[str, Any]]:
    """One dict per group, busiest first (`usage.by_group`)."""
    store = _open(path)
    where, args = _where(since_days)
    return by_group(store.rows(f"SELECT {', '.join(COLUMNS)} FROM requests {where}", args), by)


def export(path: LogStore | Path | str, out: Path, fmt: str, since_days: float | None = None) -> int:
    """Write the rows (oldest first) to `out` as JSON lines or Parquet; returns how many."""
    store = _open(path)
    where, args = _where(since_days)
    quoted = ", ".join(f'"{c}"' for c in NAMES)
    rows = store.rows(f'SELECT {quoted} FROM requests {where} ORDER BY "time", id', args)
    for r in rows:
        for k in ("finish_reasons", "metadata"):
            if r[k] is not None:
                r[k] = json.loads(r[k])
        r["stream"] = None if r["stream"] is None else bool(r["stream"])
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for r in rows:  # nested values as JSON text: one column type whatever the rows hold
            for k in ("finish_reasons", "metadata"):
                r[k] = None if r[k] is None else json.dumps(r[k], ensure_ascii=False)
        pq.write_table(pa.Table.from_pylist(rows, schema=_arrow_schema(pa)), out)
    return len(rows)


def _arrow_schema(pa):
    from llmcycle.monitor.request_log import COLUMNS

    types = {"REAL": pa.float64(), "INTEGER": pa.int64(), "TEXT": pa.string()}
    return pa.schema([(c, pa.bool_() if c == "stream" else types[t]) for c, t in COLUMNS])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def add_monitor_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Read the request log that `llmcycle serve` writes: usage tables, exports, drift. "
                     "See docs/monitor.md.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    u = sub.add_parser("usage", help="requests, errors, tokens, cost and latency by key, model, route, day ...")
    u.add_argument("--by", choices=list(GROUPS), default="model", help="group rows by (default: model)")
    e = sub.add_parser("export", help="write the request log's rows as JSON lines or Parquet")
    e.add_argument("--format", choices=["jsonl", "parquet"], default="jsonl", help="default: jsonl")
    e.add_argument("--out", required=True, type=Path, help="file to write")
    d = sub.add_parser("drift", help="compare a current window of traffic with a reference (exit 1 on drift)")
    d.add_argument("--current-days", type=float, default=1.0, help="the current window: the last N days (default: 1)")
    d.add_argument("--reference-days", default="30:1", metavar="FROM:TO",
                   help="the reference window of traffic, in days ago (default: 30:1, before the current day)")
    d.add_argument("--reference-file", type=Path, default=None,
                   help="instead, a file of prompts (JSON lines with prompt/messages/text, or one per line), "
                        "e.g. the SFT data: prompt features only")
    d.add_argument("--tokenizer", type=Path, default=None, help="model directory whose tokenizer counts the "
                                                                  "reference file's tokens (the served model's)")
    d.add_argument("--embeddings", type=Path, default=None, metavar="MODEL_DIR",
                   help="also compare the prompts' token distribution and embeddings (this model's tokenizer and "
                        "hidden states; a domain classifier's ROC AUC > 0.55 is drift); needs the prompts: serve "
                        "with store_text: true")
    d.add_argument("--json", action="store_true", help="print JSON")
    for q in (u, e, d):
        q.add_argument("--log", default=None, metavar="DB|URL",
                       help="the request log: a SQLite file or a postgresql:// URL (default: runs/requests.sqlite, "
                            "beside the default key database, else $XDG_STATE_HOME/llmcycle/requests.sqlite)")
    for q in (u, e):
        q.add_argument("--since", type=float, default=None, metavar="DAYS", help="only the last DAYS days")
    u.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=monitor_main)


def drift_main(args: argparse.Namespace, path: Path) -> int:
    from llmcycle.monitor import drift

    path = _open(path)
    current = drift.log_window(path, args.current_days)
    if args.reference_file is not None:
        if args.tokenizer is None:
            raise LlmcycleError("--reference-file needs --tokenizer MODEL_DIR (the served model's) to count tokens.")
        from llmcycle.tokenizer import Tokenizer

        reference = drift.prompts_file_rows(args.reference_file, Tokenizer.from_pretrained(args.tokenizer))
    else:
        try:
            start, end = (float(x) for x in args.reference_days.split(":"))
        except ValueError:
            raise LlmcycleError(f"--reference-days {args.reference_days!r}: give FROM:TO in days ago, e.g. 30:1.") from None
        reference = drift.log_window(path, start, end)
    results = drift.compare(reference, current)
    if args.embeddings is not None:
        current_texts = drift.log_prompts(path, args.current_days)
        reference_texts = ([r["text"] for r in reference] if args.reference_file is not None
                           else drift.log_prompts(path, start, end))
        if len(current_texts) < 10 or len(reference_texts) < 10:
            raise LlmcycleError(f"prompt embeddings need at least 10 stored prompts a window (have "
                                f"{len(reference_texts)} and {len(current_texts)}): serve with store_text: true.")
        from llmcycle.tokenizer import Tokenizer

        results.append(drift.token_distribution(Tokenizer.from_pretrained(args.embeddings), reference_texts,
                                                current_texts))
        results.append(drift.embedding_drift(args.embeddings, reference_texts, current_texts))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"reference: {len(reference)} request(s), current: {len(current)}")
        for r in results:
            print(f"{r['feature']:<18} {r['method']:<19} {r['value']:8.4f}  (threshold {r['threshold']:g})  "
                  f"{'DRIFT' if r['drift'] else 'ok'}")
        if not results:
            print("nothing to compare: a window has fewer than 2 requests.")
    return 1 if any(r["drift"] for r in results) else 0


def monitor_main(args: argparse.Namespace) -> int:
    path = args.log or default_log()
    if args.action == "drift":
        return drift_main(args, path)
    if args.action == "export":
        n = export(path, args.out, args.format, args.since)
        print(f"wrote {n} request(s) to {args.out}")
        return 0
    table = usage(path, args.by, args.since)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    cols = [args.by, "requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens", "cost",
            "latency_p50_s", "latency_p95_s", "ttft_mean_s"]
    cells = [cols] + [[_fmt(r[c]) for c in cols] for r in table]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
    if not table:
        print("(no requests logged" + (f" in the last {args.since:g} days)" if args.since else ")"))
    return 0
