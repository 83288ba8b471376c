"""Scheduled quality runs: the evaluation suite against each served model, in the server's background, with a
regression verdict on /metrics.

With `quality_every_s` > 0 the server runs `llmcycle eval MODEL_DIR` for each served model (a child process
at low CPU priority, one thread, `quality_limit` items per metric) every that many seconds. The first
result's reference is the model's recorded evaluation (`eval.json` beside the model directory, written by
`llmcycle eval` and `llmcycle run`) when it was made of these very weights, else the first scheduled result;
each later run is gated against it exactly as `llmcycle eval --compare` gates (`eval/cli.py`, `gate`). The
metrics go to /metrics (`llmcycle:quality{model_name, metric}`) with `llmcycle:quality_regression{model_name}`
(1 when the gate fails), and into the request log's `quality` table.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError
from llmcycle.monitor.periodic import Periodic
from llmcycle.monitor.store import LogStore, as_store

log = logging.getLogger(__name__)


def run_eval(model_dir: str | Path, limit: int, heldout: str | None = None, timeout: float = 3600) -> dict:
    """`llmcycle eval` on `model_dir` in a child process at low priority; its eval.json dict."""
    with tempfile.TemporaryDirectory(prefix="llmcycle-quality-") as tmp:
        out = Path(tmp) / "eval.json"
        cmd = [sys.executable, "-m", "llmcycle", "eval", str(model_dir), "--limit", str(limit), "--out", str(out),
               "--no-decontam"] + (["--heldout", heldout] if heldout else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one core: the server keeps the rest
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              preexec_fn=(lambda: os.nice(10)) if hasattr(os, "nice") else None)
        if done.returncode != 0 or not out.exists():
            raise LlmcycleError(f"quality run of {model_dir} failed: {(done.stderr or done.stdout).strip()[-500:]}")
        return json.loads(out.read_text())


def recorded_eval(model_dir: str | Path) -> dict | None:
    """The evaluation recorded beside the model (eval.json) if it was made of these very weights."""
    from llmcycle.eval.cli import default_out
    from llmcycle.eval.suite import model_hash

    path = default_out(model_dir)
    try:
        rec = json.loads(path.read_text())
        return rec if rec.get("model_sha256") == model_hash(model_dir) else None
    except (OSError, ValueError):
        return None


class QualityWatch(Periodic):
    """Runs the evaluation of every model in `models` ({name: directory}) every `every_s` seconds in a
    thread; each result replaces `monitor.quality[name]` ({metrics, reference, failed, time})."""

    def __init__(self, monitor: Any, models: dict[str, str], every_s: float, limit: int = 64,
                 heldout: str | None = None, threshold: float = 0.02, log: LogStore | str | Path | None = None) -> None:
        super().__init__(every_s, "quality")
        self.monitor, self.models = monitor, models
        self.limit, self.heldout, self.threshold = limit, heldout, threshold
        self.log = None if log is None else as_store(log)
        self.reference: dict[str, dict] = {}

    def check(self, name: str) -> dict:
        from llmcycle.eval.cli import gate

        model_dir = self.models[name]
        result = run_eval(model_dir, self.limit, self.heldout)
        metrics = result["metrics"]
        if name not in self.reference:
            recorded = recorded_eval(model_dir)
            self.reference[name] = recorded["metrics"] if recorded else metrics
        failed = gate(self.reference[name], metrics, self.threshold)
        entry = {"time": time.time(), "metrics": metrics, "reference": self.reference[name], "failed": failed,
                 "model_sha256": result.get("model_sha256")}
        self.monitor.quality[name] = entry
        if failed:
            log.warning("quality of %s regressed: %s", name, "; ".join(failed))
        self._store(name, entry)
        return entry

    def _store(self, name: str, entry: dict) -> None:
        if self.log is None:
            return
        try:
            self.log.execute(f'CREATE TABLE IF NOT EXISTS quality ("time" {self.log.column_type("REAL")}, model TEXT, '
                             "model_sha256 TEXT, metrics TEXT, reference TEXT, failed TEXT)")
            self.log.execute("INSERT INTO quality VALUES (?, ?, ?, ?, ?, ?)",
                             (entry["time"], name, entry["model_sha256"], json.dumps(entry["metrics"]),
                              json.dumps(entry["reference"]), json.dumps(entry["failed"])))
        except (*self.log.errors, LlmcycleError) as e:
            log.warning("quality result not stored: %s", e)

    def tick(self) -> None:
        for name in self.models:
            if self.stopping:
                return
            try:
                self.check(name)
            except (LlmcycleError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
                log.warning("quality run of %s failed: %s", name, e)
