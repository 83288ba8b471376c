"""The OpenAI-compatible HTTP server: FastAPI routes over one `AsyncLLMEngine` per served model.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models (API key required when keys are
configured), GET /health, GET /metrics (Prometheus), GET / (a small streaming chat page).
Errors use OpenAI's JSON shape `{"error": {"message", "type", "param", "code"}}`: 400 malformed JSON or
a bad value (NaN, a lone surrogate, deep nesting, over a `RequestLimits` bound, a prompt longer than the
context: code "context_length_exceeded"), 401 no valid key, 404 unknown model or route, 405 wrong method,
413 body too large, 415 not `application/json`, 422 a body that does not fit the schema, 429 over a key's
rate limit (with Retry-After), 503 queue full or draining, 500 an internal error (the server goes on
serving). Streams are server-sent events ending in `data: [DONE]`.

No client value reaches an engine unchecked: bodies are bounded and parsed strictly here, settings are
checked by the schema and `SamplingParams.validate`, and prompts are tokenized off the event loop, so one
hostile request cannot stall the other clients or fail the batch they share.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import uvicorn
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmcycle.errors import LlmcycleError
from llmcycle.improve.feedback import FeedbackStore, check_feedback
from llmcycle.monitor.audit import AuditLog
from llmcycle.monitor.budgets import BudgetExceeded
from llmcycle.monitor.dashboard import ResourceSampler, summary
from llmcycle.monitor.drift import DriftWatch
from llmcycle.monitor.pricing import PriceTable
from llmcycle.monitor.quality import QualityWatch
from llmcycle.monitor.request_log import RequestLog
from llmcycle.monitor.safety import SafetyChecks, SafetyRefusal
from llmcycle.monitor.tracker import CLIENT_CLOSED, RequestMonitor, Trace, model_version
from llmcycle.paths import check_model_dir
from llmcycle.serve.async_engine import AsyncLLMEngine, EngineStepError, EngineUnavailable, QueueFull
from llmcycle.serve.auth import KeyRecord, KeyStore, RateLimiter
from llmcycle.serve.config import ServeConfig
from llmcycle.serve.guided import StructuredOutputsParams
from llmcycle.serve.metrics import ServerMetrics
from llmcycle.serve.output_processor import CompletionOutput, RequestOutput
from llmcycle.serve.pooling import Pooler, is_reward_model
from llmcycle.serve.protocol import ChatCompletionRequest, CompletionRequest, RequestLimits, _SamplingFields
from llmcycle.serve.registered import RegisteredModels
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.tool_calls import ToolCallStream, parser_for_template
from llmcycle.serve.tool_calls import parse as parse_tool_calls
from llmcycle.threads import adaptive, set_threads
from llmcycle.tokenizer.tokenizer import BYTE_OF_CHAR

if TYPE_CHECKING:
    from llmcycle.improve.labels import Labels
    from llmcycle.serve.upstream import Router

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError",
             405: "MethodNotAllowedError", 413: "RequestTooLargeError", 415: "UnsupportedMediaTypeError",
             422: "UnprocessableEntityError", 429: "RateLimitError", 500: "InternalServerError",
             503: "ServiceUnavailableError"}

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers
        self.code = code  # OpenAI's machine-readable code where one exists, else the status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.code or self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ServerState:
    """What the routes share: the engines by model name, the LoRA adapters they serve (`adapters`: adapter
    name -> its base model's name), keys, rate limits, request limits, metrics, and the drain state
    (`draining`, and `in_flight`: admitted HTTP requests not yet answered in full)."""

    def __init__(self, engines: dict[str, AsyncLLMEngine], keys: KeyStore | None = None,
                 limits: RequestLimits | None = None, request_log: RequestLog | None = None,
                 prices: PriceTable | None = None, store_text: bool = False,
                 safety: list[dict] | None = None, otel: Any = None, drift_every_s: float = 300.0,
                 registered: RegisteredModels | None = None, poolers: dict[str, Pooler] | None = None,
                 router: Router | None = None) -> None:
        self.registered = registered  # registry names followed live (serve/registered.py)
        self.tool_call_parser = "auto"  # run_server sets the configured one
        # reward models, served as scorers only (pooling_api.py); every engine's model also embeds, through
        # a pooler over its own weights made at its first pooling request
        self.poolers: dict[str, Pooler] = dict(poolers or {})
        self.router = router  # upstream deployments (serve/upstream.py, serve/gateway.py)
        self.engine_poolers: dict[str, Pooler] = {}
        if registered is not None:
            engines = {**engines, **registered.engines}
        if not engines and not self.poolers and router is None:
            raise LlmcycleError("serve needs at least one model.")
        clash = sorted(set(self.poolers) & set(engines))
        if clash:
            raise LlmcycleError(f"two models are named {clash[0]!r}.")
        clash = sorted((router.names if router else set()) & (set(engines) | set(self.poolers)))
        if clash:
            raise LlmcycleError(f"{clash[0]!r} names both an upstream and a model served here; rename one.")
        self.engines: dict[str, AsyncLLMEngine] = {}  # filled by add_engine, below
        self.adapters = {lora: name for name, e in engines.items() for lora in e.engine.lora_names}
        clash = sorted(set(self.adapters) & set(engines))
        if clash:
            raise LlmcycleError(f"{clash[0]!r} names both a model and a LoRA adapter; rename one.")
        self.keys = keys
        self.limits = limits or RequestLimits()
        self.draining = False
        self.in_flight = 0
        self.bytes_per_token: dict[str, int | None] = {}
        self.limiter = RateLimiter()
        self.metrics = ServerMetrics(lambda: {name: e.engine for name, e in self.engines.items()})
        self.resources = ResourceSampler()  # sampled while the app runs (lifespan), shown on /dashboard
        # the one monitoring hook: every API request begins a trace and ends it once (monitor/tracker.py)
        self.monitor = RequestMonitor(request_log, prices, store_text, self.metrics.registry, {},
                                      SafetyChecks(safety), otel)
        # drift of the last hour against the day before, every few minutes, as gauges on /metrics
        self.drift_watch = (DriftWatch(self.monitor, request_log.store, drift_every_s)
                            if request_log is not None and drift_every_s > 0 else None)
        self.quality_watch: QualityWatch | None = None  # run_server sets it when quality_every_s > 0
        self.created = int(time.time())
        self.feedback = FeedbackStore(request_log.store) if request_log is not None else None
        self.labels: Labels | None = None  # run_server sets it when the request log is on
        for name, eng in engines.items():
            self.add_engine(name, eng)
        if registered is not None:
            registered.add_engine, registered.remove_engine = self.add_engine, self.remove_engine

    def add_engine(self, name: str, engine: AsyncLLMEngine) -> None:
        """A served model: those given at the start, and those that join while the server runs (registry
        versions, their engines started)."""
        self.bytes_per_token[name] = max_bytes_per_token(engine.engine.tokenizer)
        self.monitor.versions[name] = model_version(engine.engine.model_dir)
        engine.on_output = self.metrics.observer(name)
        engine.on_abort = self.metrics.forget  # an aborted request sends no final output
        self.engines[name] = engine

    def remove_engine(self, name: str) -> None:
        """A model that leaves (a retired registry version): nothing routes to it any more."""
        self.engines.pop(name, None)
        self.bytes_per_token.pop(name, None)

    def route(self, name: str) -> tuple[str, AsyncLLMEngine, str | None]:
        """(base model name, its engine, the LoRA adapter or None) for a request's `model`; 404 if unknown."""
        if name in self.engines:
            return name, self.engines[name], None
        if name in self.adapters:
            base = self.adapters[name]
            return base, self.engines[base], name
        if name in self.poolers:
            raise APIError(400, f"`{name}` is a reward model: it answers /v1/score, /classify and /pooling, not "
                                "generation.", "model")
        served = ", ".join([*(self.registered.routes if self.registered else ()), *self.engines, *self.adapters])
        raise APIError(404, f"The model `{name}` does not exist. Served models: {served}.", "model")

    def tool_parser_for(self, tokenizer: Any) -> str:
        """The tool-call format of a model: the configured parser, or (auto) its chat template's."""
        if self.tool_call_parser != "auto":
            return self.tool_call_parser
        return parser_for_template(tokenizer.chat_template)

    def engine(self, name: str) -> AsyncLLMEngine:
        return self.route(name)[1]

    def busy(self) -> bool:
        """Whether a drain must still wait: an admitted request unanswered, or a sequence in an engine."""
        return self.in_flight > 0 or any(e.num_in_flight for e in self.engines.values())


def _types(node: Any) -> set[str]:
    """The `type` names in a tokenizer.json component, through `Sequence` nesting."""
    if not isinstance(node, dict):
        return set()
    inner = node.get("pretokenizers") or node.get("decoders") or []
    return {node.get("type")} | {t for n in inner for t in _types(n)}


def max_bytes_per_token(tokenizer: Any) -> int | None:
    """The most UTF-8 bytes of prompt text that one token can stand for; None where no bound is safe.

    Why this bounds a prompt: when the tokens spell the text's bytes exactly (no normalizer; byte-level,
    or byte fallback, so nothing becomes an unknown token), each token covers at most this many bytes of
    the text (a special token written out in the text: its own length), so a text of B bytes needs at
    least B / bound tokens. A text longer than context * bound bytes is too long for certain, before it
    is tokenized. A normalizer (which may drop characters) or an unknown-token model (WordPiece turns a
    whole long word into one [UNK]) breaks the bound: those prompts are tokenized, off the event loop,
    and counted.
    """
    if tokenizer is None:
        return None
    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None or model.get("type") == "WordPiece":
        return None
    byte_level = "ByteLevel" in _types(spec.get("pre_tokenizer")) | _types(spec.get("decoder"))
    if byte_level and any(tokenizer.backend.token_to_id(c) is None for c in BYTE_OF_CHAR):
        return None  # a byte without a token would become an unknown token
    if not byte_level and not model.get("byte_fallback"):
        return None
    added = [len(t.content.encode("utf-8")) for t in tokenizer.backend.get_added_tokens_decoder().values()]
    return max([1, *tokenizer.token_bytes(), *added])


# ---- request handling helpers ------------------------------------------------------------------


def _require_json(request: Request) -> None:
    """415 unless the body is declared JSON. A cross-site page can POST text/plain to a key-less local
    server without the browser asking first; application/json always needs a CORS preflight."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"Send the request body as JSON with `Content-Type: application/json` "
                            f"(got {media or 'no content type'!r}).")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 past `limit` bytes: from Content-Length before reading anything, and counted while
    reading, for a chunked body has no Content-Length. A body the gateway read already is not read twice."""
    cached = getattr(request.state, "raw_body", None)
    if cached is not None:
        return cached
    too_large = APIError(413, f"The request body is larger than this server's limit of {limit} bytes.")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed (JSON has no NaN or Infinity)")


def _check_tree(obj: Any, max_depth: int) -> None:
    """400 for nesting deeper than `max_depth`, or a string that is not Unicode text: JSON's `\\ud800`
    escape can carry a lone surrogate, which no tokenizer (nor UTF-8) can encode."""
    stack = [(obj, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode("utf-8")
                except UnicodeEncodeError:
                    raise APIError(400, "The request body has a string that is not valid Unicode "
                                        "(a lone surrogate).") from None
        elif isinstance(node, (list, dict)):
            if depth >= max_depth:
                raise APIError(400, f"The request body is nested deeper than {max_depth} levels.")
            stack.extend((x, depth + 1) for x in (node if isinstance(node, list) else [*node, *node.values()]))


def _loads(raw: bytes, max_depth: int) -> Any:
    try:
        body = json.loads(raw, parse_constant=_no_constants)
    except RecursionError:  # the C parser recurses per level: 10,000 levels of [ raise this
        raise APIError(400, f"The request body is nested deeper than {max_depth} levels.") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise APIError(400, f"The request body is not valid JSON: {exc}") from None
    _check_tree(body, max_depth)
    return body


async def _request(request: Request, model: type[_SamplingFields], limits: RequestLimits) -> Any:
    """The validated request of a POST, every client mistake a 4xx: not JSON (415), too large (413),
    malformed, NaN/Infinity, too deep, a lone surrogate, over a limit (400), off the schema (422).
    Parsing and validating a body of megabytes takes a while: that runs off the event loop."""
    _require_json(request)
    raw = await _read_body(request, limits.max_body_bytes)
    return await asyncio.to_thread(lambda: _parse(model, _loads(raw, limits.max_json_depth), limits))


def _parse(model: type[_SamplingFields], body: Any, limits: RequestLimits) -> Any:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or None
        msg = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5])
        raise APIError(422, f"Invalid request: {msg}", field) from None
    over = req.check_limits(limits)
    if over:
        raise APIError(400, over[1], over[0])
    problem = req.unsupported()
    if problem:
        raise APIError(400, problem)
    return req


def _check_prompt_bytes(state: ServerState, name: str, texts: list[str], param: str) -> None:
    """400 (context_length_exceeded) for a text prompt provably longer than the context, from its byte
    length alone: cheap enough for the event loop, and it spares tokenizing megabytes (see
    `max_bytes_per_token`)."""
    bound = state.bytes_per_token[name]
    if bound is None:
        return
    limit = state.engines[name].engine.max_model_len
    size = sum(len(t.encode("utf-8")) for t in texts)
    if size > limit * bound:
        raise APIError(400, f"The prompt is {size} bytes: more than the model's context of {limit} tokens "
                            f"can hold (a token here is at most {bound} bytes).", param,
                       code="context_length_exceeded")


def _authorize(state: ServerState, request: Request, roles: tuple[str, ...] = ("user", "admin")) -> KeyRecord | None:
    """The request's key when keys are required (None when they are not); 401 without a valid key, 403 when
    its role may not use this route (a scrape key outside /metrics, a user key on /metrics)."""
    if state.keys is None:
        return None
    if hasattr(request.state, "key"):  # authorized already (a gateway request falling back): counted once
        return request.state.key
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer":  # Anthropic's clients send the key as x-api-key
        key = request.headers.get("x-api-key", "")
    record = state.keys.verify(key.strip()) if key.strip() else None
    if record is None:
        raise APIError(401, "Missing or invalid API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`.")
    if not record.may(*roles):
        raise APIError(403, f"Key {record.prefix}... has role {record.role or 'user'}; {request.url.path} needs "
                            f"one of: {', '.join(roles)}.")
    wait = state.limiter.check_request(record.id, record.requests_per_minute, record.tokens_per_minute)
    if wait is not None:
        seconds = max(1, math.ceil(wait))
        raise APIError(429, f"Rate limit reached for key {record.prefix}...; retry in {seconds} s.",
                       headers={"Retry-After": str(seconds)})
    request.state.key = record
    return record


def _check_params(engine: AsyncLLMEngine, prompts: list[str | list[int]], make: Any,
                  param: str = "prompt") -> tuple[list, list]:
    """Tokenize and validate every prompt; map engine errors to 400 naming the problem.
    Blocking (tokenizing a long prompt takes a while): run it off the event loop."""
    ids_list, params_list = [], []
    for p in prompts:
        try:
            ids = engine.engine.encode_prompt(p)
            params: SamplingParams = make(len(ids))
            params.validate()
            try:
                engine.engine.check_length(len(ids), params.max_tokens)
            except LlmcycleError as exc:
                raise APIError(400, str(exc), param, code="context_length_exceeded") from None
            engine.prepare(ids, params)
        except ValueError as exc:
            field = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), field) from None
        except LlmcycleError as exc:
            raise APIError(400, str(exc), param) from None
        ids_list.append(ids)
        params_list.append(params)
    return ids_list, params_list


