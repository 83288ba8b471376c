"""Prometheus metrics with vLLM's names (`vllm:` -> `llmcycle:`), one label set per served model.

Gauges and the engine's own cumulative counters (prefix-cache queries/hits, preemptions) are read from
`LLMEngine.stats()` when /metrics is scraped, so they can never drift from the engine's state. Token
counters, successes and latency histograms are observed from each request's outputs as they stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from llmcycle.serve.engine import LLMEngine, RequestOutput

# `*_created` timestamps double the output and no dashboard uses them (vLLM turns them off too).
prometheus_client.disable_created_metrics()

# vLLM's buckets (seconds), cut at the top: a CPU engine is slower, not minutes slower.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0)


class _EngineStatsCollector:
    """Reads each engine's gauges/counters at scrape time."""

    def __init__(self, engines: Callable[[], dict[str, LLMEngine]]) -> None:
        self.engines = engines

    def describe(self) -> Iterable[Metric]:
        return []  # unchecked collector: the families depend on the models served

    def collect(self) -> Iterable[Metric]:
        gauges = {
            "num_requests_running": "Number of requests in model execution batches.",
            "num_requests_waiting": "Number of requests waiting to be processed.",
            "kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
        }
        counters = {
            "prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
            "prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
            "num_preemptions": "Cumulative number of preemptions from the engine.",
            "spec_decode_num_drafts": "Number of spec decoding drafts.",
            "spec_decode_num_draft_tokens": "Number of draft tokens.",
            "spec_decode_num_accepted_tokens": "Number of accepted tokens.",
        }
        stats = {name: engine.stats() for name, engine in self.engines().items()}
        for key, doc in gauges.items():
            fam = GaugeMetricFamily(f"llmcycle:{key}", doc, labels=["model_name"])
            for name, s in stats.items():
                if key in s:  # an engine on Ray replicas reports its gauges to Ray (serve/ray_engine.py)
                    fam.add_metric([name], float(s[key]))
            yield fam
        for key, doc in counters.items():
            fam = CounterMetricFamily(f"llmcycle:{key}", doc, labels=["model_name"])
            for name, s in stats.items():
                if key in s:  # spec-decode counters exist only for engines with a draft model
                    fam.add_metric([name], float(s[key]))
            yield fam


class ServerMetrics:
    """All of a server's metrics in its own registry (several servers in one process stay apart)."""

    def __init__(self, engines: Callable[[], dict[str, LLMEngine]]) -> None:
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]
        self.prompt_tokens = Counter("llmcycle:prompt_tokens", "Number of prefill tokens processed.", lbl,
                                     registry=r)
        self.generation_tokens = Counter("llmcycle:generation_tokens", "Number of generation tokens processed.",
                                         lbl, registry=r)
        self.request_success = Counter("llmcycle:request_success", "Count of successfully processed requests.",
                                       lbl + ["finished_reason"], registry=r)
        self.ttft = Histogram("llmcycle:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              lbl, buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("llmcycle:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             lbl, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("llmcycle:e2e_request_latency_seconds",
                             "Histogram of end to end request latency in seconds.", lbl, buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue_time = Histogram("llmcycle:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", lbl,
                                    buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineStatsCollector(engines))
        # Per request and sequence: tokens already counted and the time of the last one (for ITL).
        self._seen: dict[str, tuple[list[int], float | None]] = {}

    def observer(self, model_name: str) -> Callable[[RequestOutput], None]:
        """The `on_output` callback for one model's AsyncLLMEngine."""
        return lambda out: self.observe(model_name, out)

    def observe(self, model: str, out: RequestOutput) -> None:
        counts, last = self._seen.get(out.request_id, ([0] * len(out.outputs), None))
        m = out.metrics
        new = 0
        for c in out.outputs:
            new += len(c.token_ids) - counts[c.index]
            counts[c.index] = len(c.token_ids)
        if last is None and new and m is not None and m.first_token_time is not None:
            # The first output with tokens: the prompt has been prefilled.
            self.prompt_tokens.labels(model).inc(len(out.prompt_token_ids))
            self.ttft.labels(model).observe(m.first_token_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue_time.labels(model).observe(m.first_scheduled_time - m.arrival_time)
        elif new and m is not None and m.last_token_time is not None and last is not None:
            self.itl.labels(model).observe(m.last_token_time - last)
        self.generation_tokens.labels(model).inc(new)
        if out.finished:
            self._seen.pop(out.request_id, None)
            end = m.finished_time if m and m.finished_time else time.monotonic()
            if m is not None:
                self.e2e.labels(model).observe(end - m.arrival_time)
            for c in out.outputs:
                self.request_success.labels(model, c.finish_reason or "abort").inc()
        else:
            self._seen[out.request_id] = (counts, m.last_token_time if m else None)

    def forget(self, request_id: str) -> None:
        """An aborted request sends no final output: drop its bookkeeping."""
        self._seen.pop(request_id, None)
