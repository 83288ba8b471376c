"""`llmcycle label import|report|export`: preference labelling from the command line.

`import FILE.jsonl` adds items ({prompt, a, b, source?, gold?} a line; `--gold`: every line must carry its
known answer), `report` prints agreement and each annotator's quality (improve/labels.py `Labels.report`;
`--json` for the data), `export OUT.jsonl` writes the majority-preferred pairs in TRL's conversational
preference format, which `llmcycle dpo` reads (train/posttrain/chat_data.py). All work on the server's
request log, where the labelling page's labels land (`--db`, default: where `llmcycle monitor` looks).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from llmcycle.artifacts.io import atomic_open
from llmcycle.errors import LlmcycleError
from llmcycle.improve.agreement import MIN_ITEMS
from llmcycle.improve.labels import Labels, check_item


def _db(args: argparse.Namespace) -> str | Path:
    from llmcycle.monitor.cli import default_log, default_logs

    if args.db:
        return args.db
    try:
        return default_log()
    except LlmcycleError:
        raise LlmcycleError(f"no request log at {' or '.join(map(str, default_logs()))}; give --db FILE|URL (the "
                            "request log of the server whose /label page the annotators use).") from None


def read_items(path: Path, gold: bool = False) -> list[dict[str, Any]]:
    """The items of a JSON Lines file, checked (`check_item`); errors name FILE:LINE. `gold`: each must
    carry its gold answer."""
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LlmcycleError(f"{path}: cannot read: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise LlmcycleError(f"{path}:{n}: not a JSON object ({{prompt, a, b, gold?}} a line).") from None
        item = check_item(row, f"{path}:{n}")
        if gold and item["gold"] is None:
            raise LlmcycleError(f"{path}:{n}: --gold needs a 'gold' answer on every line (a, b, tie or both_bad).")
        rows.append(item)
    return rows


def trl_pair(pair: dict[str, Any]) -> dict[str, Any]:
    """A `Labels.preference_pairs` entry in TRL's conversational preference format, with its item id, source
    and votes kept beside it for the lineage."""
    from llmcycle.improve.export import trl_preference

    return {**trl_preference([{"role": "user", "content": pair["prompt"]}], pair["chosen"], pair["rejected"]),
            "item_id": pair["item_id"], "source": pair["source"], "votes": pair["votes"]}


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_report(r: dict[str, Any]) -> None:
    print(f"items: {r['items']} ({r['gold_items']} gold), labels: {r['labels']}, Krippendorff's alpha (nominal): "
          f"{_num(r['alpha'])} over {r['alpha_items']} item(s) with 2+ labels"
          + (f", {_num(r['alpha_without_flagged'])} without the flagged" if r["flagged"] else ""))
    if not r["annotators"]:
        print("(no labels yet)")
        return
    cols = ["annotator", "labels", "gold_items", "gold_accuracy", "majority_items", "majority_agreement", "flagged"]
    cells = [cols] + [[a, str(q["labels"]), str(q["gold_items"]), _num(q["gold_accuracy"]), str(q["majority_items"]),
                       _num(q["majority_agreement"]), f"FLAGGED: {q['why']}" if q["flagged"] else "ok"]
                      for a, q in r["annotators"].items()]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols) - 1)]
    for row in cells:
        print("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))
              + "  " + row[-1])
    if r["pairwise"]:
        print("Cohen's kappa per pair (items both labelled):")
        width = max(len(" / ".join(p["annotators"])) for p in r["pairwise"])
        for p in r["pairwise"]:
            print(f"  {' / '.join(p['annotators']).ljust(width)}  {p['kappa']:6.3f}  ({p['items']} items)")
    if r["flagged"]:
        print(f"flagged: {', '.join(r['flagged'])} (their labels are left out of the majority and the export)")


def label_main(args: argparse.Namespace) -> int:
    labels = Labels(_db(args))
    if args.action == "import":
        items = read_items(args.file, args.gold)
        added = labels.add_items(items)
        print(f"added {added} new item(s) of {len(items)} ({sum(i['gold'] is not None for i in items)} gold) "
              f"to {labels.store}")
    elif args.action == "report":
        r = labels.report(args.min_accuracy, args.min_majority, args.min_items)
        if args.json:
            print(json.dumps(r, indent=2))
        else:
            print_report(r)
    else:
        pairs = labels.preference_pairs()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(args.out, "w", encoding="utf-8") as f:
            for p in pairs:
                f.write(json.dumps(trl_pair(p), ensure_ascii=False) + "\n")
        print(f"wrote {len(pairs)} preference pair(s) to {args.out}")
    return 0


def add_label_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Pairwise preference labelling: import items, report annotator agreement and quality, "
                     "export the majority's preferences as DPO data. Annotators label on the server's /label "
                     "page. See docs/improve.md.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = sub.add_parser("import", help="add items to label from JSON lines {prompt, a, b, source?, gold?}")
    i.add_argument("file", type=Path, metavar="FILE.jsonl")
    i.add_argument("--gold", action="store_true",
                   help="these are gold items: every line must carry its known answer (gold: a, b, tie, both_bad)")
    r = sub.add_parser("report", help="agreement (Cohen's kappa per pair, Krippendorff's alpha) and annotator quality")
    r.add_argument("--json", action="store_true", help="print JSON instead of tables")
    r.add_argument("--min-accuracy", type=float, default=0.7,
                   help="flag annotators below this accuracy on gold items (default: 0.7)")
    r.add_argument("--min-majority", type=float, default=0.6,
                   help="flag annotators agreeing with the others' majority less often than this (default: 0.6)")
    r.add_argument("--min-items", type=int, default=MIN_ITEMS,
                   help=f"a measure over fewer items never flags (default: {MIN_ITEMS})")
    e = sub.add_parser("export", help="write the majority-preferred pairs as TRL preference data (for dpo)")
    e.add_argument("out", type=Path, metavar="OUT.jsonl")
    for q in (i, r, e):
        q.add_argument("--db", default=None, metavar="DB|URL",
                       help="the request log of the server (a SQLite file or a postgresql:// URL; default: "
                            "runs/requests.sqlite beside the default key database, else "
                            "$XDG_STATE_HOME/llmcycle/requests.sqlite)")
    p.set_defaults(func=label_main)