def _max_tokens(requested: int | None, num_prompt: int, engine: AsyncLLMEngine) -> int:
    if requested is None:  # as vLLM: whatever room the context leaves
        return max(1, engine.engine.max_model_len - num_prompt)
    return requested


async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come (a multi-prompt completion)."""
    if len(gens) == 1:
        try:
            async for out in gens[0]:
                yield 0, out
        finally:
            await gens[0].aclose()  # type: ignore[attr-defined]  # aborts the request if unfinished
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                await q.put((i, out))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            await q.put((i, exc))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            with contextlib.suppress(Exception):
                await g.aclose()  # type: ignore[attr-defined]


def _engine_error(exc: BaseException, quiet: bool = False) -> APIError:
    """The API error an exception is answered with; an unexpected one is logged unless `quiet` (a caller that
    only needs its status, while the exception handler logs and answers it)."""
    if isinstance(exc, (QueueFull, EngineUnavailable)):
        return APIError(503, str(exc))
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc))
    if not quiet:
        log.exception("internal error", exc_info=exc)
    return APIError(500, f"Internal server error: {type(exc).__name__}: {exc}")


def _usage(prompt_lens: list[int], outs: dict[int, RequestOutput]) -> dict[str, int]:
    prompt = sum(prompt_lens)
    completion = sum(len(c.token_ids) for o in outs.values() for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Logprobs:
    """OpenAI's logprobs objects (legacy completions and chat) from the engine's per-token dicts."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def token(self, tid: int) -> str:
        return self.tokenizer.decode([tid])

    def _top(self, entry: dict[int, float], k: int) -> list[tuple[int, float]]:
        return sorted(entry.items(), key=lambda kv: -kv[1])[:k]

    def completion(self, c: CompletionOutput, start: int, k: int, offset: int) -> dict:
        tokens, lps, tops, offsets = [], [], [], []
        for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            s = self.token(tid)
            tokens.append(s)
            lps.append(entry[tid])
            tops.append({self.token(t): v for t, v in self._top(entry, k)} if k else None)
            offsets.append(offset)
            offset += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, c: CompletionOutput, start: int, k: int) -> dict:
        content = []
        for tid, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
            s = self.token(tid)
            content.append({"token": s, "logprob": entry[tid], "bytes": list(s.encode()),
                            "top_logprobs": [{"token": self.token(t), "logprob": v,
                                              "bytes": list(self.token(t).encode())}
                                             for t, v in self._top(entry, k)]})
        return {"content": content}


