"""The server's one monitoring hook: `RequestMonitor.begin(route)` when a request arrives, and the `Trace`
it returns filled in as the request goes and ended exactly once, whatever happens: an answer, a 4xx before
the engine saw it, an error mid-stream, or the client leaving (499).

Ending a trace turns it into one request-log row (monitor/request_log.py), with the latency breakdown from
the engine's `RequestMetrics`, the cost from the price table (monitor/pricing.py), and the request's
counters on /metrics. Streamed and non-streamed requests are counted from the same engine outputs, so a
stream's tokens and cost are recorded whether or not the client asked for `stream_options.include_usage`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmcycle.monitor.budgets import Budgets, Reservation
from llmcycle.monitor.pricing import PriceTable
from llmcycle.monitor.request_log import RequestLog
from llmcycle.monitor.safety import SafetyChecks, Trigger

if TYPE_CHECKING:
    from llmcycle.serve.auth import KeyRecord
    from llmcycle.serve.output_processor import RequestOutput

CLIENT_CLOSED = 499  # nginx's "client closed request": the client left before the answer was whole


def model_version(model_dir: str | Path) -> str | None:
    """A served directory's version: the first 16 hex digits of its manifest's sha256 (the manifest
    hashes every file of the model, so equal versions are equal models), or None without a manifest."""
    manifest = Path(model_dir) / "manifest.json"
    try:
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    except OSError:
        return None


class Trace:
    """One request as the monitor sees it. Handlers set the fields they learn; `end()` records it once."""

    def __init__(self, monitor: RequestMonitor, route: str) -> None:
        self.monitor, self.route = monitor, route
        self.time, self.start = time.time(), time.monotonic()
        self.request_id: str | None = None
        self.key_id: str | None = None
        self.model: str | None = None
        self.base_model: str | None = None
        self.adapter: str | None = None
        self.variant: str | None = None  # the registry version that answered (A/B tests)
        self.on_end: list[Callable[[], None]] = []  # called once when the request ends (a held version let go)
        self.stream = False
        self.user: str | None = None
        self.metadata: dict | None = None
        self.prompt_text: str | None = None
        self.messages: list[dict] | None = None  # a chat request's messages (logged with store_text)
        self.prompt_lens: list[int] = []
        self.outputs: dict[int, RequestOutput] = {}  # the latest output of each prompt
        # (prompt, completion) tokens an upstream deployment reported (serve/gateway.py): no engine output
        self.upstream_usage: tuple[int, int] | None = None
        self.reservation: Reservation | None = None  # what the key's budget holds for this request
        self.safety: list[Trigger] = []  # the safety checks that fired on its prompt or completion
        self.ended = False

    def end(self, status: int, error_type: str | None = None) -> dict | None:
        """Record the request (the first call only); returns the row, or None when already ended."""
        if self.ended:
            return None
        self.ended = True
        for release in self.on_end:
            release()
        return self.monitor.record(self, status, error_type)


class RequestMonitor:
    """Request log + prices + the request counters of /metrics, for one server."""

    def __init__(self, log: RequestLog | None, prices: PriceTable | None = None, store_text: bool = False,
                 registry: CollectorRegistry | None = None, versions: dict[str, str | None] | None = None,
                 safety: SafetyChecks | None = None, otel: Any = None) -> None:
        self.log, self.prices, self.store_text = log, prices or PriceTable(None), store_text
        self.otel = otel  # an OtelExporter (monitor/otel.py) when an OTLP endpoint is configured
        self.safety = safety or SafetyChecks(None)
        self.versions = versions or {}
        self.budgets = Budgets(None if log is None else log.store)
        self._redact: Callable[[str], str] | None = None
        if store_text:
            from llmcycle.data.filters.pii import Pii

            pii = Pii()
            self._redact = lambda text: pii.redact(text)[0]
        registry = registry or CollectorRegistry()
        self.requests = Counter("llmcycle:requests", "Requests answered, by route and HTTP status.",
                                ["model_name", "route", "status"], registry=registry)
        self.cost = Counter("llmcycle:request_cost", "Cost of the requests answered, in the price table's "
                            "currency.", ["model_name"], registry=registry)
        self.safety_triggers = Counter("llmcycle:safety_triggers", "Safety checks that fired, by check, where "
                                       "and action.", ["check", "where", "action"], registry=registry)
        # request id -> key id of the last answers: feedback on them is accepted before the log writes them
        self.recent: collections.OrderedDict[str, str | None] = collections.OrderedDict()
        self.drift: list[dict] = []  # the last drift results (DriftWatch), as gauges on /metrics
        self.quality: dict[str, dict] = {}  # the last quality run per model (QualityWatch)
        registry.register(_MonitorCollector(self))

    def request_owner(self, request_id: str) -> tuple[str, str | None] | None:
        """(request id, key id) of an answered request, from the ones answered lately or the log; None if
        unknown. (Blocking when it reads the log: call it off the event loop.)"""
        if request_id in self.recent:
            return request_id, self.recent[request_id]
        if self.log is None:
            return None
        try:
            rows = self.log.store.rows("SELECT key_id FROM requests WHERE request_id = ? LIMIT 1", [request_id])
        except self.log.store.errors:
            return None
        return (request_id, rows[0]["key_id"]) if rows else None

    def begin(self, route: str) -> Trace:
        return Trace(self, route)

    def admit(self, trace: Trace, key: KeyRecord | None, prompt_tokens: int, max_new_tokens: int) -> None:
        """Before dispatch: reserve the request's most expensive outcome against its key's budget. Raises
        BudgetExceeded (the server answers 429). Models without a token price reserve nothing."""
        if key is None or key.budget is None or trace.model is None:
            return
        estimate = self.prices.cost(trace.model, prompt_tokens, 0, max_new_tokens, 0.0)
        if estimate is not None:
            trace.reservation = self.budgets.reserve(key, estimate)

    def record(self, trace: Trace, status: int, error_type: str | None) -> dict:
        end = time.monotonic()
        outs = [trace.outputs[i] for i in sorted(trace.outputs)]
        # tokens the engine processed: prompts that produced output (a refused or abandoned request
        # costs none, and the log then agrees with /metrics' token counters)
        prompt = sum(trace.prompt_lens[i] for i in trace.outputs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        if trace.upstream_usage is not None:
            prompt, completion = trace.upstream_usage
        cached = sum(o.metrics.num_cached_tokens for o in outs if o.metrics)
        finishes = [c.finish_reason or "abort" for o in outs for c in o.outputs]
        total = end - trace.start
        row: dict[str, Any] = {
            "time": trace.time, "request_id": trace.request_id, "key_id": trace.key_id, "route": trace.route,
            "model": trace.model, "base_model": trace.base_model, "adapter": trace.adapter,
            "variant": trace.variant, "model_version": self.versions.get(trace.base_model or ""), "status": status,
            "error_type": error_type, "stream": trace.stream, "num_prompts": len(trace.prompt_lens) or None,
            "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion,
            "total_s": total, "finish_reason": finishes[0] if finishes else None,
            "finish_reasons": finishes or None, "user": trace.user, "metadata": trace.metadata,
            **_latencies(outs, trace.start), "output_perplexity": _perplexity(outs),
        }
        if trace.safety:
            row["safety"] = [dataclasses.asdict(t) for t in trace.safety]
            for t in trace.safety:
                self.safety_triggers.labels(t.check, t.where, t.action).inc()
        if trace.model is not None and (outs or trace.upstream_usage is not None):
            row["cost"] = self.prices.cost(trace.model, prompt, cached, completion, total)
        if trace.prompt_text is not None:
            row["_prompt_text"] = trace.prompt_text  # the log's writer finds its language, then drops it
        if self._redact is not None:
            if trace.prompt_text is not None:
                row["prompt"] = self._redact(trace.prompt_text)
            if trace.messages is not None:  # a chat's turns as sent, for `llmcycle feedback export`
                row["messages"] = [{**m, "content": self._redact(m["content"])} for m in trace.messages]
            texts = [c.text for o in outs for c in o.outputs]
            row["completion"] = self._redact(texts[0] if len(texts) == 1 else "\n\n".join(texts)) if texts else None
        # only served names become label values: a client naming models at random must not grow /metrics
        model_label = trace.model if trace.base_model is not None else ""
        self.requests.labels(model_label, trace.route, str(status)).inc()
        if row.get("cost"):
            self.cost.labels(model_label).inc(row["cost"])
        if trace.reservation is not None:
            self.budgets.settle(trace.reservation, row.get("cost"))
        if self.otel is not None:
            self.otel.record(row)
        if trace.request_id is not None:
            self.recent[trace.request_id] = trace.key_id
            if len(self.recent) > 10000:
                self.recent.popitem(last=False)
        if self.log is not None:
            self.log.submit(row)
        return row

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
        if self.otel is not None:
            self.otel.shutdown()


def _perplexity(outs: list[RequestOutput]) -> float | None:
    """exp(-mean logprob) of every generated token under the served model (before penalties and
    temperature): a cheap per-request quality signal. None when some token was not scored."""
    seqs = [c for o in outs for c in o.outputs if c.token_ids]
    if not seqs or any(c.cumulative_logprob is None for c in seqs):
        return None
    n = sum(len(c.token_ids) for c in seqs)
    return math.exp(min(700.0, -sum(c.cumulative_logprob for c in seqs) / n))


def _latencies(outs: list[RequestOutput], start: float) -> dict[str, float | None]:
    """Queue time (engine arrival -> first scheduled, the longest over the prompts), time to first token
    from the server's arrival, and the mean gap between output tokens over every sequence."""
    ms = [o.metrics for o in outs if o.metrics is not None]
    queued = [m.first_scheduled_time - m.arrival_time for m in ms if m.first_scheduled_time is not None]
    firsts = [m.first_token_time for m in ms if m.first_token_time is not None]
    gaps, spans = 0, 0.0
    for o in outs:
        m = o.metrics
        n = max((len(c.token_ids) for c in o.outputs), default=0)
        if m is not None and m.first_token_time is not None and m.last_token_time is not None and n > 1:
            spans += m.last_token_time - m.first_token_time
            gaps += n - 1
    return {"queue_s": max(queued) if queued else None, "ttft_s": min(firsts) - start if firsts else None,
            "itl_mean_s": spans / gaps if gaps else None}


