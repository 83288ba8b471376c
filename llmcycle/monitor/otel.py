"""OpenTelemetry: every request as a span, and the GenAI server metrics, in OpenTelemetry's GenAI semantic
conventions, so Langfuse, Arize Phoenix, Jaeger or any OTLP collector can take the server's telemetry over.

Optional (`pip install 'llmcycle[otel]'`): `llmcycle serve otlp_endpoint=http://collector:4318` exports
over OTLP/HTTP (traces to `/v1/traces`, metrics to `/v1/metrics`). Each request, when it ends, becomes one
span `"{operation} {model}"` (kind SERVER) from its arrival to its end, with `gen_ai.operation.name`
(`chat` or `text_completion`), `gen_ai.provider.name`, `gen_ai.request.model`, `gen_ai.response.model`,
`gen_ai.response.id`, `gen_ai.response.finish_reasons`, `gen_ai.usage.input_tokens` / `output_tokens`,
`error.type` and the HTTP status; the metrics are the histograms `gen_ai.server.request.duration`,
`gen_ai.server.time_to_first_token`, `gen_ai.server.time_per_output_token` (seconds) and
`gen_ai.client.token.usage` (tokens, by `gen_ai.token.type`).
"""

from __future__ import annotations

from typing import Any

from llmcycle.errors import LlmcycleError

PROVIDER = "llmcycle"
OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}


def _sdk() -> Any:
    try:
        from opentelemetry.sdk import metrics, trace
    except ImportError:
        raise LlmcycleError("otlp_endpoint needs OpenTelemetry: pip install 'llmcycle[otel]'.") from None
    return trace, metrics


class OtelExporter:
    """Turns request-log rows into spans and GenAI metrics. Give `tracer_provider` and `meter_provider`
    (tests pass in-memory ones), or an OTLP/HTTP `endpoint`."""

    def __init__(self, endpoint: str | None = None, tracer_provider: Any = None, meter_provider: Any = None) -> None:
        trace_sdk, metrics_sdk = _sdk()
        from opentelemetry.sdk.resources import Resource

        resource = Resource.create({"service.name": "llmcycle-serve"})
        if tracer_provider is None or meter_provider is None:
            if endpoint is None:
                raise LlmcycleError("OpenTelemetry export needs an endpoint (otlp_endpoint).")
            try:
                from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise LlmcycleError("otlp_endpoint needs the OTLP exporter: pip install 'llmcycle[otel]'.") from None
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            base = endpoint.rstrip("/")
            tracer_provider = trace_sdk.TracerProvider(resource=resource)
            tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
            meter_provider = metrics_sdk.MeterProvider(resource=resource, metric_readers=[
                PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{base}/v1/metrics"))])
        self.tracer_provider, self.meter_provider = tracer_provider, meter_provider
        self.tracer = tracer_provider.get_tracer("llmcycle")
        meter = meter_provider.get_meter("llmcycle")
        self.duration = meter.create_histogram("gen_ai.server.request.duration", unit="s",
                                               description="Generative AI server request duration.")
        self.ttft = meter.create_histogram("gen_ai.server.time_to_first_token", unit="s",
                                           description="Time to generate the first token.")
        self.tpot = meter.create_histogram("gen_ai.server.time_per_output_token", unit="s",
                                           description="Time per output token after the first.")
        self.tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                             description="Input and output tokens used.")

    def record(self, row: dict[str, Any]) -> None:
        """One finished request (a request-log row) as a span and metric points."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        operation = OPERATIONS.get(row.get("route") or "")
        if operation is None:  # /v1/models and the like: not a GenAI operation
            return
        common = {"gen_ai.operation.name": operation, "gen_ai.provider.name": PROVIDER}
        if row.get("model"):
            common["gen_ai.request.model"] = row["model"]
        if row.get("base_model"):
            common["gen_ai.response.model"] = row["base_model"]
        if row.get("error_type"):
            common["error.type"] = row["error_type"]
        attrs = {**common, "http.response.status_code": row["status"]}
        for key, value in (("gen_ai.response.id", row.get("request_id")),
                           ("gen_ai.usage.input_tokens", row.get("prompt_tokens")),
                           ("gen_ai.usage.output_tokens", row.get("completion_tokens")),
                           ("gen_ai.response.finish_reasons", row.get("finish_reasons")),
                           ("llmcycle.key_id", row.get("key_id")), ("llmcycle.cost", row.get("cost"))):
            if value is not None:
                attrs[key] = value
        start = int(row["time"] * 1e9)
        span = self.tracer.start_span(f"{operation} {row.get('model') or ''}".strip(), kind=SpanKind.SERVER,
                                      start_time=start, attributes=attrs)
        if row["status"] >= 400:
            span.set_status(Status(StatusCode.ERROR, row.get("error_type") or str(row["status"])))
        span.end(end_time=start + int((row.get("total_s") or 0.0) * 1e9))
        self.duration.record(row.get("total_s") or 0.0, common)
        if row.get("ttft_s") is not None:
            self.ttft.record(row["ttft_s"], common)
        if row.get("itl_mean_s") is not None:
            self.tpot.record(row["itl_mean_s"], common)
        if row.get("prompt_tokens"):
            self.tokens.record(row["prompt_tokens"], {**common, "gen_ai.token.type": "input"})
        if row.get("completion_tokens"):
            self.tokens.record(row["completion_tokens"], {**common, "gen_ai.token.type": "output"})

    def shutdown(self) -> None:
        """Export what is buffered."""
        for provider in (self.tracer_provider, self.meter_provider):
            provider.shutdown()