# ---- the app -----------------------------------------------------------------------------------


def build_app(state: ServerState, drain_timeout: float = ServeConfig.drain_timeout) -> FastAPI:
    from llmcycle.serve import gateway, messages_api, pooling_api  # they build on this module's helpers

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        for eng in state.engines.values():
            eng.start()
        state.resources.start()
        watches = [w for w in (state.drift_watch, state.quality_watch) if w is not None]
        for w in watches:
            w.start()
        follow = asyncio.create_task(state.registered.follow()) if state.registered is not None else None
        yield
        if follow is not None:
            follow.cancel()
        state.resources.stop()
        for w in watches:
            w.stop()
        # uvicorn has already waited for open requests (graceful shutdown); stop the engine threads.
        await asyncio.gather(*(e.shutdown(drain=True, timeout=drain_timeout) for e in state.engines.values()))
        if state.router is not None:
            await state.router.close()

    # The docs are routes of ours (below), so that with keys on they need a key like the API they describe.
    app = FastAPI(title="llmcycle", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.llmcycle = state
    app.add_middleware(_DrainGate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        texts = {404: f"There is no route {request.url.path}.",
                 405: f"{request.method} is not allowed on {request.url.path}."}
        err = APIError(exc.status_code, texts.get(exc.status_code, str(exc.detail)), headers=exc.headers)
        return messages_api.error_response(err) if request.url.path.startswith("/v1/messages") else err.response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _engine_error(exc).response()

    @app.get("/health")
    async def health() -> Response:
        if state.draining or any(e.draining for e in state.engines.values()):
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        _authorize(state, request, roles=("scrape", "admin"))  # traffic of every key: not for user keys
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/dashboard")
    async def dashboard_page() -> Response:
        return FileResponse(STATIC / "dashboard.html", media_type="text/html")  # the data behind it needs a key

    @app.get("/dashboard/data")
    async def dashboard_data(request: Request) -> Response:
        _authorize(state, request, roles=("admin",))
        try:
            window = float(request.query_params.get("window", 3600))
        except ValueError:
            window = -1.0
        if not 60 <= window <= 30 * 86400:
            raise APIError(400, "window must be a number of seconds from 60 to 2592000 (30 days).", "window")
        return JSONResponse(await asyncio.to_thread(_dashboard, state, window))

    @app.get("/")
    async def chat_page() -> Response:
        page = STATIC / "index.html"
        if not page.exists():
            return JSONResponse({"models": list(state.engines)})
        return FileResponse(page, media_type="text/html")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await _monitored(state, "/v1/models", lambda trace: _models(state, request, trace))

    @app.post("/v1/completions", openapi_extra=_request_body("CompletionRequest"))
    async def completions(request: Request) -> Response:
        return await _monitored(state, "/v1/completions",
                                lambda trace: gateway.dispatch(state, request, trace, "completions", _completions))

    @app.post("/v1/chat/completions", openapi_extra=_request_body("ChatCompletionRequest"))
    async def chat_completions(request: Request) -> Response:
        return await _monitored(state, "/v1/chat/completions",
                                lambda trace: gateway.dispatch(state, request, trace, "chat", _chat))

    @app.post("/v1/messages")
    async def messages(request: Request) -> Response:
        async def handler(state: ServerState, request: Request, trace: Trace) -> Response:
            return await gateway.dispatch(state, request, trace, "messages", messages_api.messages)

        return await messages_api.answer(state, request, "/v1/messages", handler)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        return await messages_api.answer(state, request, "/v1/messages/count_tokens", messages_api.count_tokens)

    for route, handler in (("/v1/embeddings", pooling_api.embeddings), ("/v1/score", pooling_api.score),
                           ("/score", pooling_api.score), ("/classify", pooling_api.classify),
                           ("/pooling", pooling_api.pooling)):
        app.add_api_route(route, _pooling_route(state, route, handler), methods=["POST"])

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        return await _monitored(state, "/v1/feedback", lambda trace: _feedback(state, request, trace))

    @app.get("/label")
    async def label_page() -> Response:
        return FileResponse(STATIC / "label.html", media_type="text/html")  # its routes need a key

    @app.get("/v1/label/next")
    async def label_next(request: Request) -> Response:
        labels, annotator = _labeller(state, request)
        return JSONResponse({"item": await asyncio.to_thread(labels.next_item, annotator)})  # null: none left

    @app.post("/v1/label")
    async def label(request: Request) -> Response:
        labels, annotator = _labeller(state, request)
        body = await _json_body(state, request)
        if not isinstance(body, dict) or not isinstance(body.get("item_id"), int):
            raise APIError(400, "item_id: the id of the item shown is required.", "item_id")
        try:
            await asyncio.to_thread(labels.submit, annotator, body["item_id"], body.get("choice"),
                                    body.get("reasons"), body.get("comment"))
        except LlmcycleError as e:
            raise APIError(400, str(e)) from None
        return JSONResponse({"ok": True})

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_schema(request: Request) -> Response:
        _authorize(state, request)
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        _authorize(state, request)
        return get_swagger_ui_html(openapi_url="/openapi.json", title="llmcycle API")

    app.openapi = lambda: _openapi(app)
    return app


def _pooling_route(state: ServerState, route: str, handler: Callable) -> Callable:
    async def answer(request: Request) -> Response:
        return await _monitored(state, route, lambda trace: handler(state, request, trace))

    return answer


async def _monitored(state: ServerState, route: str, handler: Callable[[Trace], Awaitable[Response]]) -> Response:
    """Run a route's handler inside a monitor trace, which ends with the answer's status: here for a whole
    answer or an error, and at the stream's end for a streamed one (`_respond`)."""
    trace = state.monitor.begin(route)
    try:
        response = await handler(trace)
    except BaseException as exc:
        if isinstance(exc, asyncio.CancelledError):
            trace.end(CLIENT_CLOSED, "ClientDisconnected")
        else:
            status = _engine_error(exc, quiet=True).status
            trace.end(status, APIError.TYPES.get(status, "Error"))
        raise
    if not isinstance(response, StreamingResponse):
        trace.end(response.status_code)
    return response


async def _admit(state: ServerState, request: Request, model: type[_SamplingFields],
                 trace: Trace) -> tuple[KeyRecord | None, Any, str, AsyncLLMEngine, str | None]:
    """Key, parsed body and route of a generation request, each noted on its trace as it is known:
    (key, request, base model name, its engine, LoRA adapter name)."""
    key = _authorize(state, request)
    trace.key_id = key.id if key is not None else None
    req = await _request(request, model, state.limits)
    trace.model, trace.stream = req.model, bool(req.stream)
    trace.user, trace.metadata = req.trace_fields()
    reg = state.registered
    if reg is not None and (req.model in reg or reg.variant(req.model)):
        # a registry name (its alias or A/B split picks the version, sticky per user or key), or a loaded
        # version pinned as NAME@N; the version is held until the request ends, so it is not retired under it
        base, trace.variant, engine, release = (reg.pick(req.model, trace.user or trace.key_id) if req.model in reg
                                                else reg.hold(req.model))
        trace.on_end.append(release)
        lora = None
    else:
        base, engine, lora = state.route(req.model)
    trace.base_model, trace.adapter = base, lora
    return key, req, base, engine, lora


async def _json_body(state: ServerState, request: Request) -> Any:
    _require_json(request)
    return _loads(await _read_body(request, state.limits.max_body_bytes), state.limits.max_json_depth)


async def _feedback(state: ServerState, request: Request, trace: Trace) -> Response:
    """POST /v1/feedback: thumbs, a 1-5 score or a comment on an answered request, by its `id`. With keys
    on, a user key rates only its own requests (an admin key any)."""
    key = _authorize(state, request, roles=("user", "annotator", "admin"))
    trace.key_id = key.id if key is not None else None
    if state.feedback is None:
        raise APIError(400, "feedback needs the request log (serve with request_log on).")
    try:
        fields = check_feedback(await _json_body(state, request))
    except LlmcycleError as e:
        raise APIError(400, str(e)) from None
    owner = None
    for _ in range(10):  # a stream's trace ends just after its last event: feedback may race it by a moment
        owner = await asyncio.to_thread(state.monitor.request_owner, fields["request_id"])
        if owner is not None or not fields["request_id"].startswith(("chatcmpl-", "cmpl-")):
            break
        await asyncio.sleep(0.1)
    if owner is None:
        raise APIError(404, f"No logged request has the id {fields['request_id']!r}.", "request_id")
    if key is not None and not key.may("admin") and owner[1] != key.id:
        raise APIError(404, f"No logged request has the id {fields['request_id']!r}.", "request_id")
    await asyncio.to_thread(state.feedback.add, fields, trace.key_id)
    return JSONResponse({"ok": True, "request_id": fields["request_id"]})


def _labeller(state: ServerState, request: Request) -> tuple[Labels, str]:
    """The label store and who labels: the key's name (annotator or admin keys), or `?annotator=` when
    keys are off."""
    key = _authorize(state, request, roles=("annotator", "admin"))
    if state.labels is None:
        raise APIError(400, "labelling needs the request log's database (serve with request_log on).")
    name = key.name if key is not None else request.query_params.get("annotator", "")
    if not name or len(name) > 128:
        raise APIError(400, "say who labels: ?annotator=NAME (with keys on, the key names the annotator).",
                       "annotator")
    return state.labels, name


def _dashboard(state: ServerState, window: float) -> dict:
    """/dashboard's data: the request log's summary of the window, the engines now, resources over time."""
    log = state.monitor.log
    data: dict[str, Any] = summary(log.store, window) if log is not None else {}
    data["request_log"] = None if log is None else {"path": str(log.store), "written": log.written,
                                                    "dropped": log.dropped, "failed": log.failed}
    shown = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    data["engines"] = {name: {k: stats[k] for k in shown}  # a copy: registry versions come and go meanwhile
                       for name, stats in ((n, e.engine.stats()) for n, e in list(state.engines.items()))}
    data["resources"] = list(state.resources.samples)
    data["ab"] = _ab_rows(state) if log is not None else []
    return data


def _ab_rows(state: ServerState) -> list[dict]:
    """One row per variant of every A/B test the served registry names run, with its verdict."""
    from llmcycle.improve.abtest import ab_report

    rows: list[dict] = []
    for name in list(state.registered.routes) if state.registered is not None else []:
        split = state.registered.registry.split(name.partition("@")[0])
        if split is None:
            continue
        report = ab_report(state.monitor.log.store, name.partition("@")[0], split["started"])
        verdicts = {c["variant"]: c["verdict"] for c in report["comparisons"]}
        rows += [{"test": name, "variant": v["variant"], "requests": v["requests"], "positive_rate": v["positive_rate"],
                  "error_rate": v["error_rate"], "latency_p50_s": v["latency_p50_s"],
                  "verdict": verdicts.get(v["variant"], "control")} for v in report["variants"]]
    return rows


def _screen_prompt(state: ServerState, trace: Trace, text: str, param: str) -> str:
    """The prompt text after the safety checks (redacted where one redacts); 400 content_filter if refused."""
    try:
        return state.monitor.safety.on_text(text, "prompt", trace.safety)
    except SafetyRefusal as e:
        raise APIError(400, str(e), param, code="content_filter") from None


def _screen_completions(state: ServerState, trace: Trace, finals: dict[int, RequestOutput],
                        can_change: bool) -> None:
    """Run the completion checks over every finished sequence; where they may still change the answer (not
    streamed), redact its text in place, or empty it with finish reason content_filter when refused."""
    for out in finals.values():
        for c in out.outputs:
            text = state.monitor.safety.on_text(c.text, "completion", trace.safety, can_change)
            if text is None:
                c.text, c.finish_reason = "", "content_filter"
            elif can_change:
                c.text = text


async def _models(state: ServerState, request: Request, trace: Trace) -> Response:
    key = _authorize(state, request)
    trace.key_id = key.id if key is not None else None
    # root is the name, not the directory: a client has no business knowing the server's paths.
    # An adapter names its base in `parent`, as vLLM lists LoRA modules.
    names = [(name, name, None) for name in state.engines] + [(a, b, b) for a, b in state.adapters.items()]
    if state.registered is not None:  # a registry name, listed with the version it answers from first
        names += [(name, next(iter(r["keys"].values())), None) for name, r in state.registered.routes.items()]
    data = [{"id": name, "object": "model", "created": state.created, "owned_by": "llmcycle",
             "root": name, "parent": parent, "max_model_len": state.engines[base].engine.max_model_len}
            for name, base, parent in names]
    data += [{"id": name, "object": "model", "created": state.created, "owned_by": "llmcycle", "root": name,
              "parent": None, "max_model_len": p.max_len, "task": "reward"} for name, p in state.poolers.items()]
    if state.router is not None:  # upstream names: owned by their provider
        data += [{"id": name, "object": "model", "created": state.created, "owned_by": state.router.provider(name),
                  "root": name, "parent": None} for name in sorted(state.router.names)]
    return JSONResponse({"object": "list", "data": data})


async def _completions(state: ServerState, request: Request, trace: Trace) -> Response:
    key, req, base, engine, lora = await _admit(state, request, CompletionRequest, trace)
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt must not be empty", "prompt")
    texts = None  # the prompts as text, for the safety checks and the log: decoded once when either wants it
    if state.monitor.safety or state.monitor.log is not None:
        tok = engine.engine.tokenizer
        texts = [p if isinstance(p, str) else tok.decode(p) for p in prompts]
    if state.monitor.safety:  # token-id prompts are screened as their text (and sent as text if redacted)
        screened = [_screen_prompt(state, trace, t, "prompt") for t in texts]
        prompts = [p if s == t else s for p, t, s in zip(prompts, texts, screened)]
        texts = screened
    for p in prompts:
        if isinstance(p, str):
            _check_prompt_bytes(state, base, [p], "prompt")
    ids_list, params_list = await asyncio.to_thread(
        _check_params, engine, prompts,
        lambda n: req.sampling_params(_max_tokens(req.max_tokens, n, engine), req.logprobs))
    if state.monitor.log is not None:  # the log stores it (store_text) or only its language (drift)
        trace.prompt_text = "\n\n".join(texts)
    return await _respond(state, request, engine, req, key, ids_list, params_list, chat=False, lora=lora,
                          trace=trace)


async def _chat(state: ServerState, request: Request, trace: Trace) -> Response:
    key, req, base, engine, lora = await _admit(state, request, ChatCompletionRequest, trace)
    tok = engine.engine.tokenizer
    try:
        tools = req.tool_request()
    except ValueError as exc:
        raise APIError(400, str(exc), "tool_choice" if "tool_choice" in str(exc) else "tools") from None
    parser = state.tool_parser_for(tok) if tools is not None else None
    ids = await _chat_prompt(state, trace, base, engine, [m.for_template() for m in req.messages], tools)
    k = req.top_logprobs if req.logprobs else None
    if req.logprobs and k is None:
        k = 0
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens

    def params(n: int) -> SamplingParams:
        p = req.sampling_params(_max_tokens(limit, n, engine), k, tok.end_of_turn_ids)
        forced = tools.grammar(parser) if tools is not None else None
        if forced is not None:  # tool_choice required or named: the call is decoded under a grammar
            if p.structured_outputs is not None:
                raise ValueError("tool_choice required or a named tool cannot be combined with response_format "
                                 "or structured_outputs")
            p.structured_outputs = StructuredOutputsParams(grammar=forced)
        return p

    ids_list, params_list = await asyncio.to_thread(_check_params, engine, [ids], params, "messages")
    calls = None if tools is None or tools.choice == "none" else (parser, tools.names)
    return await _respond(state, request, engine, req, key, ids_list, params_list, chat=True, lora=lora,
                          trace=trace, tool_calls=calls)


async def _chat_prompt(state: ServerState, trace: Trace, base: str, engine: AsyncLLMEngine,
                       messages: list[dict], tools: Any) -> list[int]:
    """A chat's prompt ids, for either API: its messages screened by the safety checks, bounded by bytes,
    rendered with the template (and `tools`, a ToolRequest, where offered) off the event loop, and noted on
    the trace for the request log."""
    if state.monitor.safety:
        messages = [{**m, "content": _screen_prompt(state, trace, m["content"], "messages")} for m in messages]
    _check_prompt_bytes(state, base, [m["content"] for m in messages], "messages")
    ids = await asyncio.to_thread(_encode_chat, engine.engine.tokenizer, messages,
                                  tools.template_tools() if tools else None)
    if state.monitor.log is not None:
        trace.prompt_text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
        trace.messages = messages
    return ids


def _encode_chat(tok: Any, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The chat's prompt ids (blocking: run off the event loop); a template error is a 400."""
    try:
        return tok.encode_chat(messages, add_generation_prompt=True, tools=tools)[0]
    except LlmcycleError as exc:
        raise APIError(400, str(exc), "messages") from None


def _request_body(model: str) -> dict:
    """OpenAPI for a route that parses its own body (to control every error): the schema it expects."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}}}}


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus the request models the completion routes validate against."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        _, defs = models_json_schema([(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")],
                                     ref_template="#/components/schemas/{model}")
        schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


class _DrainGate:
    """ASGI middleware: counts admitted requests (`state.in_flight`) and, while the server drains, answers
    new ones 503 at once. The listener stays open during a drain, so a client gets an answer it can act
    on (retry elsewhere) instead of a refused connection; /health and /metrics keep answering."""

    PROBES = ("/health", "/metrics")

    def __init__(self, app: Any, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.PROBES:
            await self.app(scope, receive, send)
            return
        if self.state.draining:
            err = APIError(503, "The server is shutting down and takes no new requests.",
                           headers={"Connection": "close"})
            await err.response()(scope, receive, send)
            self.state.monitor.begin(scope["path"]).end(503, APIError.TYPES[503])
            return
        self.state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.in_flight -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn with a drain on SIGTERM/SIGINT: keep listening, answer new requests 503 and /health
    "draining", let admitted requests finish (streams included, up to `drain_timeout` s), then shut down.
    A second signal stops at once (`forced`). `drained_cleanly` says afterwards whether the drain finished
    in time."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout: float) -> None:
        super().__init__(config)
        self.state, self.drain_timeout = state, drain_timeout
        self.drained_cleanly: bool | None = None
        self.forced = False

    def run(self, sockets: Any = None) -> None:
        try:
            super().run(sockets)
        finally:
            self._stop_engines()

    def _stop_engines(self) -> None:
        """Stop the engine threads a forced exit left running (uvicorn then skips the lifespan shutdown);
        a thread still in a torch kernel at interpreter exit would abort the process."""
        async def stop() -> None:
            await asyncio.gather(*(e.shutdown(drain=False) for e in self.state.engines.values()))

        asyncio.run(stop())

    def handle_exit(self, sig: int, frame: Any) -> None:
        # The signal is not recorded for uvicorn to re-raise after shutdown: a drained server exits 0.
        if self.state.draining:
            self.forced = True
            self.should_exit = self.force_exit = True
            return
        self.begin_drain()

    def begin_drain(self) -> None:
        """Start draining (safe from a signal handler or another thread); the server exits when done."""
        self.state.draining = True
        threading.Thread(target=self._drain, name="llmcycle-drain", daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.drain_timeout
        while self.state.busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.drained_cleanly = not self.state.busy() and not self.forced
        if not self.drained_cleanly:
            log.warning("drain timed out after %.0f s; cutting off the requests still in flight", self.drain_timeout)
        self.should_exit = True


class _Generation:
    """One admitted request's sequences in flight: budgets reserved, engine requests started, tokens
    counted against the key's limit once they are known. Both APIs (OpenAI's in `_respond`, Anthropic's in
    `messages_api.py`) answer from one: `collect()` for a whole answer, `stream()` for events."""

    def __init__(self, state: ServerState, request: Request, engine: AsyncLLMEngine, key: KeyRecord | None,
                 ids_list: list[list[int]], params_list: list[SamplingParams], lora: str | None, trace: Trace,
                 rid: str) -> None:
        self.state, self.request, self.key, self.trace = state, request, key, trace
        self.prompt_lens = [len(i) for i in ids_list]
        self.finals: dict[int, RequestOutput] = {}
        trace.request_id, trace.prompt_lens, trace.outputs = rid, self.prompt_lens, self.finals  # the monitor reads finals
        try:
            state.monitor.admit(trace, key, sum(self.prompt_lens), sum(p.max_tokens * p.n for p in params_list))
        except BudgetExceeded as e:
            raise APIError(429, str(e), code="insufficient_quota") from None
        self.gens = [engine.generate(ids, p, request_id=f"{rid}-{i}", lora_name=lora)
                     for i, (ids, p) in enumerate(zip(ids_list, params_list))]

    def record_tokens(self) -> None:
        if self.key is not None:
            used = sum(self.prompt_lens) + sum(len(c.token_ids) for o in self.finals.values() for c in o.outputs)
            self.state.limiter.record_tokens(self.key.id, used, self.key.tokens_per_minute)

    async def collect(self) -> dict[int, RequestOutput]:
        """Every request's final output (the client's disconnect aborts them); errors as APIError."""
        try:
            async for i, out in _with_disconnect(self.request, _merge(self.gens)):
                self.finals[i] = out
        except BaseException as exc:
            self.record_tokens()
            raise _engine_error(exc) from None
        self.record_tokens()
        if self.state.monitor.safety:
            _screen_completions(self.state, self.trace, self.finals, can_change=True)
        return self.finals

    async def stream(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The outputs as they come, each also kept in `finals`. The first is pulled before this returns, so
        an engine that refuses the request (queue full, shutting down) still answers with a proper status
        code instead of a broken stream. Closing the iterator aborts what is unfinished."""
        merged = _merge(self.gens)
        try:
            first = await merged.__anext__()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await merged.aclose()
            self.record_tokens()
            raise _engine_error(exc) from None

        async def items() -> AsyncIterator[tuple[int, RequestOutput]]:
            try:
                self.finals[first[0]] = first[1]
                yield first
                async for i, out in merged:
                    self.finals[i] = out
                    yield i, out
            finally:
                with contextlib.suppress(Exception):
                    await merged.aclose()
                self.record_tokens()
        return items()

    def streamed(self, events: AsyncIterator[str]) -> StreamingResponse:
        """The server-sent events response. The stream ends its trace itself; should it never start (the
        client gone before the first event), the background task still ends it, so no request goes unlogged
        and no budget reservation stays held."""
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(self.trace.end, CLIENT_CLOSED, "ClientDisconnected"))


