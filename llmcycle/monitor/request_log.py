"""The request log: one row per request, written to SQLite off the event loop.

`RequestLog(path)` opens (or creates) the database in WAL mode and starts one writer thread. `submit(row)`
never blocks and never raises: the row goes on a bounded queue, and when the queue is full (the disk is
slower than the traffic) the row is dropped and counted (`dropped`), so a slow disk can cost log rows but
never a request's latency or its success. The writer inserts whatever has queued, in one transaction, every
`flush_interval` seconds (or sooner when `batch_size` rows wait): a killed server loses at most the rows of
the last interval, and SQLite's journal keeps the file consistent whatever the moment of the kill.
`retention_days` deletes older rows as the writer goes (hourly). `close()` writes what is queued and stops.

The log is a SQLite file by default, or a PostgreSQL database given by URL for several servers sharing one
(monitor/store.py). Readers (`llmcycle monitor`, tests) open a SQLite log with `connect(path)`; WAL lets them
read while the server writes.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmcycle.monitor.store import LogStore, transaction

if TYPE_CHECKING:
    from llmcycle.monitor.audit import AuditLog

log = logging.getLogger(__name__)

# (column, SQLite type). The order is the insert order; every row is a dict with some of these keys.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "REAL"),              # unix time the request arrived
    ("request_id", "TEXT"),
    ("key_id", "TEXT"),            # the API key's id, never the key (null when keys are off)
    ("route", "TEXT"),             # /v1/chat/completions ...
    ("model", "TEXT"),             # the name the client asked for
    ("base_model", "TEXT"),        # the served model that ran it
    ("adapter", "TEXT"),           # the LoRA adapter, if any
    ("model_version", "TEXT"),     # the served directory's manifest hash (lineage)
    ("variant", "TEXT"),           # a registry name's version that answered ("3"), for A/B tests
    ("status", "INTEGER"),         # HTTP status; 499 when the client went away first
    ("error_type", "TEXT"),
    ("stream", "INTEGER"),
    ("num_prompts", "INTEGER"),
    ("prompt_tokens", "INTEGER"),
    ("cached_tokens", "INTEGER"),  # prompt tokens served from the prefix cache
    ("completion_tokens", "INTEGER"),
    ("queue_s", "REAL"),           # arrival at the engine -> first scheduled
    ("ttft_s", "REAL"),            # arrival at the server -> first token
    ("itl_mean_s", "REAL"),        # mean time between output tokens
    ("total_s", "REAL"),           # arrival at the server -> last byte produced
    ("output_perplexity", "REAL"),  # exp(-mean logprob) of the generated tokens under the served model
    ("finish_reason", "TEXT"),     # of the first sequence; `finish_reasons` has them all
    ("finish_reasons", "TEXT"),    # JSON list
    ("cost", "REAL"),              # in the price table's currency; null when the model has no price
    ("user", "TEXT"),              # the client's `user` field
    ("metadata", "TEXT"),          # the client's `metadata` object, JSON
    ("prompt_lang", "TEXT"),       # the prompt's language (py3langid), for drift; found by the writer thread
    ("drift_flags", "TEXT"),       # features on which this request falls outside the drift reference (JSON)
    ("safety", "TEXT"),            # the safety checks that fired: JSON list of {check, on, action, score}
    ("prompt", "TEXT"),            # only with store_text, PII-redacted
    ("completion", "TEXT"),        # only with store_text, PII-redacted
    ("messages", "TEXT"),          # a chat's messages as JSON, only with store_text, PII-redacted
)
NAMES = tuple(c for c, _ in COLUMNS)
_QUOTED = ", ".join(f'"{c}"' for c in NAMES)
# what an audited request keeps in the audit trail (never its text)
AUDITED = ("time", "key_id", "route", "model", "model_version", "status", "prompt_tokens", "completion_tokens",
           "cost", "user")
_INSERT = f"INSERT INTO requests ({_QUOTED}) VALUES ({', '.join('?' * len(NAMES))})"


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to a SQLite request log, the table created if missing (rows come back as sqlite3.Row)."""
    store = LogStore(path)
    con = store.connect()
    con.row_factory = sqlite3.Row
    ensure_schema(store, con)
    return con


def ensure_schema(store: LogStore, con: Any) -> None:
    """The requests table and its time index, with every column of `COLUMNS` (a log written by an older
    llmcycle gains the columns added since)."""
    cols = ", ".join(f'"{c}" {store.column_type(t)}' for c, t in COLUMNS)
    with transaction(con):
        con.execute(f"CREATE TABLE IF NOT EXISTS requests ({store.id_column}, {cols})")
        con.execute('CREATE INDEX IF NOT EXISTS requests_time ON requests ("time")')
        have = store.columns(con, "requests")
        for c, t in COLUMNS:
            if c not in have:
                con.execute(f'ALTER TABLE requests ADD COLUMN "{c}" {store.column_type(t)}')