class _MonitorCollector:
    """What the monitor knows, read at scrape time: the request log's counters, each key's budget use, and
    the last drift check."""

    def __init__(self, monitor: RequestMonitor) -> None:
        self.monitor = monitor

    def describe(self) -> list:
        return []

    def collect(self):
        used = GaugeMetricFamily("llmcycle:key_budget_used_ratio", "Spend this period over the key's budget.",
                                 labels=["key_id"])
        for key_id, ratio in self.monitor.budgets.used().items():
            used.add_metric([key_id], ratio)
        yield used
        quality = GaugeMetricFamily("llmcycle:quality", "The last scheduled evaluation's metrics.",
                                    labels=["model_name", "metric"])
        regression = GaugeMetricFamily("llmcycle:quality_regression", "1 when the last scheduled evaluation "
                                       "failed the gate against the model's reference.", labels=["model_name"])
        for name, q in self.monitor.quality.items():
            for metric, value in q["metrics"].items():
                if isinstance(value, (int, float)):
                    quality.add_metric([name, metric], float(value))
            regression.add_metric([name], float(bool(q["failed"])))
        yield quality
        yield regression
        detected = GaugeMetricFamily("llmcycle:drift_detected", "1 when the feature drifted at the last check.",
                                     labels=["feature"])
        value = GaugeMetricFamily("llmcycle:drift_value", "The last drift check's statistic per feature.",
                                  labels=["feature", "method"])
        for r in self.monitor.drift:
            detected.add_metric([r["feature"]], float(r["drift"]))
            value.add_metric([r["feature"], r["method"]], float(r["value"]))
        yield detected
        yield value
        log = self.monitor.log
        if log is None:
            return
        for name, doc, value in (("request_log_rows_written", "Request-log rows committed.", log.written),
                                 ("request_log_rows_dropped", "Request-log rows dropped: the queue was full "
                                  "(the disk slower than the traffic).", log.dropped),
                                 ("request_log_rows_failed", "Request-log rows lost to a database error.",
                                  log.failed)):
            yield CounterMetricFamily(f"llmcycle:{name}", doc, value=value)
