"""`llmcycle registry`, `llmcycle ab` and `llmcycle feedback`: the registry, A/B tests and feedback export
from the command line. Each takes `--db` (the monitor's database: serve's request log, a SQLite file or a
postgresql:// URL); the default is the log `llmcycle monitor` finds, else where `llmcycle serve` puts one."""

from __future__ import annotations

import argparse
import json
import time

from llmcycle.errors import LlmcycleError


def default_db() -> str:
    """The request log `llmcycle monitor` reads by default, else the place `llmcycle serve` writes its log
    without --keys (created on first use)."""
    from llmcycle.monitor.cli import default_logs

    candidates = default_logs()
    return str(next((p for p in candidates if p.exists()), candidates[-1]))


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default=None, metavar="DB",
                   help="the monitor's database: serve's request log, a SQLite file or postgresql:// URL "
                        "(default: the log `llmcycle monitor` finds, else ~/.local/state/llmcycle/requests.sqlite)")


def open_registry(args: argparse.Namespace):
    from llmcycle.improve.registry import Registry

    return Registry(args.db or default_db(), getattr(args, "root", None))


# ---- registry --------------------------------------------------------------------------------------


def add_registry_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("The model registry: immutable numbered versions pinned by content hash, and aliases "
                     "(production, staging, challenger, ...) that `llmcycle serve --registered NAME` follows "
                     "live. Every change is in the audit trail beside the database. See docs/improve.md.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = sub.add_parser("register", help="register a model directory as the next version of NAME")
    r.add_argument("name", help="the registry name (letters, digits, . _ -)")
    r.add_argument("model_dir", help="a model directory (Hugging Face layout, ideally with llmcycle's manifest.json)")
    r.add_argument("--alias", action="append", default=[], help="also point this alias at it (repeatable)")
    r.add_argument("--description", default=None, help="a note kept with the version")
    r.add_argument("--root", default=None, help="where versions are stored (default: registry/ beside the database)")
    ls = sub.add_parser("list", help="the registered versions and aliases (of NAME)")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true", help="print JSON")
    a = sub.add_parser("alias", help="point NAME@ALIAS at a version (a served alias switches at once)")
    a.add_argument("name")
    a.add_argument("alias")
    a.add_argument("version", type=int, help="a version number of NAME (llmcycle registry list NAME)")
    u = sub.add_parser("unalias", help="remove NAME@ALIAS")
    u.add_argument("name")
    u.add_argument("alias")
    s = sub.add_parser("show", help="one version: NAME, NAME@ALIAS or NAME@N")
    s.add_argument("ref", help="NAME (its production alias, else its newest version), NAME@ALIAS or NAME@N")
    s.add_argument("--json", action="store_true", help="print the whole record as JSON (metrics included)")
    for q in (r, ls, a, u, s):
        _db_arg(q)
    p.set_defaults(func=registry_main)


def registry_main(args: argparse.Namespace) -> int:
    reg = open_registry(args)
    if args.action == "register":
        v, new = reg.register(args.name, args.model_dir, args.description)
        print(f"{v.ref}: {'registered' if new else 'already registered'} from {v.source} "
              f"(content {v.content_hash[:16]}, stored at {v.path})")
        for alias in args.alias:
            before = reg.alias(args.name, alias, v.version)
            print(f"{args.name}@{alias} -> {v.version}" + (f" (was {before})" if before is not None else ""))
    elif args.action == "list":
        versions, aliases = reg.versions(args.name), reg.aliases(args.name)
        if args.json:
            print(json.dumps({"versions": [v.as_dict() for v in versions], "aliases": aliases}, indent=2))
            return 0
        if not versions:
            print("nothing registered" + (f" as {args.name}" if args.name else "") + f" in {reg.store}")
            return 1 if args.name else 0
        print(f"{'version':<20} {'registered':<16} {'stage':<10} {'content':<12}  aliases")
        for v in versions:
            names = [a for a, n in aliases.get(v.name, {}).items() if n == v.version]
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(v.created))
            print(f"{v.ref:<20} {when}  {v.stage or '-':<10} {v.content_hash[:12]}  "
                  f"{('@' + ' @'.join(sorted(names))) if names else ''}")
    elif args.action == "alias":
        before = reg.alias(args.name, args.alias, args.version)
        print(f"{args.name}@{args.alias} -> {args.version}" + (f" (was {before})" if before is not None else ""))
    elif args.action == "unalias":
        reg.remove_alias(args.name, args.alias)
        print(f"{args.name}@{args.alias} removed")
    else:
        v = reg.resolve(args.ref)
        if args.json:
            print(json.dumps(v.as_dict(), indent=2, default=str))
            return 0
        aliases = sorted(a for a, n in reg.aliases(v.name).get(v.name, {}).items() if n == v.version)
        evaluation = v.metrics.get("eval") or {}
        for label, value in [("version", v.ref), ("aliases", ", ".join("@" + a for a in aliases) or "-"),
                             ("stored at", v.path), ("registered from", v.source), ("content", v.content_hash),
                             ("made by", v.stage or "-"), ("trained from", v.parent or "-"),
                             ("description", v.description or "-"),
                             ("evaluation", ", ".join(f"{k} {x:.3f}" for k, x in evaluation.items()
                                                      if isinstance(x, (int, float))) or "-")]:
            print(f"{label:<16} {value}")
    return 0


