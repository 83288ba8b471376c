"""Where the request log lives: a SQLite file (the default: nothing to run) or a PostgreSQL database (a
`postgresql://user:password@host:port/db` URL, SQLAlchemy's `postgresql+psycopg://` spelling accepted), so
several servers can share one log.

`LogStore(target)` hides the two dialects' few differences from the rest of the monitor: placeholders
(queries are written with `?`), the id column, column types, and how a table's columns are listed.
Queries quote column names (`"user"` is a reserved word in PostgreSQL). PostgreSQL needs the `psycopg`
package (`pip install 'llmcycle[postgres]'`); SQLite needs nothing.
"""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError

_URL = re.compile(r"^postgres(?:ql)?(?:\+\w+)?://", re.IGNORECASE)


def is_url(target: str | Path) -> bool:
    return isinstance(target, str) and bool(_URL.match(target))


class LogStore:
    """A request-log database: `connect()` gives a DB-API connection, `rows()` and `execute()` run queries
    written with `?` placeholders on either dialect."""

    def __init__(self, target: str | Path) -> None:
        self.target = target
        self.kind = "postgresql" if is_url(target) else "sqlite"
        if self.kind == "postgresql":
            self.url = _URL.sub("postgresql://", str(target), count=1)
            try:
                import psycopg  # noqa: F401
            except ImportError:
                raise LlmcycleError("a PostgreSQL request log needs psycopg: pip install 'llmcycle[postgres]'.") from None
        else:
            self.path = Path(target)

    def __str__(self) -> str:  # for messages: never the password
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", str(self.target))

    def exists(self) -> bool:
        return self.kind == "postgresql" or self.path.exists()

    def connect(self) -> Any:
        if self.kind == "sqlite":
            con = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints, never corrupt
            return con
        import psycopg

        try:
            return psycopg.connect(self.url, connect_timeout=10)
        except psycopg.Error as e:
            raise LlmcycleError(f"cannot reach the request log at {self}: {e}") from None

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """The driver's error classes, for the callers that must never fail a request on a database error."""
        if self.kind == "sqlite":
            return (sqlite3.Error,)
        import psycopg

        return (psycopg.Error,)

    def sql(self, query: str) -> str:
        return query if self.kind == "sqlite" else query.replace("?", "%s")

    def column_type(self, sqlite_type: str) -> str:
        return {"REAL": "DOUBLE PRECISION", "INTEGER": "BIGINT"}.get(sqlite_type, sqlite_type) \
            if self.kind == "postgresql" else sqlite_type

    @property
    def id_column(self) -> str:
        return "id INTEGER PRIMARY KEY" if self.kind == "sqlite" else "id BIGSERIAL PRIMARY KEY"

    def columns(self, con: Any, table: str) -> set[str]:
        if self.kind == "sqlite":
            return {row[1] for row in con.execute(f"PRAGMA table_info({table})")}
        cur = con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))
        return {r[0] for r in cur.fetchall()}

    def rows(self, query: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a query; its rows as dicts."""
        con = self.connect()
        try:
            cur = con.execute(self.sql(query), tuple(params))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]
        finally:
            con.close()

    def execute(self, query: str, params: Sequence[Any] = ()) -> None:
        """Run one statement in its own transaction."""
        con = self.connect()
        try:
            with transaction(con):
                con.execute(self.sql(query), tuple(params))
        finally:
            con.close()


@contextlib.contextmanager
def transaction(con: Any) -> Iterator[None]:
    """Commit what the block did, or roll it back. (A psycopg connection's own `with` would also close
    it, and the log's writer keeps its connection.)"""
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()


def as_store(target: LogStore | str | Path) -> LogStore:
    return target if isinstance(target, LogStore) else LogStore(target)
