"""Upstream deployments: served model names answered by another OpenAI- or Anthropic-compatible endpoint.

One gateway fronts self-hosted and cloud models with the same keys, limits, request log, cost and
fallbacks, with LiteLLM's semantics:

- a served name may have several deployments (`upstreams` entries with the same `model`): a request goes to
  the first one not cooling down, in the order given; a 429, a 5xx, a timeout or a refused connection sends
  it on to the next;
- a deployment that failed `allowed_fails` times in a row cools down for `cooldown_s` seconds (skipped
  while another is available);
- when every deployment of a name failed, its `fallbacks` are tried in turn: other upstream names or
  models served here;
- other errors (400, 401, 404, ...) are the upstream's answer to this request and go back to the client
  as they came, in the API's own shape.

An upstream answers the API it speaks (`provider: openai`: /v1/chat/completions and /v1/completions;
`anthropic`: /v1/messages); the request body goes on as the client sent it, with `model` replaced by
`upstream_model`. The key comes from the environment (`api_key_env`), never from the recipe. Usage comes
from the upstream's answer (a stream's usage events too) for the request log and the price table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from llmcycle.errors import ConfigError

API_OF = {"openai": ("chat", "completions"), "anthropic": ("messages",)}
PATHS = {"chat": "/chat/completions", "completions": "/completions", "messages": "/messages"}
RETRYABLE = frozenset({408, 409, 429, 500, 502, 503, 504, 529})


@dataclass
class Deployment:
    """One endpoint that answers a served name."""

    model: str  # the served name
    provider: Literal["openai", "anthropic"]
    base_url: str  # up to the API version: https://api.openai.com/v1, https://api.anthropic.com/v1
    api_key_env: str | None = None  # the environment variable holding its key
    upstream_model: str | None = None  # the model's name there (default: the served name)
    timeout_s: float = 60.0
    fails: int = 0  # consecutive failures
    cool_until: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> Deployment:
        known = {"model", "provider", "base_url", "api_key_env", "upstream_model", "timeout_s"}
        if not isinstance(d, dict) or set(d) - known or not {"model", "provider", "base_url"} <= set(d):
            raise ConfigError(f"serve: an upstream is {{model, provider, base_url, api_key_env, upstream_model, "
                              f"timeout_s}} with the first three required, got {d!r}.")
        if d["provider"] not in API_OF:
            raise ConfigError(f"serve: upstream provider must be openai or anthropic, not {d['provider']!r}.")
        if not str(d["base_url"]).startswith(("http://", "https://")):
            raise ConfigError(f"serve: upstream base_url {d['base_url']!r} is not an http(s) URL.")
        return cls(**{k: d[k] for k in known if k in d})

    @property
    def label(self) -> str:
        return f"{self.provider}:{self.base_url}"

    def headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if self.provider == "anthropic":
            return {"x-api-key": key, "anthropic-version": "2023-06-01"} if key else {"anthropic-version": "2023-06-01"}
        return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class Attempt:
    """What an upstream call came to: a response to pass on (`response`, open when streaming), or a failure."""

    deployment: Deployment
    response: httpx.Response | None = None
    error: str | None = None


@dataclass
class Router:
    """The upstream names and their deployments, fallbacks and cool-downs."""

    deployments: list[Deployment]
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    cooldown_s: float = 60.0
    allowed_fails: int = 1

    def __post_init__(self) -> None:
        self._client: httpx.AsyncClient | None = None  # made in the server's event loop, at the first request

    @classmethod
    def from_config(cls, upstreams: list[dict], fallbacks: dict[str, list[str]], cooldown_s: float,
                    allowed_fails: int) -> Router | None:
        if not upstreams:
            return None
        return cls([Deployment.from_dict(d) for d in upstreams], dict(fallbacks), cooldown_s, allowed_fails)

    @property
    def names(self) -> set[str]:
        return {d.model for d in self.deployments}

    def provider(self, name: str) -> str:
        return next(d.provider for d in self.deployments if d.model == name)

    def candidates(self, name: str) -> list[Deployment]:
        """The deployments of `name` in the order to try: those not cooling down first (config order)."""
        group = [d for d in self.deployments if d.model == name]
        now = time.monotonic()
        return [d for d in group if d.cool_until <= now] + [d for d in group if d.cool_until > now]

    def _failed(self, d: Deployment) -> None:
        d.fails += 1
        if d.fails >= self.allowed_fails:
            d.cool_until, d.fails = time.monotonic() + self.cooldown_s, 0

    async def send(self, name: str, api: str, body: dict, stream: bool) -> tuple[Attempt, list[Attempt]]:
        """Try the deployments of `name` until one answers; (the answer, the failed attempts before it). The
        answer's `response` is None when every deployment failed."""
        failed: list[Attempt] = []
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=None)
        for d in self.candidates(name):
            url = d.base_url.rstrip("/") + PATHS[api]
            payload = {**body, "model": d.upstream_model or d.model}
            try:
                request = self._client.build_request("POST", url, json=payload, headers=d.headers(),
                                                    timeout=httpx.Timeout(d.timeout_s))
                response = await self._client.send(request, stream=stream)
            except httpx.HTTPError as exc:
                self._failed(d)
                failed.append(Attempt(d, error=f"{type(exc).__name__}: {exc}"))
                continue
            if response.status_code in RETRYABLE:
                body_text = (await response.aread()).decode("utf-8", "replace")[:300]
                await response.aclose()
                self._failed(d)
                failed.append(Attempt(d, error=f"HTTP {response.status_code}: {body_text}"))
                continue
            d.fails = 0
            return Attempt(d, response), failed
        return Attempt(failed[-1].deployment if failed else self.deployments[0]), failed

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def usage_of(api: str, body: Any) -> tuple[int, int] | None:
    """(prompt tokens, completion tokens) from an answer's `usage` (OpenAI's or Anthropic's names)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return None
    if api == "messages":
        return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


class StreamUsage:
    """Reads usage off a passing server-sent-event stream: OpenAI's last usage chunk, Anthropic's
    message_start (input) and message_delta (output) events."""

    def __init__(self, api: str) -> None:
        self.api, self.prompt, self.completion, self.seen = api, 0, 0, False
        self._buffer = b""

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            if self.api == "messages":
                usage = (event.get("message") or {}).get("usage") or event.get("usage")
                if isinstance(usage, dict):
                    self.seen = True
                    self.prompt = int(usage.get("input_tokens") or self.prompt)
                    self.completion = int(usage.get("output_tokens") or self.completion)
            elif isinstance(event.get("usage"), dict):
                self.seen = True
                self.prompt, self.completion = usage_of(self.api, event) or (0, 0)

