"""Feedback on logged requests: a thumbs rating, a 1-5 score, or a comment, joined to its request by id.

`POST /v1/feedback` writes here (serve/server.py); `llmcycle feedback export` and the A/B report read it.
A row's `positive` is the one number the reports use: thumbs up, or a score of 4 or 5, is 1; thumbs down or
a score of 1-2 is 0; a score of 3 or a bare comment is null (no verdict).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError
from llmcycle.monitor.store import LogStore, as_store, transaction

COLUMNS: tuple[tuple[str, str], ...] = (
    ("time", "REAL"),
    ("request_id", "TEXT"),   # the id the API answered with (chatcmpl-..., cmpl-...)
    ("key_id", "TEXT"),       # who gave it (null when keys are off)
    ("thumbs", "INTEGER"),    # 1 up, 0 down, null
    ("score", "INTEGER"),     # 1..5, null
    ("positive", "INTEGER"),  # 1, 0 or null: see the module docstring
    ("comment", "TEXT"),
    ("user", "TEXT"),
)
NAMES = tuple(c for c, _ in COLUMNS)


def ensure_feedback_schema(store: LogStore, con: Any) -> None:
    cols = ", ".join(f'"{c}" {store.column_type(t)}' for c, t in COLUMNS)
    with transaction(con):
        con.execute(f"CREATE TABLE IF NOT EXISTS feedback ({store.id_column}, {cols})")
        con.execute("CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id)")


def positive(thumbs: int | None, score: int | None) -> int | None:
    if thumbs is not None:
        return 1 if thumbs else 0
    if score is not None:
        return 1 if score >= 4 else 0 if score <= 2 else None
    return None


def check_feedback(body: Any) -> dict[str, Any]:
    """The fields of a feedback body, checked; LlmcycleError (naming the field) for a bad one.

    `{"request_id": str, "thumbs": "up"|"down"|true|false|1|0, "score": 1..5, "comment": str, "user": str}`:
    a request id and at least one of thumbs, score, comment."""
    if not isinstance(body, dict):
        raise LlmcycleError("the body must be a JSON object.")
    unknown = sorted(set(body) - {"request_id", "thumbs", "score", "comment", "user"})
    if unknown:
        raise LlmcycleError(f"unknown field {unknown[0]!r}; fields are request_id, thumbs, score, comment, user.")
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > 200:
        raise LlmcycleError("request_id: the id of an answered request (its `id` field) is required.")
    thumbs = body.get("thumbs")
    if thumbs is not None:
        table = {"up": 1, "down": 0, True: 1, False: 0}  # 1 and 0 are True and False as dict keys
        if isinstance(thumbs, (list, dict, float)) or thumbs not in table:
            raise LlmcycleError('thumbs: "up" or "down".')
        thumbs = table[thumbs]
    score = body.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5):
        raise LlmcycleError("score: an integer from 1 to 5.")
    comment = body.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > 10000):
        raise LlmcycleError("comment: text of at most 10000 characters.")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > 256):
        raise LlmcycleError("user: text of at most 256 characters.")
    if thumbs is None and score is None and not comment:
        raise LlmcycleError("give thumbs, a score or a comment.")
    return {"request_id": rid, "thumbs": thumbs, "score": score, "comment": comment, "user": user,
            "positive": positive(thumbs, score)}


class FeedbackStore:
    """Feedback rows in the monitor's database (`target`: its SQLite file or PostgreSQL URL)."""

    def __init__(self, target: LogStore | str | Path) -> None:
        self.store = as_store(target)
        con = self.store.connect()
        try:
            ensure_feedback_schema(self.store, con)
        finally:
            con.close()

    def add(self, fields: dict[str, Any], key_id: str | None = None) -> None:
        """Write one checked feedback (`check_feedback`'s dict)."""
        row = {**fields, "time": time.time(), "key_id": key_id}
        cols = ", ".join(f'"{c}"' for c in NAMES)
        self.store.execute(f"INSERT INTO feedback ({cols}) VALUES ({', '.join('?' * len(NAMES))})",
                           [row.get(c) for c in NAMES])

    def request_exists(self, request_id: str) -> bool:
        return bool(self.store.rows("SELECT 1 AS one FROM requests WHERE request_id = ? LIMIT 1", [request_id]))

    def for_requests(self, since: float = 0.0) -> list[dict[str, Any]]:
        """Every feedback row given since `since`, oldest first."""
        return self.store.rows('SELECT * FROM feedback WHERE "time" >= ? ORDER BY id', [since])
