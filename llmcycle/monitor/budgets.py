"""Budgets per API key: spend allowed per day, month (UTC calendar) or in total.

Before a request is dispatched the server reserves its most expensive outcome (`estimate`: every prompt
token uncached and every sequence running to `max_tokens`, at the model's token prices); the request is
refused with 429 when what the key has spent this period plus what its requests in flight have reserved
plus this estimate would pass the budget. When the request ends the reservation is replaced by the actual
cost. Reservation is one check-and-add under a lock, so no number of concurrent requests can overspend.
Per-second prices are not known beforehand and are settled afterwards only: a key priced per second can
pass its budget by what its requests in flight cost.

What a key has spent is read from the request log at the first request of each period (so a restarted
server remembers), then kept in memory. Without a request log it is counted from the server's start.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from llmcycle.errors import LlmcycleError
from llmcycle.monitor.store import LogStore, as_store

if TYPE_CHECKING:
    from llmcycle.serve.auth import KeyRecord


def period_start(period: str, now: float) -> float:
    """Unix time at which the budget period holding `now` began (UTC)."""
    if period == "total":
        return 0.0
    t = datetime.fromtimestamp(now, timezone.utc)
    start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
    return start.timestamp()


@dataclass
class Reservation:
    key_id: str
    amount: float
    period_start: float


class BudgetExceeded(Exception):
    """The request would pass its key's budget; the message says by how much and when it resets."""


class Budgets:
    """Spent and reserved amounts per key (see the module docstring)."""

    def __init__(self, log: LogStore | str | Path | None) -> None:
        self.log = None if log is None else as_store(log)
        self._lock = threading.Lock()
        self._spent: dict[str, tuple[float, float]] = {}  # key id -> (period start, spent)
        self._reserved: dict[str, float] = {}
        self._budget: dict[str, float] = {}  # the budget of each key seen, for `used()`

    def _spent_now(self, key: KeyRecord, start: float) -> float:
        cached = self._spent.get(key.id)
        if cached is not None and cached[0] == start:
            return cached[1]
        spent = 0.0
        if self.log is not None and self.log.exists():
            try:
                rows = self.log.rows('SELECT SUM(cost) AS spent FROM requests WHERE key_id = ? AND "time" >= ?',
                                     (key.id, start))
                spent = float(rows[0]["spent"] or 0.0)
            except (*self.log.errors, LlmcycleError):
                spent = 0.0
        self._spent[key.id] = (start, spent)
        return spent

    def reserve(self, key: KeyRecord, estimate: float, now: float | None = None) -> Reservation | None:
        """Reserve `estimate` for a request of `key`; None when the key has no budget. Raises
        BudgetExceeded when the budget cannot hold it."""
        if key.budget is None:
            return None
        now = time.time() if now is None else now
        start = period_start(key.budget_period or "month", now)
        with self._lock:
            self._budget[key.id] = key.budget
            spent = self._spent_now(key, start)
            reserved = self._reserved.get(key.id, 0.0)
            if spent + reserved + estimate > key.budget:
                resets = "" if key.budget_period == "total" else (
                    f"; it resets at the start of the next {key.budget_period} (UTC)")
                raise BudgetExceeded(
                    f"Budget exhausted for key {key.prefix}...: {spent:.6g} spent and {reserved:.6g} reserved by "
                    f"requests in flight of {key.budget:g} per {key.budget_period}; this request could cost "
                    f"up to {estimate:.6g} (its prompt and every sequence at max_tokens, reserved in full: a "
                    f"smaller max_tokens reserves less){resets}.")
            self._reserved[key.id] = reserved + estimate
        return Reservation(key.id, estimate, start)

    def settle(self, reservation: Reservation, cost: float | None) -> None:
        """The request ended: release its reservation and count what it cost."""
        with self._lock:
            self._reserved[reservation.key_id] = max(0.0, self._reserved.get(reservation.key_id, 0.0)
                                                     - reservation.amount)
            start, spent = self._spent.get(reservation.key_id, (reservation.period_start, 0.0))
            if start == reservation.period_start:
                self._spent[reservation.key_id] = (start, spent + (cost or 0.0))

    def used(self) -> dict[str, float]:
        """Spent this period over the budget, per key seen since the server started (for /metrics)."""
        with self._lock:
            return {k: (self._spent.get(k, (0.0, 0.0))[1] / b if b > 0 else 1.0) for k, b in self._budget.items()}
