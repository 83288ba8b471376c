"""What `/dashboard` shows: the request log of the last window summed up, the server's resources over time
(sampled in the server), the engines' live state, the safety checks that fired and drift.

`summary(log_path, window_s)` reads the log (SQLite, WAL: the server keeps writing meanwhile); the server
adds `resources` (a `ResourceSampler`'s ring buffer) and the engines' gauges. The page itself is
llmcycle/serve/static/dashboard.html, which fetches `/dashboard/data` every few seconds.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

from llmcycle import memory
from llmcycle.monitor.periodic import Periodic
from llmcycle.monitor.store import LogStore, as_store
from llmcycle.monitor.usage import COLUMNS, by_group


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summary(log_path: LogStore | str | Path, window_s: float = 3600.0, now: float | None = None) -> dict[str, Any]:
    """The last `window_s` seconds of the request log: totals, latency percentiles, errors by type, usage by
    key and model, requests per minute, safety triggers by check, and drift against the day before."""
    from llmcycle.monitor import drift

    now = time.time() if now is None else now
    store = as_store(log_path)
    rows = store.rows(f'SELECT {", ".join(COLUMNS)}, error_type, safety FROM requests WHERE "time" >= ? '
                      'ORDER BY "time"', (now - window_s,))
    ok = [r for r in rows if r["status"] < 400]
    totals = {"requests": len(rows), "errors": len(rows) - len(ok),
              "error_rate": (len(rows) - len(ok)) / len(rows) if rows else 0.0,
              "requests_per_s": len(rows) / window_s,
              "prompt_tokens": sum(r["prompt_tokens"] or 0 for r in rows),
              "completion_tokens": sum(r["completion_tokens"] or 0 for r in rows),
              "cost": round(sum(r["cost"] or 0.0 for r in rows), 10)}
    latency = [r["total_s"] for r in ok if r["total_s"] is not None]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    minutes: dict[int, dict] = {}
    for r in rows:
        m = minutes.setdefault(int(r["time"] // 60) * 60, {"t": int(r["time"] // 60) * 60, "requests": 0,
                                                            "errors": 0, "tokens": 0})
        m["requests"] += 1
        m["errors"] += r["status"] >= 400
        m["tokens"] += (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
    safety = Counter()
    for r in rows:
        for t in json.loads(r["safety"]) if r["safety"] else []:
            safety[f"{t['check']} ({t['where']}, {t['action']})"] += 1
    return {
        "window_s": window_s, "now": now, "totals": totals,
        "latency": {"p50_s": _pct(latency, 0.5), "p95_s": _pct(latency, 0.95), "p99_s": _pct(latency, 0.99),
                    "ttft_p50_s": _pct(ttft, 0.5), "ttft_p95_s": _pct(ttft, 0.95),
                    "mean_s": statistics.fmean(latency) if latency else None},
        "errors_by_type": dict(Counter(r["error_type"] or f"HTTP {r['status']}" for r in rows if r["status"] >= 400)),
        "by_key": [{**g, "key": g["key"] or "(no key)"} for g in by_group(rows, "key")],
        "by_model": [{**g, "model": g["model"] or "(none)"} for g in by_group(rows, "model")],
        "per_minute": [minutes[k] for k in sorted(minutes)],
        "safety": dict(safety),
        "drift": drift.compare(drift.log_window(store, window_s / 86400 + 1, window_s / 86400, now),
                               drift.log_window(store, window_s / 86400, 0, now)),
    }


class ResourceSampler(Periodic):
    """This process's resident memory, CPU use (of one core = 100%) and, with CUDA, GPU memory, every
    `every_s` seconds in a thread; the last `keep` samples."""

    def __init__(self, every_s: float = 5.0, keep: int = 720) -> None:
        super().__init__(every_s, "resources")
        self.samples: deque[dict] = deque(maxlen=keep)
        self._last = (time.monotonic(), _cpu_seconds())

    def start(self) -> ResourceSampler:
        self.sample()
        super().start()
        return self

    def tick(self) -> None:
        self.sample()

    def sample(self) -> dict:
        now, cpu = time.monotonic(), _cpu_seconds()
        then, cpu_then = self._last
        self._last = (now, cpu)
        s = {"t": time.time(), "rss_mb": memory.rss_mb(),
             "cpu_percent": 100.0 * (cpu - cpu_then) / (now - then) if now > then else 0.0}
        gpu = _gpu_mb()
        if gpu is not None:
            s["gpu_mb"] = gpu
        self.samples.append(s)
        return s


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _gpu_mb() -> float | None:
    import sys

    torch = sys.modules.get("torch")  # the server has it loaded; never import it here for this
    if torch is None or not torch.cuda.is_available():
        return None
    return torch.cuda.memory_allocated() / 2**20