# ---- A/B tests ---------------------------------------------------------------------------------------


def add_ab_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("A/B tests between registered versions: a served registry name splits its traffic by "
                     "weight, sticky per user (the request's `user`, else its key); the report compares the "
                     "variants from the request log and their feedback, with a significance test and a verdict.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser("start", help="split NAME's traffic, e.g. production=90 challenger=10")
    s.add_argument("name")
    s.add_argument("split", nargs="+", metavar="ALIAS_OR_VERSION=WEIGHT",
                   help="two or more aliases or version numbers with their weights, e.g. production=90 challenger=10")
    s.add_argument("--restart", action="store_true",
                   help="replace a test that is running (its users are reassigned; its report starts over)")
    e = sub.add_parser("end", help="stop the split: NAME answers from its production alias again")
    e.add_argument("name")
    r = sub.add_parser("report", help="per-variant latency, errors, cost, feedback; the test and the verdict")
    r.add_argument("name")
    r.add_argument("--since-hours", type=float, default=None,
                   help="only requests this recent (default: since the split started, else all)")
    r.add_argument("--control", default=None,
                   help="alias or version the others are compared with (default: production, else the busiest)")
    r.add_argument("--alpha", type=float, default=0.05, help="significance level (default: 0.05)")
    r.add_argument("--min-effect", type=float, default=0.05,
                   help="smallest change of the positive-feedback rate worth detecting (default: 0.05)")
    r.add_argument("--json", action="store_true", help="print JSON")
    for q in (s, e, r):
        _db_arg(q)
    p.set_defaults(func=ab_main)


def parse_split(items: list[str]) -> dict[str, float]:
    split: dict[str, float] = {}
    for item in items:
        which, sep, weight = item.partition("=")
        try:
            value = float(weight)
        except ValueError:
            sep = ""
        if not sep or not which:
            raise LlmcycleError(f"split item {item!r}: expected ALIAS_OR_VERSION=WEIGHT, e.g. challenger=10.")
        if which in split:
            raise LlmcycleError(f"split: {which!r} is named twice.")
        split[which] = value
    return split


def ab_main(args: argparse.Namespace) -> int:
    from llmcycle.improve.abtest import ab_report, format_ab_report

    reg = open_registry(args)
    if args.action == "start":
        running = reg.split(args.name)
        if running is not None and not args.restart:
            raise LlmcycleError(f"{args.name} has an A/B test running since "
                                f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(running['started']))} "
                                f"({running['split']}); end it (llmcycle ab end {args.name}) or pass --restart.")
        split = parse_split(args.split)
        versions = {which: reg.resolve(f"{args.name}@{which}").version for which in split}
        if len(set(versions.values())) < len(versions):
            same = ", ".join(f"{w} = v{v}" for w, v in versions.items())
            raise LlmcycleError(f"a test needs different versions, and these name the same one: {same}.")
        reg.set_split(args.name, split)
        total = sum(split.values())
        print(f"{args.name}: traffic split " + ", ".join(f"{w} (v{versions[w]}) {100 * x / total:.0f}%"
                                                         for w, x in split.items())
              + ", sticky per user (servers following the registry switch within their poll interval)")
    elif args.action == "end":
        reg.end_split(args.name)
        print(f"{args.name}: split ended; it answers from {reg.resolve(args.name).ref}")
    else:
        split = reg.split(args.name)
        since = (time.time() - args.since_hours * 3600 if args.since_hours is not None
                 else split["started"] if split else None)
        if not (0 < args.alpha < 1 and 0 < args.min_effect < 1):
            raise LlmcycleError("--alpha and --min-effect must lie between 0 and 1.")
        control = args.control
        if control is not None and not control.isdigit():  # an alias: its version
            control = str(reg.resolve(f"{args.name}@{control}").version)
        elif control is None and "production" in reg.aliases(args.name).get(args.name, {}):
            from llmcycle.monitor.request_log import ensure_schema

            con = reg.store.connect()
            ensure_schema(reg.store, con)  # a registry database no server has logged to yet
            con.close()
            production = str(reg.resolve(f"{args.name}@production").version)
            variants = {r["variant"] for r in reg.store.rows(
                'SELECT DISTINCT variant FROM requests WHERE model = ? AND variant IS NOT NULL AND "time" >= ?',
                [args.name, since or 0.0])}
            control = production if production in variants else None
        report = ab_report(reg.store, args.name, since, args.alpha, control, args.min_effect)
        # each variant's evaluation as registered (the suite's numbers, from eval.json beside the model)
        report["eval"] = {v["variant"]: reg.version(args.name, int(v["variant"])).metrics.get("eval")
                          for v in report["variants"] if v["variant"].isdigit()}
        if args.json:
            print(json.dumps(report, indent=2, default=str))
            return 0
        print(format_ab_report(report))
        for variant, metrics in report["eval"].items():
            if metrics:
                print(f"  v{variant} evaluation: " + ", ".join(f"{k} {val:.3f}" for k, val in metrics.items()
                                                              if isinstance(val, (int, float))))
    return 0


