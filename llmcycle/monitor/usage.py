"""Usage per group of request-log rows: what `llmcycle monitor usage` prints and `/dashboard` tabulates."""

from __future__ import annotations

import statistics
import time
from typing import Any

# How a row's group is found: a column, or the day or hour of its time (UTC), computed here rather than in
# SQL so that SQLite and PostgreSQL logs group alike.
GROUPS = {
    "key": lambda r: r["key_id"],
    "model": lambda r: r["model"],
    "route": lambda r: r["route"],
    "day": lambda r: time.strftime("%Y-%m-%d", time.gmtime(r["time"])),
    "hour": lambda r: time.strftime("%Y-%m-%d %H:00", time.gmtime(r["time"])),
    "user": lambda r: r["user"],
    "status": lambda r: r["status"],
}
# the columns `by_group` reads, for the queries that feed it
COLUMNS = ('"time"', "key_id", "model", "route", '"user"', "status", "prompt_tokens", "cached_tokens",
           "completion_tokens", "cost", "total_s", "ttft_s")


def by_group(rows: list[dict], by: str) -> list[dict[str, Any]]:
    """One dict per group (keyed `by`), busiest first: requests, errors (status >= 400), prompt, cached and
    completion tokens, cost (None when no row has one), median and p95 request time, mean time to first token."""
    groups: dict[Any, list] = {}
    for r in rows:
        groups.setdefault(GROUPS[by](r), []).append(r)
    out = []
    for grp, rs in groups.items():
        totals = sorted(r["total_s"] for r in rs if r["total_s"] is not None)
        ttfts = [r["ttft_s"] for r in rs if r["ttft_s"] is not None]
        costs = [r["cost"] for r in rs if r["cost"] is not None]
        out.append({
            by: grp, "requests": len(rs), "errors": sum(1 for r in rs if (r["status"] or 0) >= 400),
            "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rs),
            "cached_tokens": sum(r["cached_tokens"] or 0 for r in rs),
            "completion_tokens": sum(r["completion_tokens"] or 0 for r in rs),
            "cost": sum(costs) if costs else None,
            "latency_p50_s": statistics.median(totals) if totals else None,
            "latency_p95_s": totals[min(len(totals) - 1, int(0.95 * len(totals)))] if totals else None,
            "ttft_mean_s": statistics.fmean(ttfts) if ttfts else None,
        })
    out.sort(key=lambda d: (-d["requests"], str(d[by])))
    return out