async def _respond(state: ServerState, request: Request, engine: AsyncLLMEngine, req: Any,
                   key: KeyRecord | None, ids_list: list[list[int]], params_list: list[SamplingParams],
                   chat: bool, lora: str | None, trace: Trace,
                   tool_calls: tuple[str, set[str]] | None = None) -> Response:
    """The OpenAI answer, whole or streamed. `tool_calls`: (parser, offered names) where the answer's tool
    calls are to be parsed out of its text (`tool_calls.py`)."""
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    n = req.n
    lp = _Logprobs(engine.engine.tokenizer)
    k = params_list[0].logprobs
    gen = _Generation(state, request, engine, key, ids_list, params_list, lora, trace, rid)
    prompt_lens, finals = gen.prompt_lens, gen.finals

    if not req.stream:
        await gen.collect()
        choices = []
        for i in sorted(finals):
            for c in finals[i].outputs:
                if chat:
                    message: dict = {"role": "assistant", "content": c.text}
                    finish = c.finish_reason
                    calls = parse_tool_calls(c.text, *tool_calls) if tool_calls and finish == "stop" else ("", [])
                    if calls[1]:
                        message = {"role": "assistant", "content": calls[0] or None,
                                   "tool_calls": [call.openai() for call in calls[1]]}
                        finish = "tool_calls"
                    choices.append({"index": i * n + c.index, "message": message,
                                    "logprobs": lp.chat(c, 0, k or 0) if k is not None else None,
                                    "finish_reason": finish})
                else:
                    prefix = engine.engine.tokenizer.decode(ids_list[i], skip_special_tokens=True) if req.echo else ""
                    choices.append({"index": i * n + c.index, "text": prefix + c.text,
                                    "logprobs": lp.completion(c, 0, k or 0, len(prefix)) if k is not None else None,
                                    "finish_reason": c.finish_reason})
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": req.model, "choices": choices, "usage": _usage(prompt_lens, finals)}
        return JSONResponse(body)

    merged = await gen.stream()
    obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        status, error_type = CLIENT_CLOSED, "ClientDisconnected"  # until the stream ends otherwise
        sent_text: dict[tuple[int, int], int] = {}
        sent_tokens: dict[tuple[int, int], int] = {}
        done: set[tuple[int, int]] = set()
        held: dict[tuple[int, int], ToolCallStream] = {}  # per choice, with tool calls parsed

        def chunk(choices: list[dict]) -> str:
            return _sse({"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices})

        try:
            if chat:
                yield chunk([{"index": i * n + j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(ids_list)) for j in range(n)])
            elif req.echo:
                tok = engine.engine.tokenizer
                yield chunk([{"index": i * n + j, "text": tok.decode(ids_list[i], skip_special_tokens=True),
                              "logprobs": None, "finish_reason": None} for i in range(len(ids_list)) for j in range(n)])

            async for i, out in merged:
                choices = []
                for c in out.outputs:
                    key_ = (i, c.index)
                    if key_ in done:
                        continue
                    t0, n0 = sent_text.get(key_, 0), sent_tokens.get(key_, 0)
                    delta = c.text[t0:]
                    finished = c.finish_reason is not None
                    calls: list = []
                    if tool_calls:  # text that may be a call is held back until the answer ends
                        stream = held.setdefault(key_, ToolCallStream(*tool_calls))
                        delta, calls = stream.delta(c.text, finished and c.finish_reason == "stop", finished)
                    if not delta and not finished and len(c.token_ids) == n0:
                        continue
                    sent_text[key_], sent_tokens[key_] = len(c.text), len(c.token_ids)
                    logprobs = None
                    if k is not None:
                        logprobs = lp.chat(c, n0, k) if chat else lp.completion(c, n0, k, t0)
                    if chat:
                        body = {"content": delta} if delta else {}
                        if calls:
                            body["tool_calls"] = [{"index": j, **call.openai()} for j, call in enumerate(calls)]
                        choice = {"index": i * n + c.index, "delta": body, "logprobs": logprobs,
                                  "finish_reason": "tool_calls" if calls else c.finish_reason}
                    else:
                        choice = {"index": i * n + c.index, "text": delta, "logprobs": logprobs,
                                  "finish_reason": c.finish_reason}
                    choices.append(choice)
                    if finished:
                        done.add(key_)
                if choices:
                    yield chunk(choices)
            if state.monitor.safety:  # the text is out already: the checks count and flag
                _screen_completions(state, trace, finals, can_change=False)
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": req.model, "choices": [],
                            "usage": _usage(prompt_lens, finals)})
            status, error_type = 200, None
            yield "data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            raise  # the client went away: closing `merged` below aborts the engine requests
        except BaseException as exc:  # noqa: BLE001 - an error mid-stream is sent as a last event
            err = _engine_error(exc)
            status, error_type = err.status, APIError.TYPES.get(err.status, "Error")
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            with contextlib.suppress(Exception):
                await merged.aclose()
            trace.end(status, error_type)

    return gen.streamed(events())