class RequestLog:
    """Writes request rows to SQLite from a thread of its own; see the module docstring."""

    def __init__(self, path: str | Path, flush_interval: float = 1.0, queue_size: int = 10000,
                 batch_size: int = 512, retention_days: float | None = None, audit: AuditLog | None = None) -> None:
        self.store = LogStore(path)  # a SQLite file, or a postgresql:// URL (monitor/store.py)
        if self.store.kind == "sqlite":
            self.store.path.parent.mkdir(parents=True, exist_ok=True)
        con = self.store.connect()  # a bad path or an unreachable database fails here, at startup
        ensure_schema(self.store, con)
        con.close()
        self.flush_interval, self.batch_size, self.retention_days = flush_interval, batch_size, retention_days
        self.audit = audit  # when set, every written row is also an audit record (audit_requests)
        self.drift_profile: dict | None = None  # set by the drift check: each row is flagged against it
        self.dropped = 0   # rows lost to a full queue
        self.written = 0   # rows committed
        self.failed = 0    # rows lost to a database error
        self.submitted = 0  # rows handed to submit()
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=queue_size)
        self._last_retention = 0.0
        self._thread = threading.Thread(target=self._run, name="llmcycle-request-log", daemon=True)
        self._thread.start()

    def submit(self, row: dict[str, Any]) -> None:
        """Queue one row (a dict keyed by `NAMES`, plus `_prompt_text` for the writer to find the prompt's
        language from); never blocks, never raises."""
        self.submitted += 1
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 10.0) -> None:
        """Write every queued row, then stop the writer."""
        if self._thread.is_alive():
            while True:  # the stop mark must get in even when the queue is full
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join(timeout)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every row submitted so far is written (or counted lost); False if `timeout` came first.
        For readers in the same process that must see the rows (the run's improve stage)."""
        deadline = time.monotonic() + timeout
        while self.written + self.dropped + self.failed < self.submitted:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.02)
        return True

    @property
    def path(self) -> Path | str:
        """The SQLite file, or the PostgreSQL URL."""
        return self.store.path if self.store.kind == "sqlite" else self.store.target

    def _run(self) -> None:
        con = self.store.connect()
        stop = False
        while not stop:
            rows: list[dict] = []
            deadline = time.monotonic() + self.flush_interval
            while len(rows) < self.batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                rows.append(item)
            if rows:
                self._write(con, rows)
            self._apply_retention(con)
        con.close()

    def _write(self, con: Any, rows: list[dict]) -> None:
        from llmcycle.monitor.drift import outliers  # drift imports numpy: loaded by the writer, once
        for r in rows:  # derived here, off the request path: the prompt's text itself is not kept
            text = r.pop("_prompt_text", None)
            if text is not None and r.get("prompt_lang") is None:
                r["prompt_lang"] = _language(text)
            if self.drift_profile:
                r["drift_flags"] = outliers(r, self.drift_profile) or None
        values = [tuple(_column_value(r.get(c)) for c in NAMES) for r in rows]
        try:
            with transaction(con):
                con.cursor().executemany(self.store.sql(_INSERT), values)
            self.written += len(rows)
        except self.store.errors as e:  # a full or locked disk, a database gone: count the loss, keep serving
            self.failed += len(rows)
            log.warning("request log: %d row(s) not written: %s", len(rows), e)
            return
        if self.audit is not None:
            try:
                self.audit.append_many([("request", r.get("request_id"), {k: r.get(k) for k in AUDITED})
                                        for r in rows], actor="server")
            except (sqlite3.Error, OSError) as e:
                log.warning("audit trail: %d request record(s) not written: %s", len(rows), e)

    def _apply_retention(self, con: Any) -> None:
        now = time.time()
        if self.retention_days is None or now - self._last_retention < 3600:
            return
        self._last_retention = now
        try:
            with transaction(con):
                con.execute(self.store.sql('DELETE FROM requests WHERE "time" < ?'),
                            (now - self.retention_days * 86400,))
        except self.store.errors as e:
            log.warning("request log: retention delete failed: %s", e)


def _language(text: str) -> str | None:
    from llmcycle.monitor.language import language_of

    try:
        return language_of(text)
    except Exception as e:  # noqa: BLE001 - a feature for drift must never cost the row
        log.debug("language of a prompt: %s", e)
        return None


def _column_value(v: Any) -> Any:
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, bool):
        return int(v)
    return v
