"""API keys and per-key rate limits for the OpenAI-compatible server.

Keys live in a SQLite file (`KeyStore`) as sha256 hashes only; the plain key is shown once, at creation.
Every call opens its own connection and nothing is cached, so the server sees a key revoked by
`llmcycle keys revoke` (another process) on the very next request, and threads never share a connection.

`RateLimiter` keeps one token bucket per key and limit, in memory: capacity = the per-minute limit,
refilled continuously at limit/60 per second, starting full. A request needs one unit in every bucket the
key has; it consumes one request unit. Tokens are only known after generation, so `record_tokens` debits
them afterwards and may drive the bucket negative, which blocks the key until it refills to one token.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmcycle.errors import LlmcycleError

KEY_PREFIX = "llm-"
PREFIX_CHARS = 12  # "llm-" + 8 random chars: enough to tell keys apart, reveals 48 of ~256 random bits
DEFAULT_DB = "runs/keys.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, prefix TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL, revoked_at TEXT, requests_per_minute INTEGER, tokens_per_minute INTEGER,
    budget REAL, budget_period TEXT, role TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_active_name ON api_keys(name) WHERE revoked_at IS NULL;
"""
# Columns added after the first release, added to older databases when they are opened.
_ADDED = {"budget": "REAL", "budget_period": "TEXT", "role": "TEXT"}
_COLUMNS = ("id, name, prefix, created_at, revoked_at, requests_per_minute, tokens_per_minute, budget, "
            "budget_period, role")
BUDGET_PERIODS = ("day", "month", "total")
# user: the API; scrape: /metrics only (a Prometheus server's key); annotator: the labelling page's routes
# (/v1/label) and feedback only; admin: all
ROLES = ("user", "scrape", "annotator", "admin")


@dataclass
class KeyRecord:
    """What the store knows about one key; never the key itself."""

    id: str
    name: str
    prefix: str
    created_at: str
    revoked_at: str | None
    requests_per_minute: int | None
    tokens_per_minute: int | None
    budget: float | None = None  # spend allowed per `budget_period`, in the price table's currency
    budget_period: str | None = None  # day, month (UTC calendar) or total
    role: str | None = None  # user (None: keys made before roles), scrape or admin

    def may(self, *roles: str) -> bool:
        return (self.role or "user") in roles


def hash_key(plain_key: str) -> str:
    # A plain sha256 (no salt, no slow KDF) is enough: keys carry 256 random bits, so there is nothing to
    # brute-force or look up in a table, and a fast hash lets `verify` find the key by an indexed lookup.
    return hashlib.sha256(plain_key.encode("utf-8")).hexdigest()


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check_limit(value: int | None, what: str) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise LlmcycleError(f"{what} must be a positive integer or unset, got {value!r}.")
    return value