async def _with_disconnect(request: Request, gen: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """Iterate `gen`, but stop (and close it, aborting the request) when the client disconnects."""
    nxt: asyncio.Task | None = None
    last_check = time.monotonic()
    try:
        while True:
            nxt = asyncio.ensure_future(gen.__anext__())
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=0.25)
                # Outputs arrive every step, so look at the connection on a clock, not on a pause.
                if time.monotonic() - last_check >= 0.25:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        nxt.cancel()
                        raise APIError(499, "client disconnected")
                if done:
                    break
            try:
                item = nxt.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
        with contextlib.suppress(Exception):
            await gen.aclose()  # type: ignore[attr-defined]


# ---- launching ---------------------------------------------------------------------------------


def parse_model_args(models: list[str]) -> dict[str, str]:
    """`DIR` or `NAME=DIR` -> {name: dir}; the name defaults to the directory's name."""
    out: dict[str, str] = {}
    for m in models:
        name, sep, path = m.partition("=")
        if not sep:
            path = m
            p = Path(m).resolve()
            name = p.parent.name if p.name == "model" else p.name  # runs/default/sft/model -> "sft"
        check_model_dir(path)
        if name in out:
            raise LlmcycleError(f"two models are named {name!r}; name them with NAME=DIR.")
        out[name] = path
    return out


