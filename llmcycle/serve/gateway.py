"""Routing a generation request: to an upstream deployment (`upstream.py`) or to a model served here.

`dispatch` reads the body once, looks at its `model`, and either proxies it (keys, rate limits, the request
log and cost as for local models; fallbacks down the name's chain, which may end at a local model) or
hands it to the local handler, which reads the same bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from llmcycle.monitor.tracker import CLIENT_CLOSED, Trace
from llmcycle.serve import server as srv
from llmcycle.serve.upstream import API_OF, StreamUsage, usage_of

Handler = Callable[[Any, Request, Trace], Awaitable[Response]]


async def dispatch(state: srv.ServerState, request: Request, trace: Trace, api: str, local: Handler) -> Response:
    """Answer a generation request of `api` (chat, completions, messages): an upstream name through its
    deployments and fallbacks, anything else with `local`."""
    router = state.router
    if router is None:
        return await local(state, request, trace)
    srv._require_json(request)
    raw = await srv._read_body(request, state.limits.max_body_bytes)
    request.state.raw_body = raw  # the local handler reads these bytes again
    body = await asyncio.to_thread(srv._loads, raw, state.limits.max_json_depth)  # megabytes: off the loop
    name = body.get("model") if isinstance(body, dict) else None
    if not isinstance(name, str) or (name not in router.names and name not in router.fallbacks):
        return await local(state, request, trace)
    errors: list[str] = []
    for target in [name, *router.fallbacks.get(name, [])]:
        if target not in router.names:  # a model served here ends the chain
            request.state.raw_body = json.dumps({**body, "model": target}).encode()
            return await local(state, request, trace)
        if api not in API_OF[router.provider(target)]:
            if target == name:
                route = "/v1/messages" if api != "messages" else "/v1/chat/completions"
                raise srv.APIError(400, f"`{name}` is an {router.provider(name)} upstream; send it to {route}.",
                                   "model")
            continue
        response = await _proxy(state, request, trace, api, name, target, body, errors)
        if response is not None:
            return response
    last = errors[-1] if errors else ""
    raise srv.APIError(429 if "HTTP 429" in last else 503,
                       f"every deployment of `{name}` failed ({'; '.join(errors[-3:])}).", "model")


async def _proxy(state: srv.ServerState, request: Request, trace: Trace, api: str, name: str, target: str,
                 body: dict, errors: list[str]) -> Response | None:
    """One upstream name's answer; None (its failures added to `errors`) when all its deployments failed."""
    key = srv._authorize(state, request)
    trace.key_id = key.id if key is not None else None
    stream = bool(body.get("stream"))
    trace.model, trace.base_model, trace.stream = name, target, stream
    meta = body.get("metadata")
    user = body.get("user") or (meta.get("user_id") if isinstance(meta, dict) else None)
    trace.user = user if isinstance(user, str) else None
    strip_usage = False
    if stream and api != "messages" and not (body.get("stream_options") or {}).get("include_usage"):
        # ask for the usage chunk (the request log and cost need it); the client, who did not, won't see it
        body, strip_usage = {**body, "stream_options": {"include_usage": True}}, True
    answer, failed = await state.router.send(target, api, body, stream)
    errors.extend(f"{a.deployment.label}: {a.error}" for a in failed)
    if answer.response is None:
        return None
    trace.variant = answer.deployment.label  # which deployment answered
    response = answer.response

    def settle(prompt: int, completion: int) -> None:
        trace.upstream_usage = (prompt, completion)
        if key is not None:
            state.limiter.record_tokens(key.id, prompt + completion, key.tokens_per_minute)

    if not stream or response.status_code != 200:
        content = await response.aread()
        await response.aclose()
        try:
            usage = usage_of(api, json.loads(content))
        except ValueError:
            usage = None
        if usage is not None:
            settle(*usage)
        return Response(content, status_code=response.status_code,
                        media_type=response.headers.get("content-type", "application/json"))
    usage = StreamUsage(api)

    async def events() -> AsyncIterator[bytes]:
        status, error_type = CLIENT_CLOSED, "ClientDisconnected"
        try:
            async for event in _events(response, usage, strip_usage):
                yield event
            status, error_type = 200, None
        finally:
            await response.aclose()
            settle(usage.prompt, usage.completion)
            trace.end(status, error_type)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                             background=BackgroundTask(trace.end, CLIENT_CLOSED, "ClientDisconnected"))


async def _events(response: Any, usage: StreamUsage, strip_usage: bool) -> AsyncIterator[bytes]:
    """The upstream's server-sent events one by one, usage noted; with `strip_usage`, OpenAI's usage-only
    chunk (no choices) is kept from the client."""
    buffer = b""
    async for chunk in response.aiter_bytes():  # decoded: the content-encoding is not passed on
        buffer += chunk.replace(b"\r\n", b"\n")
        *complete, buffer = buffer.split(b"\n\n")
        for event in complete:
            usage.feed(event + b"\n")
            if strip_usage and b'"usage"' in event and b'"choices": []' in event.replace(b'"choices":[]',
                                                                                          b'"choices": []'):
                continue
            yield event + b"\n\n"
    if buffer.strip():
        usage.feed(buffer + b"\n")
        yield buffer
