"""`ServeConfig`: every option of `llmcycle serve`, with its one default (torch-free).

`llmcycle serve` reads it from a recipe like every other stage (`--config recipes/serve.yaml key=value ...`);
its flags (`--port`, `--kv-cache-mb`, ...) stay, as overrides. The engine's and the server's own defaults
are these values (`LLMEngine`'s keyword defaults, `RequestLimits`), so a default is written once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmcycle.config import field_help as F
from llmcycle.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]

# The options that configure each LLMEngine (and its model runner), as opposed to the HTTP server.
ENGINE_KEYS = ("block_size", "kv_cache_mb", "max_num_seqs", "max_num_batched_tokens", "chunk_size",
               "enable_prefix_caching", "draft_model", "num_speculative_tokens", "dtype", "device")


@dataclass
class ServeConfig:
    # what and where
    models: list[str] = F([], "model directories to serve, each DIR or NAME=DIR (the name defaults to the "
                              "directory's name)")
    registered: list[str] = F([], "registry names to serve (llmcycle registry): NAME follows its production alias "
                                  "or its A/B split, NAME@ALIAS that alias, NAME@N that version; moving an alias "
                                  "switches traffic without a restart (docs/improve.md)")
    registry: str = F("auto", "the registry's database: a SQLite file or postgresql:// URL (auto: the request log's)")
    registry_root: str | None = F(None, "where registered versions are stored (null: registry/ beside a SQLite "
                                        "registry)")
    registry_poll_s: float = F(2.0, "seconds between reads of the registry (alias moves, A/B splits)")
    lora_modules: list[str] = F([], "LoRA adapters (PEFT directories) to serve by name over a served model, each "
                                    "NAME=DIR or a JSON object {\"name\", \"path\", \"base_model_name\"} as in "
                                    "vLLM; a request's model NAME picks the adapter")
    host: str = F("127.0.0.1", "address to listen on")
    port: int = F(8000, "port")
    keys: str | None = F(None, "API key database (llmcycle keys create ...): keys required")
    log_level: str = F("info", "uvicorn log level")
    ssl_certfile: str | None = F(None, "TLS: the server's certificate chain (PEM); with ssl_keyfile it serves https")
    ssl_keyfile: str | None = F(None, "TLS: the certificate's private key (PEM)")
    ssl_keyfile_password: str | None = F(None, "TLS: the private key's password, if it has one")
    ssl_ca_certs: str | None = F(None, "TLS: CA certificates that client certificates must chain to (mutual TLS)")
    # engine (one per served model)
    block_size: int = F(16, "tokens per KV block")
    kv_cache_mb: int = F(256, "KV cache budget per model in MiB")
    max_num_seqs: int = F(64, "sequences per batch")
    max_num_batched_tokens: int = F(2048, "tokens per step")
    chunk_size: int | None = F(None, "prefill chunk length (null: the token budget)")
    enable_prefix_caching: bool = F(True, "reuse the KV blocks of a shared prompt prefix")
    draft_model: str | None = F(None, "a smaller model with the same tokenizer for speculative decoding "
                                      "(all served models)")
    num_speculative_tokens: int = F(4, "draft tokens proposed per step with draft_model")
    dtype: Dtype | None = F(None, "weights and KV dtype (null: as saved)")
    device: str | None = F(None, "cpu, cuda, cuda:1 ... (null: cuda if present, else cpu)")
    threads: int | None = F(None, "torch CPU threads, kept fixed (null: the CPUs this process may use, cgroup quota "
                                  "included, following those other processes leave free)")
    tool_call_parser: Literal["auto", "hermes", "llama3_json"] = F(
        "auto", "how tool calls are found in an answer (vLLM's names): hermes (<tool_call> JSON: Hermes, Qwen, "
                "llmcycle's own template), llama3_json; auto: from each model's chat template")
    # engine replicas on Ray Serve (serve/ray_engine.py)
    ray_replicas: int = F(0, "run each model's engine as this many Ray Serve replicas (0: in this process)")
    ray_autoscaling: dict | None = F(None, "Ray Serve autoscaling instead of a fixed count: {min_replicas, "
                                           "max_replicas, target_ongoing_requests, ...}")
    ray_address: str | None = F(None, "the Ray cluster to join (auto: the one `ray start` made; null: a local one)")
    ray_num_cpus: float = F(1.0, "CPUs Ray reserves per replica")
    # upstream deployments (docs/serve.md, "Routing to other endpoints")
    upstreams: list[dict] = F([], "served names answered by another OpenAI- or Anthropic-compatible endpoint, each "
                                  "{model, provider: openai|anthropic, base_url, api_key_env, upstream_model, "
                                  "timeout_s}; several with one model are its deployments, tried in order")
    fallbacks: dict[str, list[str]] = F({}, "name -> names to try when every deployment of it failed (upstream "
                                            "names or models served here)")
    upstream_cooldown_s: float = F(60.0, "seconds a failing deployment is skipped")
    upstream_allowed_fails: int = F(1, "failures in a row before a deployment cools down")
    # admission and request limits
    max_waiting: int = F(256, "requests allowed to wait; more get 503")
    max_n: int = F(16, "most sequences per prompt (n, best_of); more get 400")
    max_prompts: int = F(128, "most prompts in one completion request")
    max_stop: int = F(16, "most stop strings per request")
    max_body_mb: float = F(4.0, "largest request body in MiB; larger ones get 413")
    drain_timeout: float = F(30.0, "seconds SIGTERM waits for running requests before exiting 2")
    # monitoring (docs/monitor.md)
    request_log: str = F("auto", "one row per request: a SQLite file, or a postgresql:// URL for several servers "
                                 "(pip install 'llmcycle[postgres]'); auto: requests.sqlite beside the keys database, "
                                 "else in $XDG_STATE_HOME/llmcycle (~/.local/state/llmcycle); off: none")
    store_text: bool = F(False, "also log prompts and completions (PII-redacted first)")
    prices: dict[str, dict[str, float]] = F({}, "price per model name (\"*\": any other): {input, cached_input, "
                                                "output} per 1M tokens, or {per_second}")
    log_flush_interval: float = F(1.0, "seconds between request-log writes (what a kill can lose)")
    log_queue_size: int = F(10000, "request-log rows waiting to be written; beyond, rows are dropped and counted")
    log_retention_days: float | None = F(None, "delete request-log rows older than this (null: keep all)")
    safety: list[dict] = F([], "safety checks, each {check: pii|injection|harmful|classifier, where: prompt|"
                                "completion|both, action: log|flag|redact|refuse, ...} (docs/monitor.md)")
    drift_every_s: float = F(300.0, "seconds between drift checks of the last hour against the day before, shown "
                                    "on /metrics (0: off)")
    quality_every_s: float = F(0.0, "seconds between scheduled evaluations of each served model (llmcycle eval, "
                                    "low priority, one core), gated against its recorded eval; 0: off")
    quality_limit: int = F(64, "items per metric in a scheduled evaluation")
    quality_heldout: str | None = F(None, "held-out shards for scheduled evaluations (null: from the model's lineage)")
    otlp_endpoint: str | None = F(None, "OpenTelemetry collector (OTLP/HTTP, e.g. http://localhost:4318): a span "
                                        "per request and the GenAI metrics (pip install 'llmcycle[otel]')")
    audit_requests: bool = F(False, "also chain every request into the audit trail (audit.sqlite beside the keys "
                                    "database, else beside the request log)")

    def validate(self) -> ServeConfig:
        """Raise ConfigError naming the first bad value; returns self."""
        if not self.models and not self.registered and not self.upstreams:
            raise ConfigError("serve: no model to serve; give a model directory (or models: [...] in the recipe, "
                              "or registered: [NAME] for registry names).")
        for key in ("block_size", "kv_cache_mb", "max_num_seqs", "max_num_batched_tokens", "chunk_size",
                    "num_speculative_tokens", "threads", "max_waiting", "max_n", "max_prompts", "max_stop",
                    "max_body_mb", "drain_timeout", "log_flush_interval", "registry_poll_s", "log_queue_size", "log_retention_days"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"serve: {key} must be positive, not {value}.")
        if self.quality_every_s < 0 or self.quality_limit < 1:
            raise ConfigError("serve: quality_every_s must be >= 0 (0: off) and quality_limit >= 1.")
        if self.drift_every_s < 0:
            raise ConfigError(f"serve: drift_every_s must be >= 0 (0: off), not {self.drift_every_s}.")
        if self.upstreams:
            from llmcycle.serve.upstream import Router

            router = Router.from_config(self.upstreams, self.fallbacks, self.upstream_cooldown_s,
                                        self.upstream_allowed_fails)
            unknown = [n for n in self.fallbacks if n not in router.names]
            if unknown:
                raise ConfigError(f"serve: fallbacks for {unknown[0]!r}, which is no upstream name.")
        if self.ray_replicas < 0 or (self.ray_autoscaling is not None and not isinstance(self.ray_autoscaling, dict)):
            raise ConfigError("serve: ray_replicas must be >= 0 and ray_autoscaling a mapping of Ray Serve's "
                              "autoscaling_config.")
        if (self.ray_replicas or self.ray_autoscaling) and self.draft_model:
            raise ConfigError("serve: speculative decoding (draft_model) is not run on Ray replicas yet.")
        if self.upstream_allowed_fails < 1 or self.upstream_cooldown_s < 0:
            raise ConfigError("serve: upstream_allowed_fails must be >= 1 and upstream_cooldown_s >= 0.")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("serve: TLS needs both ssl_certfile and ssl_keyfile.")
        for key in ("ssl_certfile", "ssl_keyfile", "ssl_ca_certs"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise ConfigError(f"serve: {key} {path}: no such file.")
        if self.ssl_ca_certs and not self.ssl_certfile:
            raise ConfigError("serve: ssl_ca_certs (client certificates) needs ssl_certfile and ssl_keyfile.")
        if not 0 <= self.port < 65536:
            raise ConfigError(f"serve: port must be in [0, 65535], not {self.port}.")
        from llmcycle.monitor.pricing import PriceTable
        from llmcycle.monitor.safety import SafetyChecks

        PriceTable(self.prices)  # a bad price table fails here, naming the key
        SafetyChecks(self.safety)  # as does a bad safety check
        return self

    def request_log_path(self) -> Path | str | None:
        """Where the request log goes: a SQLite file, a postgresql:// URL (kept as text), or None (off)."""
        from llmcycle.monitor.store import is_url

        if self.request_log == "off":
            return None
        if is_url(self.request_log):
            return self.request_log
        if self.request_log != "auto":
            return Path(self.request_log)
        if self.keys:
            return Path(self.keys).parent / "requests.sqlite"
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        return Path(state) / "llmcycle" / "requests.sqlite"

    def registry_target(self) -> Path | str:
        """The registry's database: its own setting, else the request log's (which must then be on)."""
        from llmcycle.monitor.store import is_url

        if self.registry != "auto":
            return self.registry if is_url(self.registry) else Path(self.registry)
        target = self.request_log_path()
        if target is None:
            raise ConfigError("serve: registered models need a registry database: set registry, or turn the "
                              "request log on (its database holds the registry by default).")
        return target

    def audit_path(self) -> Path | None:
        """The audit trail: beside the keys database, else beside the request log; None without either."""
        from llmcycle.monitor.audit import audit_path_for

        log = self.request_log_path()
        if self.keys:
            return audit_path_for(self.keys)
        return log.parent / "audit.sqlite" if isinstance(log, Path) else None  # a database URL: no folder

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments of `LLMEngine` (imports torch for the dtype)."""
        import torch

        return dict(block_size=self.block_size, kv_cache_bytes=self.kv_cache_mb * 2**20,
                    max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                    chunk_size=self.chunk_size, enable_prefix_caching=self.enable_prefix_caching,
                    draft_model=self.draft_model, num_speculative_tokens=self.num_speculative_tokens,
                    dtype=getattr(torch, self.dtype) if self.dtype else None, device=self.device)

    @property
    def on_ray(self) -> bool:
        return bool(self.ray_replicas or self.ray_autoscaling)

    def ssl_args(self) -> dict[str, Any]:
        """uvicorn's TLS settings (empty without a certificate); ssl_ca_certs makes client certificates
        required."""
        if not self.ssl_certfile:
            return {}
        import ssl

        return dict(ssl_certfile=self.ssl_certfile, ssl_keyfile=self.ssl_keyfile,
                    ssl_keyfile_password=self.ssl_keyfile_password, ssl_ca_certs=self.ssl_ca_certs,
                    ssl_cert_reqs=ssl.CERT_REQUIRED if self.ssl_ca_certs else ssl.CERT_NONE)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