def parse_lora_modules(specs: list[str], models: dict[str, str]) -> dict[str, dict[str, str]]:
    """vLLM's `--lora-modules` items (`NAME=DIR`, or JSON with name, path and base_model_name) -> {served
    model name: {adapter name: directory}}. With one served model every adapter is its; with several, an
    adapter names its base (base_model_name), or its adapter_config.json's base_model_name_or_path is the
    directory of one of them."""
    from llmcycle.optimize.lora import read_adapter_config

    out: dict[str, dict[str, str]] = {name: {} for name in models}
    seen: set[str] = set()
    for spec in specs:
        if spec.lstrip().startswith("{"):
            try:
                item = json.loads(spec)
                name, path, base = item["name"], item["path"], item.get("base_model_name")
            except (ValueError, KeyError, TypeError):
                raise LlmcycleError(f"lora module {spec!r}: a JSON item needs \"name\" and \"path\".") from None
        else:
            name, sep, path = spec.partition("=")
            base = None
            if not sep or not name or not path:
                raise LlmcycleError(f"lora module {spec!r}: expected NAME=DIR.")
        _, raw = read_adapter_config(path)  # a clear error for a directory that is no adapter
        if base is None:
            base = _adapter_base(name, raw.get("base_model_name_or_path"), models)
        if base not in models:
            raise LlmcycleError(f"lora module {name!r}: base_model_name {base!r} is not served "
                                f"(served: {', '.join(models)}).")
        if name in seen or name in models:
            raise LlmcycleError(f"lora module {name!r}: the name is already taken by a model or an adapter.")
        seen.add(name)
        out[base][name] = path
    return out


