"""`llmcycle eval MODEL_DIR` and `llmcycle eval --compare A B`: the suite, a table, and the regression gate.

The gate is what CI runs after training a candidate B against the current model A: exit 1 when B is
worse than A beyond the threshold on a gated metric, so a regression cannot slip through as a number
nobody read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llmcycle.artifacts import atomic_write_json
from llmcycle.errors import LlmcycleError

# Gated metrics: True where higher is better. bpb gets a relative threshold (its scale depends on the
# data), accuracies an absolute one (they are already fractions).
GATED = {"heldout_bpb": False, "mc_accuracy": True, "exact_match": True, "win_rate": True}
LOWER_IS_BETTER = {"heldout_bpb", "heldout_perplexity"}
ORDER = ["heldout_bpb", "heldout_perplexity", "mc_accuracy", "exact_match", "win_rate"]


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", help="model directory to evaluate")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="evaluate both; exit 1 if B regresses")
    parser.add_argument("--heldout", help="held-out token shard directory (default: the pre-training run's "
                                          "data/val, found from the model's manifest chain)")
    parser.add_argument("--train-shards", help="training shards for the decontamination report "
                                               "(default: the pre-training run's data/train)")
    parser.add_argument("--limit", type=int, default=256, help="items per metric, and held-out sequences")
    parser.add_argument("--out", help="where to write the JSON results (default: eval.json beside MODEL_DIR, so the "
                                      "model directory itself stays as its manifest recorded it; "
                                      "with --compare, nothing unless given); the path written, "
                                      "and whether it replaced earlier results, goes to stderr")
    parser.add_argument("--json", action="store_true", help="print the JSON results instead of a table")
    parser.add_argument("--threshold", type=float, default=0.02,
                        help="gate tolerance: relative for bpb, absolute for accuracies and win rate")
    parser.add_argument("--judge", help="reward model directory: with --compare, adds B's win rate over A")
    parser.add_argument("--no-decontam", action="store_true", help="skip the decontamination report")


def gate(a: dict, b: dict, threshold: float) -> list[str]:
    """The gated metrics on which B is worse than A beyond the threshold, each as a readable line."""
    failed = []
    for name, higher_better in GATED.items():
        va, vb = a.get(name), b.get(name)
        if va is None or vb is None:
            continue
        if higher_better and vb < va - threshold:
            failed.append(f"{name}: {vb:.4f} < {va:.4f} - {threshold}")
        elif not higher_better and vb > va * (1 + threshold):
            failed.append(f"{name}: {vb:.4f} > {va:.4f} * (1 + {threshold})")
    return failed


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _single_table(res: dict) -> str:
    m = res["metrics"]
    lines = [f"suite {res['suite']}  model {res['model']}  sha256 {res['model_sha256'][:12]}"]
    lines += [f"  {k:<20} {_fmt(v)}" for k, v in m.items()]
    for metric, tasks in res["per_task"].items():
        lines.append(f"  {metric} per task: " + ", ".join(f"{t} {v:.2f}" for t, v in tasks.items()))
    lines.append(f"  items: {res['counts']}")
    if res["decontamination"]:
        lines.append(f"  decontamination (verbatim in training): {_decontam_line(res['decontamination'])}")
    return "\n".join(lines)


def _decontam_line(rep: dict) -> str:
    parts = [f"{name} {v['prompts']}/{rep['items']} prompts, {v['prompt_and_answer']} with answer"
             for name, v in rep.items() if isinstance(v, dict) and "prompts" in v]
    return "; ".join(parts) or "no training data found"


def _compare_table(a: dict, b: dict) -> str:
    rows = [f"{'metric':<20} {'A':>8} {'B':>8} {'delta':>8}  "]
    for k in [k for k in ORDER if k in a or k in b]:
        va, vb = a.get(k), b.get(k)
        delta = None if va is None or vb is None else vb - va
        verdict = "" if not delta else "better" if (delta < 0) == (k in LOWER_IS_BETTER) else "worse"
        rows.append(f"{k:<20} {_fmt(va):>8} {_fmt(vb):>8} {_fmt(delta):>8}  {verdict}")
    return "\n".join(rows)


def _write(path: str | Path, result: dict) -> None:
    """Write the results and say so on stderr (stdout stays the table or pure JSON for --json), naming
    the file and whether earlier results in it were replaced: never a silent overwrite."""
    path = Path(path)
    verb = "replaced" if path.exists() else "wrote"
    atomic_write_json(path, result)
    print(f"eval: {verb} {path}" + (" (earlier results in it are gone; --out FILE keeps them apart)"
                                    if verb == "replaced" else ""), file=sys.stderr)


def default_out(model_dir: str | Path) -> Path:
    """`runs/default/sft/model` -> `runs/default/sft/eval.json`: next to the model, not inside it (a file added to a model
    directory would make `llmcycle lineage` report it as modified)."""
    return Path(model_dir).resolve().parent / "eval.json"


def eval_main(args: argparse.Namespace) -> int:
    # the suite imports torch: only when evaluating, not for `llmcycle eval --help`
    from llmcycle.eval.suite import SUITE_VERSION, evaluate_model, heldout_items, lineage, win_rate

    if bool(args.model) == bool(args.compare):
        raise LlmcycleError("give either one MODEL_DIR or --compare A B.")
    if args.judge and not args.compare:
        raise LlmcycleError("--judge needs --compare A B (the win rate is B's against A).")
    kw = {"limit": args.limit, "train_shards": args.train_shards, "decontam": not args.no_decontam}
    if args.model:
        res, _ = evaluate_model(args.model, args.heldout, **kw)
        print(json.dumps(res, indent=2) if args.json else _single_table(res))
        _write(args.out or default_out(args.model), res)
        return 0
    a_dir, b_dir = args.compare
    # Both models are measured on the same held-out rows: A's shards and row length, unless --heldout.
    lin = lineage(a_dir)
    kw["seq_len"] = lin.seq_len
    ra, answers_a = evaluate_model(a_dir, args.heldout or lin.heldout, **kw)
    rb, answers_b = evaluate_model(b_dir, args.heldout or lin.heldout, **kw)
    ma, mb = dict(ra["metrics"]), dict(rb["metrics"])
    if args.judge:
        mb["win_rate"], ma["win_rate"] = win_rate(args.judge, heldout_items(args.limit), answers_a, answers_b), 0.5
    failed = gate(ma, mb, args.threshold)
    result = {"suite": SUITE_VERSION, "a": ra, "b": rb, "win_rate": mb.get("win_rate"),
              "threshold": args.threshold, "failed": failed}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"suite {SUITE_VERSION}: A = {a_dir}, B = {b_dir}\n{_compare_table(ma, mb)}")
        print("\n".join(f"GATE FAILED {f}" for f in failed) if failed else
              f"gate passed (threshold {args.threshold})")
    if args.out:
        _write(args.out, result)
    return 1 if failed else 0