# ---- feedback ---------------------------------------------------------------------------------------


def add_feedback_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Feedback given with POST /v1/feedback (and pairwise labels from /label), exported as "
                     "training data: preference pairs for `llmcycle dpo` and SFT examples for `llmcycle sft`, "
                     "PII-redacted, deduplicated and decontaminated against the evaluation sets. Needs requests "
                     "logged with text (serve store_text=true).")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = sub.add_parser("export", help="write OUT_DIR/preferences.jsonl, sft.jsonl and manifest.json")
    e.add_argument("out_dir")
    e.add_argument("--min-score", type=int, default=4, help="lowest 1-5 score an SFT example may have (default: 4)")
    e.add_argument("--eval-files", nargs="*", default=[], metavar="JSONL",
                   help="more evaluation sets to keep out of the data (their prompt/question fields)")
    e.add_argument("--since-hours", type=float, default=None, help="only requests this recent (default: all)")
    e.add_argument("--no-labels", action="store_true", help="leave out the pairwise labels")
    _db_arg(e)
    p.set_defaults(func=feedback_main)


def feedback_main(args: argparse.Namespace) -> int:
    from llmcycle.improve.export import export_feedback

    since = time.time() - args.since_hours * 3600 if args.since_hours is not None else 0.0
    counts = export_feedback(args.db or default_db(), args.out_dir, args.min_score, args.eval_files, since,
                             labels=not args.no_labels)
    print(f"{args.out_dir}: {counts['preference_pairs']} preference pairs ({counts['pairs_from_ratings']} from "
          f"ratings, {counts.get('pairs_from_labels', 0)} from labels), {counts['sft_examples']} SFT examples "
          f"from {counts['rated_answers']} rated answers; {counts['dropped_eval_overlap']} dropped as evaluation "
          "items")
    return 0