def _adapter_base(name: str, recorded: str | None, models: dict[str, str]) -> str:
    if len(models) == 1:
        return next(iter(models))
    for model, path in models.items():
        if recorded and Path(recorded).resolve() == Path(path).resolve():
            return model
    raise LlmcycleError(f"lora module {name!r}: several models are served and its adapter_config.json names "
                        f"none of them ({recorded!r}); give it as JSON with \"base_model_name\".")


def run_server(cfg: ServeConfig) -> None:
    """Load every model of `cfg` into its own engine and serve them until SIGINT/SIGTERM, which drain (see
    `DrainingServer`); returns after a clean drain, raises LlmcycleError when the drain timed out."""
    import torch

    from llmcycle.serve.engine import LLMEngine

    cfg.validate()
    dirs = parse_model_args(cfg.models) if cfg.models else {}
    loras = parse_lora_modules(cfg.lora_modules, dirs)
    if cfg.draft_model is not None:
        check_model_dir(cfg.draft_model)
    threads = set_threads(cfg.threads)
    torch.set_flush_denormal(True)
    store = KeyStore(cfg.keys, create=False) if cfg.keys else None
    engine_args = cfg.engine_args()
    rewards = {name: path for name, path in dirs.items() if is_reward_model(path)}
    for name in rewards:
        if loras[name]:
            raise LlmcycleError(f"{name!r} is a reward model; LoRA adapters are served over generation models.")
    poolers = {name: Pooler.load_reward(path, engine_args["device"], engine_args["dtype"])
               for name, path in rewards.items()}
    if cfg.on_ray:  # each model's engine on Ray Serve replicas (serve/ray_engine.py)
        from llmcycle.serve.ray_engine import deploy

        engines = {name: deploy(name, path, engine_args, loras[name], cfg.max_waiting, cfg.ray_replicas,
                                cfg.ray_autoscaling, cfg.ray_address, cfg.ray_num_cpus, cfg.threads)
                   for name, path in dirs.items() if name not in rewards}
    else:
        engines = {name: AsyncLLMEngine(LLMEngine(path, lora_modules=loras[name], **engine_args),
                                        max_waiting=cfg.max_waiting)
                   for name, path in dirs.items() if name not in rewards}
    registered = None
    if cfg.registered:
        from llmcycle.improve.registry import Registry

        registry = Registry(cfg.registry_target(), cfg.registry_root)
        registered = RegisteredModels(
            registry, cfg.registered, lambda path: AsyncLLMEngine(LLMEngine(path, **engine_args),
                                                                  max_waiting=cfg.max_waiting), cfg.registry_poll_s)
        registered.load()  # an unknown name fails here, naming the registry's database
        clash = sorted(set(registered.routes) & set(dirs))
        if clash:
            raise LlmcycleError(f"{clash[0]!r} names both a model directory and a registry name; rename one.")
    limits = RequestLimits(max_n=cfg.max_n, max_prompts=cfg.max_prompts, max_stop=cfg.max_stop,
                           max_body_bytes=cfg.max_body_bytes)
    log_path, audit_path = cfg.request_log_path(), cfg.audit_path()
    audit = store.audit if store is not None else None if audit_path is None else AuditLog(audit_path)
    request_log = None if log_path is None else RequestLog(
        log_path, cfg.log_flush_interval, cfg.log_queue_size, retention_days=cfg.log_retention_days,
        audit=audit if cfg.audit_requests else None)
    otel = None
    if cfg.otlp_endpoint:
        from llmcycle.monitor.otel import OtelExporter

        otel = OtelExporter(cfg.otlp_endpoint)
    router = None
    if cfg.upstreams:
        from llmcycle.serve.upstream import Router

        router = Router.from_config(cfg.upstreams, cfg.fallbacks, cfg.upstream_cooldown_s, cfg.upstream_allowed_fails)
    state = ServerState(engines, store, limits, request_log, PriceTable(cfg.prices), cfg.store_text, cfg.safety,
                        otel, cfg.drift_every_s, registered, poolers, router)
    state.tool_call_parser = cfg.tool_call_parser
    if router is not None:
        for d in router.deployments:
            print(f"upstream {d.model!r}: {d.label} as {d.upstream_model or d.model!r}"
                  + (f", key from ${d.api_key_env}" if d.api_key_env else ""), flush=True)
    if request_log is not None:
        from llmcycle.improve.labels import Labels

        state.labels = Labels(request_log.store)
    if cfg.quality_every_s > 0:
        generators = {n: d for n, d in dirs.items() if n not in rewards}  # a reward model has no eval suite
        state.quality_watch = QualityWatch(state.monitor, generators, cfg.quality_every_s, cfg.quality_limit,
                                           cfg.quality_heldout, log=request_log.store if request_log else None)
    for name, e in state.engines.items():
        if cfg.on_ray:
            scale = cfg.ray_autoscaling or f"{cfg.ray_replicas} replicas"
            print(f"model {name!r} from {dirs.get(name)}: engines on Ray Serve ({scale}), context "
                  f"{e.engine.max_model_len}", flush=True)
            continue
        pool = e.engine.pool
        print(f"model {name!r} from {dirs.get(name) or e.engine.model_dir}: {pool.num_blocks} KV blocks of {pool.block_size} tokens "
              f"({pool.k.numel() * 2 * pool.k.element_size() / 2**20:.0f} MiB), context {e.engine.max_model_len}, "
              f"{pool.device}", flush=True)
        for lora, path in loras.get(name, {}).items():
            print(f"LoRA adapter {lora!r} from {path} over {name!r}", flush=True)
    for name, p in poolers.items():
        state.monitor.versions[name] = model_version(dirs[name])
        print(f"reward model {name!r} from {dirs[name]}: /v1/score, /classify, /pooling; context {p.max_len}, "
              f"{p.device}", flush=True)
    print(f"torch threads: {threads}" + (" (following the CPUs other processes leave free)" if adaptive()
                                         else " (fixed)"), flush=True)
    if registered is not None:
        for name, route in registered.routes.items():
            print(f"registry name {name!r} answered by {', '.join(route['keys'].values())} (followed every "
                  f"{cfg.registry_poll_s:g} s)", flush=True)
    if store is not None:
        print(f"API keys required ({len(store)} active in {cfg.keys})", flush=True)
    text = " (prompts and completions too, PII-redacted)" if request_log and cfg.store_text else ""
    print(f"request log: {request_log.store if request_log else 'off'}{text}", flush=True)
    # The drain happens before uvicorn's own shutdown: connections left then are idle ones.
    config = uvicorn.Config(build_app(state, cfg.drain_timeout), host=cfg.host, port=cfg.port,
                            log_level=cfg.log_level, timeout_graceful_shutdown=5, **cfg.ssl_args())
    if cfg.ssl_certfile:
        print(f"TLS: https://{cfg.host}:{cfg.port} with {cfg.ssl_certfile}"
              + (" (client certificates required)" if cfg.ssl_ca_certs else ""), flush=True)
    server = DrainingServer(config, state, cfg.drain_timeout)
    where = f"{cfg.host}:{cfg.port}"
    if audit is not None:
        audit.append("server_start", where, {
            "models": {name: {"dir": str(Path(path).resolve()), "version": model_version(path),
                              "lora": {a: str(Path(p).resolve()) for a, p in loras[name].items()}}
                       for name, path in dirs.items()},
            "config": dataclasses.asdict(cfg)})
    try:
        server.run()
    finally:
        state.monitor.close()  # the rows still queued are written before the process ends
        if cfg.on_ray:
            from llmcycle.serve.ray_engine import teardown

            teardown([n for n in dirs if n not in rewards])
        if audit is not None:
            audit.append("server_stop", where, {"drained_cleanly": server.drained_cleanly})
    if server.forced:
        raise LlmcycleError("stopped by a second signal while draining; requests in flight were cut off.")
    if server.drained_cleanly is False:
        raise LlmcycleError(f"the drain timed out after {cfg.drain_timeout:.0f} s; requests in flight were cut off.")