class KeyStore:
    """API keys in the SQLite file `path`, created (with its folder) unless `create=False`."""

    def __init__(self, path: str | Path, create: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            if not create:
                raise LlmcycleError(f"API key database {self.path} does not exist; create a key first.")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(mode=0o600)  # hashes only, but no reason to let other users read them
        from llmcycle.monitor.audit import AuditLog, audit_path_for

        self.audit = AuditLog(audit_path_for(self.path))  # who created and revoked which key, hash-chained
        with self._connect() as db:
            db.executescript(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(api_keys)")}
            for column, kind in _ADDED.items():
                if column not in have:
                    db.execute(f"ALTER TABLE api_keys ADD COLUMN {column} {kind}")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """A fresh connection inside one transaction; sqlite errors become one clear sentence."""
        try:
            conn = sqlite3.connect(self.path, timeout=10.0)
            try:
                with conn:
                    yield conn
            finally:
                conn.close()
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as e:
            raise LlmcycleError(f"{self.path} is not a usable API key database (SQLite said: {e}).") from e

    def create(self, name: str, requests_per_minute: int | None = None, tokens_per_minute: int | None = None,
               budget: float | None = None, budget_period: str = "month", role: str = "user") -> tuple[str, KeyRecord]:
        """A new key: returns the plain key (the only time it exists outside the caller) and its record."""
        name = name.strip() if isinstance(name, str) else ""
        if not name:
            raise LlmcycleError("A key needs a non-empty name.")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0):
            raise LlmcycleError(f"budget must be a number >= 0 or unset, got {budget!r}.")
        if budget_period not in BUDGET_PERIODS:
            raise LlmcycleError(f"budget period must be one of {', '.join(BUDGET_PERIODS)}, not {budget_period!r}.")
        if role not in ROLES:
            raise LlmcycleError(f"role must be one of {', '.join(ROLES)}, not {role!r}.")
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        rec = KeyRecord(secrets.token_hex(4), name, plain[:PREFIX_CHARS], _now_iso(), None,
                        _check_limit(requests_per_minute, "requests_per_minute"),
                        _check_limit(tokens_per_minute, "tokens_per_minute"),
                        None if budget is None else float(budget), None if budget is None else budget_period, role)
        try:
            with self._connect() as db:
                db.execute(f"INSERT INTO api_keys ({_COLUMNS}, key_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           (rec.id, rec.name, rec.prefix, rec.created_at, rec.revoked_at,
                            rec.requests_per_minute, rec.tokens_per_minute, rec.budget, rec.budget_period,
                            rec.role, hash_key(plain)))
        except sqlite3.IntegrityError as e:  # the partial unique index: one active key per name
            if "api_keys.name" not in str(e):
                raise LlmcycleError(f"Could not store the new key in {self.path} ({e}); try again.") from e
            raise LlmcycleError(f"An active key named {name!r} already exists in {self.path}; "
                                "revoke it or pick another name.") from e
        self.audit.append("key_create", rec.id, {"name": rec.name, "prefix": rec.prefix,
                                                 "requests_per_minute": rec.requests_per_minute,
                                                 "tokens_per_minute": rec.tokens_per_minute, "budget": rec.budget,
                                                 "budget_period": rec.budget_period, "role": rec.role})
        return plain, rec

    def _select(self, where: str, params: tuple = ()) -> list[KeyRecord]:
        with self._connect() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM api_keys {where} ORDER BY created_at, rowid", params)
            return [KeyRecord(*row) for row in rows.fetchall()]

    def list(self, include_revoked: bool = False) -> list[KeyRecord]:
        return self._select("" if include_revoked else "WHERE revoked_at IS NULL")

    def revoke(self, key_id_or_name: str) -> KeyRecord:
        """Revoke the active key with this id (preferred) or name."""
        with self._connect() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE revoked_at IS NULL AND (id = ? OR name = ?) "
                             "ORDER BY id = ? DESC LIMIT 1", (key_id_or_name,) * 3).fetchone()
            if row is not None:
                rec = KeyRecord(*row)
                rec.revoked_at = _now_iso()
                cur = db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                 (rec.revoked_at, rec.id))
                if cur.rowcount:  # 0: another process revoked it between our SELECT and UPDATE
                    self.audit.append("key_revoke", rec.id, {"name": rec.name, "prefix": rec.prefix})
                    return rec
        if self._select("WHERE id = ? OR name = ?", (key_id_or_name, key_id_or_name)):
            raise LlmcycleError(f"Key {key_id_or_name!r} in {self.path} is already revoked.")
        raise LlmcycleError(f"No key with id or name {key_id_or_name!r} in {self.path}.")

    def verify(self, plain_key: str) -> KeyRecord | None:
        """The record of an active key, or None. Lookup by hash: no secret is compared byte by byte."""
        if not isinstance(plain_key, str) or not plain_key.startswith(KEY_PREFIX):
            return None
        found = self._select("WHERE key_hash = ? AND revoked_at IS NULL", (hash_key(plain_key),))
        return found[0] if found else None

    def __len__(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL").fetchone()[0]


class RateLimiter:
    """Per-key token buckets for requests and tokens per minute (see the module docstring)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (key, kind) -> (level, time)

    def _level(self, key: tuple[str, str], limit: int, now: float) -> float:
        level, then = self._buckets.get(key, (float(limit), now))
        return min(float(limit), level + max(0.0, now - then) * limit / 60.0)

    def check_request(self, key_id: str, requests_per_minute: int | None, tokens_per_minute: int | None,
                      now: float | None = None) -> float | None:
        """None if allowed (one request is consumed), else seconds until it would be allowed."""
        now = time.monotonic() if now is None else now
        limits = [(k, lim) for k, lim in (("req", requests_per_minute), ("tok", tokens_per_minute)) if lim]
        with self._lock:
            levels = {k: self._level((key_id, k), lim, now) for k, lim in limits}
            # 1e-9: waiting exactly the returned time must be enough despite float rounding.
            wait = max([(1.0 - levels[k]) * 60.0 / lim for k, lim in limits if levels[k] < 1.0 - 1e-9],
                       default=None)
            if wait is not None:
                return wait
            for k, _ in limits:
                self._buckets[(key_id, k)] = (levels[k] - (1.0 if k == "req" else 0.0), now)
            return None

    def record_tokens(self, key_id: str, tokens: int, tokens_per_minute: int | None,
                      now: float | None = None) -> None:
        """Debit `tokens` (prompt + completion) used by a finished request; the bucket may go negative."""
        if not tokens_per_minute or tokens <= 0:
            return
        now = time.monotonic() if now is None else now
        with self._lock:
            level = self._level((key_id, "tok"), tokens_per_minute, now)
            self._buckets[(key_id, "tok")] = (level - tokens, now)


# ---------------------------------------------------------------- CLI: llmcycle keys create|list|revoke


def add_keys_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `create`, `list` and `revoke` subcommands (dest `keys_command`) to `parser`."""
    sub = parser.add_subparsers(dest="keys_command", required=True, metavar="{create,list,revoke}")
    p = sub.add_parser("create", help="create a key and print it once")
    p.add_argument("name", help="a unique name for the key (e.g. who uses it)")
    p.add_argument("--rpm", type=int, default=None, help="requests per minute (default: unlimited)")
    p.add_argument("--tpm", type=int, default=None, help="prompt+completion tokens per minute (default: unlimited)")
    p.add_argument("--budget", type=float, default=None,
                   help="spend allowed per --budget-period, priced by serve's price table (default: unlimited)")
    p.add_argument("--budget-period", choices=BUDGET_PERIODS, default="month",
                   help="day or month (UTC calendar), or total (default: month)")
    p.add_argument("--role", choices=ROLES, default="user",
                   help="user: the API; scrape: /metrics only (for Prometheus); annotator: the labelling page "
                        "(/label) and feedback; admin: all (default: user)")
    p2 = sub.add_parser("list", help="list keys (never the keys themselves)")
    p2.add_argument("--all", action="store_true", help="include revoked keys")
    p3 = sub.add_parser("revoke", help="revoke a key by id or name")
    p3.add_argument("key", metavar="KEY_ID_OR_NAME")
    for q in (p, p2, p3):
        q.add_argument("--db", default=DEFAULT_DB, metavar="PATH", help=f"key database (default: {DEFAULT_DB})")


def _limit(n: int | None) -> str:
    return "-" if n is None else str(n)


def _budget(rec: KeyRecord) -> str:
    return "-" if rec.budget is None else f"{rec.budget:g}/{rec.budget_period}"


def keys_main(args: argparse.Namespace) -> int:
    """Run one `llmcycle keys` subcommand; returns the exit status."""
    cmd = args.keys_command
    if cmd == "create":
        if args.budget is not None and args.budget < 0:  # before the database file is made
            raise LlmcycleError(f"budget must be a number >= 0 or unset, got {args.budget!r}.")
        plain, rec = KeyStore(args.db).create(args.name, args.rpm, args.tpm, args.budget, args.budget_period,
                                              args.role)
        print(f"Created key {rec.name!r} (id {rec.id}, role {rec.role}, rpm {_limit(rec.requests_per_minute)}, "
              f"tpm {_limit(rec.tokens_per_minute)}, budget {_budget(rec)}) in {args.db}:")
        print(plain)
        print("Copy it now: it is stored only as a hash and will not be shown again.")
    elif cmd == "list":
        if not os.path.exists(args.db):
            raise LlmcycleError(f"API key database {args.db} does not exist; create a key first.")
        rows = [("ID", "NAME", "ROLE", "PREFIX", "CREATED", "REVOKED", "RPM", "TPM", "BUDGET")]
        rows += [(r.id, r.name, r.role or "user", r.prefix + "...", r.created_at, r.revoked_at or "-",
                  _limit(r.requests_per_minute), _limit(r.tokens_per_minute), _budget(r))
                 for r in KeyStore(args.db).list(include_revoked=args.all)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    elif cmd == "revoke":
        rec = KeyStore(args.db, create=False).revoke(args.key)
        print(f"Revoked key {rec.name!r} (id {rec.id}, prefix {rec.prefix}...) at {rec.revoked_at}.")
    else:
        raise LlmcycleError(f"Unknown keys command {cmd!r}; use create, list or revoke.")
    return 0
