"""The audit trail: append-only, hash-chained records of administrative actions (keys created and revoked,
servers started and stopped with the models and configuration they loaded) and, when enabled, of every
request.

Each record holds `hash = sha256(prev_hash + canonical JSON of (seq, time, actor, action, target, details))`,
so editing a record breaks its own hash, and deleting or reordering records breaks the chain of
`prev_hash`. Deleting the newest records would leave a shorter chain that is still whole, so every append
also rewrites a head file beside the database (`<db>.head`: the last sequence number and hash), after
the commit, and `verify` checks the chain holds that record (records after it, from a crash between commit
and head update, are accepted: appending hides nothing). (Whoever can rewrite both the database and its head can rewrite
history; copy the head elsewhere, e.g. into a log shipper, to close that too.)

Appends from several processes (`llmcycle keys` while a server runs) are serialized by SQLite's write lock
(`BEGIN IMMEDIATE`). `llmcycle audit verify` exits 1 naming the first broken record; `llmcycle audit show`
lists records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError

GENESIS = "0" * 64
_SCHEMA = """CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY, time REAL NOT NULL, actor TEXT, action TEXT NOT NULL, target TEXT,
    details TEXT, prev_hash TEXT NOT NULL, hash TEXT NOT NULL)"""


def record_hash(prev_hash: str, seq: int, t: float, actor: str | None, action: str, target: str | None,
                details: str | None) -> str:
    body = json.dumps([seq, repr(t), actor, action, target, details], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def audit_path_for(keys_db: str | Path) -> Path:
    """The audit trail that goes with a key database: `audit.sqlite` in its folder."""
    return Path(keys_db).parent / "audit.sqlite"


class AuditLog:
    """An audit trail in the SQLite file `path` (created with its folder when missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect()
        con.execute(_SCHEMA)
        con.close()

    def _connect(self) -> sqlite3.Connection:
        try:
            con = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            return con
        except sqlite3.Error as e:
            raise LlmcycleError(f"{self.path} is not a usable audit trail (SQLite said: {e}).") from e

    def append(self, action: str, target: str | None = None, details: dict | None = None,
               actor: str | None = None) -> str:
        """Add one record; returns its hash. `actor` defaults to the OS user running the process."""
        return self.append_many([(action, target, details)], actor)

    def append_many(self, records: list[tuple[str, str | None, dict | None]], actor: str | None = None) -> str:
        """Add (action, target, details) records in one transaction; returns the last hash."""
        actor = actor or _os_user()
        con = self._connect()
        try:
            con.execute("BEGIN IMMEDIATE")  # one writer at a time, across processes
            last = con.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, h = (last[0], last[1]) if last else (0, GENESIS)
            for action, target, details in records:
                payload = None if details is None else json.dumps(details, ensure_ascii=False, sort_keys=True,
                                                                  default=str)
                prev, seq, t = h, seq + 1, time.time()
                h = record_hash(prev, seq, t, actor, action, target, payload)
                con.execute("INSERT INTO audit VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (seq, t, actor, action, target, payload, prev, h))
            con.execute("COMMIT")
            # After the commit: a crash in between leaves the head behind the rows, which verify accepts
            # (appending hides nothing); the head ahead of the rows is what deleting from the end looks like.
            _write_head(self.head_path, seq, h)
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        finally:
            con.close()
        return h

    def records(self) -> list[dict[str, Any]]:
        con = self._connect()
        con.row_factory = sqlite3.Row
        rows = [dict(r) for r in con.execute("SELECT * FROM audit ORDER BY rowid")]
        con.close()
        return rows

    def verify(self) -> list[str]:
        """Every problem found, first the first; empty when the trail is whole."""
        problems: list[str] = []
        prev, expected_seq = GENESIS, 1
        rows = self.records()
        for r in rows:
            if r["seq"] != expected_seq:
                problems.append(f"record {r['seq']}: expected record {expected_seq} here (a record was deleted "
                                f"or moved)")
            if r["prev_hash"] != prev:
                problems.append(f"record {r['seq']}: its predecessor's hash does not match (deleted or reordered)")
            if record_hash(r["prev_hash"], r["seq"], r["time"], r["actor"], r["action"], r["target"],
                           r["details"]) != r["hash"]:
                problems.append(f"record {r['seq']}: contents do not match its hash (edited)")
            prev, expected_seq = r["hash"], r["seq"] + 1
        head = _read_head(self.head_path)
        if head is not None:
            at_head = {r["seq"]: r["hash"] for r in rows}.get(head[0], GENESIS if head[0] == 0 else None)
            if at_head != head[1]:
                last = rows[-1]["seq"] if rows else 0
                problems.append(f"the head file names record {head[0]} with another hash, or a record the trail "
                                f"does not have (it ends at {last}): records were deleted from the end, or "
                                f"the head was changed")
        elif rows:
            problems.append(f"{self.head_path} is missing")
        return problems


def _os_user() -> str:
    try:
        import getpass

        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name (a container without one): the uid says enough
        return f"uid:{os.getuid()}" if hasattr(os, "getuid") else "unknown"


def _write_head(path: Path, seq: int, h: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{seq} {h}\n")
    os.replace(tmp, path)


def _read_head(path: Path) -> tuple[int, str] | None:
    try:
        seq, h = path.read_text().split()
        return int(seq), h
    except (OSError, ValueError):
        return None


# ---- CLI: llmcycle audit verify|show


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("The audit trail of administrative actions (keys, servers, models loaded): verify its hash "
                     "chain or list it. See docs/monitor.md.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    v = sub.add_parser("verify", help="check the hash chain; exit 1 on an edited, deleted or reordered record")
    s = sub.add_parser("show", help="list the records")
    s.add_argument("--last", type=int, default=50, help="the newest N records (default: 50)")
    for q in (v, s):
        q.add_argument("--db", type=Path, default=audit_path_for("runs/keys.sqlite"),
                       help="the audit trail (default: runs/audit.sqlite, beside the default key database)")
    p.set_defaults(func=audit_main)


def audit_main(args: argparse.Namespace) -> int:
    if not args.db.exists():
        raise LlmcycleError(f"no audit trail at {args.db} (`llmcycle keys` and `llmcycle serve --keys` write one "
                            "beside the key database).")
    log = AuditLog(args.db)
    if args.action == "verify":
        problems = log.verify()
        for p in problems:
            print(f"BROKEN: {p}")
        n = len(log.records())
        print(f"{args.db}: {n} record(s), " + ("chain intact" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    for r in log.records()[-args.last:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["time"]))
        print(f"{r['seq']:>6}  {when}Z  {r['actor'] or '-':<12} {r['action']:<16} {r['target'] or '-'}  "
              f"{r['details'] or ''}")
    return 0
