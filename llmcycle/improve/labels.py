"""Pairwise preference labelling: items (a prompt and two completions), annotators' choices, and the report
that says how far to trust them.

Two tables in the monitor's database (a SQLite file or PostgreSQL URL, monitor/store.py):
`label_items` (prompt, completions a and b, `source` JSON such as {"request_ids": [...], "versions": [...]},
and `gold`: null, or the known answer of a quality-control item) and `labels` (one annotator's choice on
one item: 'a', 'b', 'tie' or 'both_bad', with optional reasons and a comment). An annotator is whatever
the caller names them by (the server uses the API key's id).

The labelling page (serve/static/label.html, through `/v1/label/next` and `/v1/label`) calls `next_item`
and `submit`; `llmcycle label import|report|export` (improve/label_cli.py) the rest. Items are deduplicated
on (prompt, {a, b}): the same two completions in the other order are the same comparison. A served item is
not reserved, so two annotators working at once may take an item one label past `per_item`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError
from llmcycle.improve.agreement import (
    MIN_ITEMS,
    annotator_quality,
    krippendorff_alpha,
    majority,
    pairwise_kappa,
)
from llmcycle.monitor.store import LogStore, as_store, transaction

CHOICES = ("a", "b", "tie", "both_bad")
MAX_TEXT = 100_000  # per prompt or completion: a labelling item is read by a person
MAX_REASONS, MAX_REASON = 20, 200

ITEM_COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "REAL"),
    ("key", "TEXT"),     # sha256 of the prompt and the two completions, order-free: the dedup key
    ("prompt", "TEXT"),
    ("a", "TEXT"),
    ("b", "TEXT"),
    ("source", "TEXT"),  # JSON, or null
    ("gold", "TEXT"),    # null, or one of CHOICES
)
LABEL_COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "REAL"),
    ("item_id", "INTEGER"),
    ("annotator", "TEXT"),
    ("choice", "TEXT"),
    ("reasons", "TEXT"),  # JSON list of strings
    ("comment", "TEXT"),
)


def ensure_label_schema(store: LogStore, con: Any) -> None:
    def cols(spec: tuple[tuple[str, str], ...]) -> str:
        return ", ".join(f'"{c}" {store.column_type(t)}' for c, t in spec)

    with transaction(con):
        con.execute(f"CREATE TABLE IF NOT EXISTS label_items ({store.id_column}, {cols(ITEM_COLUMNS)})")
        con.execute(f"CREATE TABLE IF NOT EXISTS labels ({store.id_column}, {cols(LABEL_COLUMNS)})")
        # Unique indexes make dedup and "one label per annotator and item" hold under concurrent writers.
        con.execute('CREATE UNIQUE INDEX IF NOT EXISTS label_items_key ON label_items ("key")')
        con.execute("CREATE UNIQUE INDEX IF NOT EXISTS labels_once ON labels (item_id, annotator)")


def item_key(prompt: str, a: str, b: str) -> str:
    a, b = sorted((a, b))
    return hashlib.sha256(json.dumps([prompt, a, b], ensure_ascii=False).encode()).hexdigest()


def check_item(row: Any, where: str) -> dict[str, Any]:
    """A labelling item checked: `{prompt, a, b, source?, gold?}` with non-empty texts, a != b, gold one of
    CHOICES or null, source JSON-serialisable; LlmcycleError starting with `where` otherwise."""
    if not isinstance(row, dict):
        raise LlmcycleError(f"{where}: an item is an object {{prompt, a, b, source?, gold?}}.")
    unknown = sorted(set(row) - {"prompt", "a", "b", "source", "gold"})
    if unknown:
        raise LlmcycleError(f"{where}: unknown field {unknown[0]!r}; fields are prompt, a, b, source, gold.")
    for f in ("prompt", "a", "b"):
        v = row.get(f)
        if not isinstance(v, str) or not v.strip():
            raise LlmcycleError(f"{where}: {f!r} must be non-empty text.")
        if len(v) > MAX_TEXT:
            raise LlmcycleError(f"{where}: {f!r} is longer than {MAX_TEXT} characters.")
    if row["a"] == row["b"]:
        raise LlmcycleError(f"{where}: 'a' and 'b' are the same text; there is nothing to compare.")
    gold = row.get("gold")
    if gold is not None and gold not in CHOICES:
        raise LlmcycleError(f"{where}: gold {gold!r}; one of {', '.join(CHOICES)} or null.")
    try:
        source = None if row.get("source") is None else json.dumps(row["source"], ensure_ascii=False)
    except (TypeError, ValueError):
        raise LlmcycleError(f"{where}: 'source' must be JSON (e.g. {{\"request_ids\": [...]}}).") from None
    return {"prompt": row["prompt"], "a": row["a"], "b": row["b"], "source": source, "gold": gold}


class Labels:
    """Labelling items and labels in the monitor's database (`target`: its SQLite file or PostgreSQL URL).

    `per_item`: how many annotators should label each (non-gold) item; `gold_rate`: the chance that
    `next_item` serves a gold item; `seed`: for the random choices (which item, gold or not, which side)."""

    def __init__(self, target: LogStore | str | Path, per_item: int = 3, gold_rate: float = 0.1,
                 seed: int | None = None) -> None:
        if per_item < 1:
            raise LlmcycleError(f"per_item={per_item}: at least 1 annotator per item.")
        if not 0.0 <= gold_rate <= 1.0:
            raise LlmcycleError(f"gold_rate={gold_rate}: a probability from 0 to 1.")
        self.store = as_store(target)
        self.per_item, self.gold_rate = per_item, gold_rate
        self.rng = random.Random(seed)
        with self._connection() as con:
            ensure_label_schema(self.store, con)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        # One connection per call, not per query: on SQLite, closing the last one checkpoints the WAL.
        con = self.store.connect()
        try:
            yield con
        finally:
            con.close()

    def _rows(self, con: Any, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = con.execute(self.store.sql(query), tuple(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]

    # ---- items ----

    def add_items(self, items: Iterable[dict]) -> int:
        """Add items `{prompt, a, b, source?, gold?}`; returns how many were new (an item already there, or
        twice in `items`, is skipped). All are checked first, so a bad one (LlmcycleError naming its index
        in `items`) adds nothing."""
        rows = [check_item(row, f"item {i}") for i, row in enumerate(items)]
        return self._insert(rows)

    def _insert(self, rows: list[dict[str, Any]]) -> int:
        names = [c for c, _ in ITEM_COLUMNS]
        query = self.store.sql(_insert("label_items", names))
        now, added = time.time(), 0
        with self._connection() as con, transaction(con):
            for r in rows:
                row = {**r, "time": now, "key": item_key(r["prompt"], r["a"], r["b"])}
                added += con.execute(query, tuple(row[c] for c in names)).rowcount
        return added

    def next_item(self, annotator: str) -> dict[str, Any] | None:
        """An item `annotator` has not labelled, as the page shows it:
        `{"item_id": int, "prompt": str, "completions": [{"id": "a"|"b", "text": str}, ...]}`, the two
        completions in random order (position bias averages out), never the gold answer or the source.

        A gold item this annotator has not seen (when one is left) while its share of gold labels is below
        `gold_rate` counting this one (so its first item is gold, then about one in 1/gold_rate); otherwise
        a non-gold item with fewer than `per_item` labels, one of those with the fewest. None when no
        non-gold item is left for this annotator (gold items alone are not work)."""
        _check_annotator(annotator)
        mine = "SELECT item_id FROM labels WHERE annotator = ?"
        with self._connection() as con:
            work = self._rows(
                con, "SELECT i.id AS id, COUNT(l.id) AS n FROM label_items i LEFT JOIN labels l ON l.item_id = i.id "
                f"WHERE i.gold IS NULL AND i.id NOT IN ({mine}) GROUP BY i.id HAVING COUNT(l.id) < ? "
                "ORDER BY COUNT(l.id), i.id LIMIT 100", [annotator, self.per_item])
            if not work:
                return None
            chosen = None
            # gold is due while this annotator's share of gold items is below gold_rate, counting the next one:
            # the first item is gold, then about one in 1/gold_rate (a quota, so a short session is checked too)
            seen = self._rows(con, "SELECT COUNT(*) AS n, SUM(CASE WHEN i.gold IS NULL THEN 0 ELSE 1 END) AS g "
                                   "FROM labels l JOIN label_items i ON i.id = l.item_id WHERE l.annotator = ?",
                              [annotator])[0]
            if self.gold_rate and (seen["g"] or 0) < self.gold_rate * ((seen["n"] or 0) + 1):
                gold = self._rows(con, f"SELECT id FROM label_items WHERE gold IS NOT NULL AND id NOT IN ({mine})",
                                  [annotator])
                if gold:
                    chosen = self.rng.choice(gold)["id"]
            if chosen is None:
                fewest = [r["id"] for r in work if r["n"] == work[0]["n"]]
                chosen = self.rng.choice(fewest)  # not always the oldest: annotators at once spread out
            (item,) = self._rows(con, "SELECT prompt, a, b FROM label_items WHERE id = ?", [chosen])
        completions = [{"id": "a", "text": item["a"]}, {"id": "b", "text": item["b"]}]
        self.rng.shuffle(completions)
        return {"item_id": int(chosen), "prompt": item["prompt"], "completions": completions}

    def submit(self, annotator: str, item_id: int, choice: str, reasons: list[str] | None = None,
               comment: str | None = None) -> None:
        """Record `annotator`'s choice on an item: 'a', 'b', 'tie' or 'both_bad', with optional reasons
        (short strings) and a comment. LlmcycleError for an unknown item, a bad choice or reasons, or a
        second label of the same item by the same annotator."""
        _check_annotator(annotator)
        if isinstance(item_id, bool) or not isinstance(item_id, int):
            raise LlmcycleError("item_id: the integer id of the item shown.")
        if choice not in CHOICES:
            raise LlmcycleError(f"choice {choice!r}; one of {', '.join(CHOICES)}.")
        reasons = list(reasons or [])
        if len(reasons) > MAX_REASONS or not all(isinstance(r, str) and 0 < len(r) <= MAX_REASON for r in reasons):
            raise LlmcycleError(f"reasons: at most {MAX_REASONS} short texts (up to {MAX_REASON} characters).")
        if comment is not None and (not isinstance(comment, str) or len(comment) > 10000):
            raise LlmcycleError("comment: text of at most 10000 characters.")
        names = [c for c, _ in LABEL_COLUMNS]
        row = {"time": time.time(), "item_id": item_id, "annotator": annotator, "choice": choice,
               "reasons": json.dumps(reasons, ensure_ascii=False), "comment": comment or None}
        with self._connection() as con:
            if not self._rows(con, "SELECT 1 AS one FROM label_items WHERE id = ?", [item_id]):
                raise LlmcycleError(f"no labelling item {item_id}.")
            with transaction(con):
                cur = con.execute(self.store.sql(_insert("labels", names)), tuple(row[c] for c in names))
                inserted = cur.rowcount
        if not inserted:
            raise LlmcycleError(f"{annotator} has already labelled item {item_id}.")

    # ---- reading back ----

    def _load(self) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, str]]]:
        with self._connection() as con:
            items = {int(r["id"]): r for r in self._rows(con, "SELECT id, prompt, a, b, source, gold FROM label_items")}
            rows = self._rows(con, "SELECT item_id, annotator, choice FROM labels ORDER BY id")
        by_item: dict[int, dict[str, str]] = {}
        for r in rows:
            by_item.setdefault(int(r["item_id"]), {})[r["annotator"]] = r["choice"]
        return items, by_item

    def report(self, min_accuracy: float = 0.7, min_majority: float = 0.6,
               min_items: int = MIN_ITEMS) -> dict[str, Any]:
        """What the labels say and how far to trust them, as JSON-ready data:

        `items`, `gold_items`, `labels` (counts); `annotators`: name -> {"labels": n, **annotator_quality}
        (agreement.py: a measure over fewer than `min_items` items never flags); `flagged`: the names below
        a threshold; `pairwise`: [{"annotators": [x, y], "kappa", "items"}]
        (Cohen's kappa per pair over shared items, pairs with 2 or more); `alpha` (Krippendorff's nominal
        alpha over all items, gold and not, and all annotators; None when nothing is pairable),
        `alpha_without_flagged` (the same without the flagged annotators) and `alpha_items` (items with 2
        or more labels); `majority`: item id -> its most frequent label among the annotators NOT flagged
        (None when tied or unlabelled); `thresholds`."""
        items, by_item = self._load()
        gold = {i: r["gold"] for i, r in items.items() if r["gold"] is not None}
        quality = annotator_quality(by_item, gold, min_accuracy, min_majority, min_items)
        flagged = sorted(a for a, q in quality.items() if q["flagged"])
        counts = Counter(a for by_annotator in by_item.values() for a in by_annotator)
        annotators = sorted(counts)
        kept = [a for a in annotators if a not in flagged]
        alpha, alpha_kept = (self._alpha(by_item, sorted(items), who) for who in (annotators, kept))
        return {
            "items": len(items), "gold_items": len(gold), "labels": sum(counts.values()),
            "annotators": {a: {"labels": counts[a], **quality[a]} for a in annotators},
            "flagged": flagged,
            "pairwise": [{"annotators": list(pair), **v} for pair, v in pairwise_kappa(by_item).items()],
            "alpha": alpha, "alpha_without_flagged": alpha_kept,
            "alpha_items": sum(len(v) >= 2 for v in by_item.values()),
            "majority": {i: majority([c for a, c in by_item.get(i, {}).items() if a not in flagged])
                         for i in sorted(items)},
            "thresholds": {"min_accuracy": min_accuracy, "min_majority": min_majority, "min_items": min_items},
        }

    @staticmethod
    def _alpha(by_item: dict[int, dict[str, str]], items: list[int], annotators: list[str]) -> float | None:
        matrix = [[by_item.get(i, {}).get(a) for i in items] for a in annotators]
        alpha = krippendorff_alpha(matrix) if annotators else float("nan")
        return None if alpha != alpha else alpha  # NaN: nothing pairable

    def preference_pairs(self) -> list[dict[str, Any]]:
        """Training pairs from the labels: for each non-gold item whose majority (report(), annotators it
        flags left out of the vote) is 'a' or 'b', `{"prompt", "chosen", "rejected", "item_id", "source",
        "votes": {choice: count}}`, by item id. Ties, 'both_bad' and items without a majority give none."""
        report = self.report()
        items, by_item = self._load()
        flagged = set(report["flagged"])
        pairs = []
        for i in sorted(items):
            item, top = items[i], report["majority"][i]
            if item["gold"] is not None or top not in ("a", "b"):
                continue
            votes = Counter(c for a, c in by_item.get(i, {}).items() if a not in flagged)
            chosen, rejected = (item["a"], item["b"]) if top == "a" else (item["b"], item["a"])
            pairs.append({"prompt": item["prompt"], "chosen": chosen, "rejected": rejected, "item_id": i,
                          "source": None if item["source"] is None else json.loads(item["source"]),
                          "votes": dict(votes)})
        return pairs


def _insert(table: str, names: list[str]) -> str:
    # DO NOTHING on a unique index's conflict; the cursor's rowcount (0 or 1) says which happened.
    cols = ", ".join(f'"{c}"' for c in names)
    return f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(names))}) ON CONFLICT DO NOTHING"


def _check_annotator(annotator: Any) -> None:
    if not isinstance(annotator, str) or not annotator or len(annotator) > 256:
        raise LlmcycleError("annotator: a name or key id of 1 to 256 characters.")
