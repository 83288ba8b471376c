"""The pooling routes: POST /v1/embeddings (OpenAI's), and vLLM's POST /v1/score (also /score), /classify
and /pooling, over `Pooler`s (`pooling.py`).

Every served model embeds (its engine's weights, no second copy); a reward model directory is served as a
scorer only. Keys, rate limits, request limits, the request log and budgets are the generation routes'.
Errors have OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from typing import Any, ClassVar, Literal

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from llmcycle.errors import LlmcycleError
from llmcycle.monitor.budgets import BudgetExceeded
from llmcycle.monitor.tracker import Trace
from llmcycle.serve import server as srv
from llmcycle.serve.pooling import Pooler
from llmcycle.serve.protocol import RequestLimits

Inputs = str | list[str] | list[int] | list[list[int]]


class _PoolingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    user: str | None = None
    stream: ClassVar[bool] = False

    def items(self) -> list[Any]:
        raise NotImplementedError

    def trace_fields(self) -> tuple[str | None, None]:
        return self.user, None

    def check_limits(self, limits: RequestLimits) -> tuple[str, str] | None:
        if len(self.items()) > limits.max_prompts:
            return "input", f"at most {limits.max_prompts} inputs per request on this server, got {len(self.items())}"
        return None

    def unsupported(self) -> str | None:
        return None


def _items(value: Inputs) -> list[str | list[int]]:
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(x, int) for x in value):
        return [list(value)]  # type: ignore[arg-type]
    return list(value)  # type: ignore[arg-type]


class EmbeddingRequest(_PoolingRequest):
    input: Inputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)

    def items(self) -> list[Any]:
        return _items(self.input)


class PoolingRequest(EmbeddingRequest):
    """vLLM's /pooling: the model's pooled output (an embedding, or a reward model's score)."""


class ClassifyRequest(_PoolingRequest):
    input: str | list[str]

    def items(self) -> list[Any]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ScoreRequest(_PoolingRequest):
    """vLLM's /score: text_1 against text_2, one to one, one to many, or pairwise (lists of one length)."""

    text_1: str | list[str]
    text_2: str | list[str]

    def items(self) -> list[Any]:
        one = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        two = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        if len(one) == 1:
            return [(one[0], t) for t in two]
        if len(one) != len(two):
            raise ValueError("text_1 and text_2 must be lists of one length (or text_1 a single text)")
        return list(zip(one, two))

    def check_limits(self, limits: RequestLimits) -> tuple[str, str] | None:
        try:
            return super().check_limits(limits)
        except ValueError as exc:
            return "text_2", str(exc)


def _pooler(state: srv.ServerState, name: str) -> Pooler:
    """The pooler that answers for `name`: a reward model's, or one over a served model's own weights."""
    if name in state.poolers:
        return state.poolers[name]
    if name in state.adapters:
        raise srv.APIError(400, f"`{name}` is a LoRA adapter; pooling routes serve base models.", "model")
    engine = state.route(name)[1].engine  # 404 for an unknown name
    if not hasattr(engine, "model"):
        raise srv.APIError(400, f"`{name}` runs on Ray replicas; pooling routes serve models in this process.",
                           "model")
    if name not in state.engine_poolers:
        state.engine_poolers[name] = Pooler(engine.model, engine.tokenizer)
    return state.engine_poolers[name]


async def _begin(state: srv.ServerState, request: Request, model: type[_PoolingRequest], trace: Trace,
                 kind: str) -> tuple[Any, Pooler, str]:
    key = srv._authorize(state, request)
    trace.key_id = key.id if key is not None else None
    req = await srv._request(request, model, state.limits)
    trace.model, trace.stream = req.model, False
    trace.user, trace.metadata = req.trace_fields()
    pooler = _pooler(state, req.model)
    trace.base_model = req.model
    rid = f"{kind}-{uuid.uuid4().hex}"
    trace.request_id, trace.outputs = rid, {}
    return key, req, pooler, rid


async def _run(state: srv.ServerState, trace: Trace, key: Any, fn: Any, *args: Any) -> Any:
    """Tokens admitted against the key's budget, then `fn` off the event loop; LlmcycleError is a 400."""
    try:
        state.monitor.admit(trace, key, sum(trace.prompt_lens), 0)
    except BudgetExceeded as e:
        raise srv.APIError(429, str(e), code="insufficient_quota") from None
    try:
        result = await asyncio.to_thread(fn, *args)
    except LlmcycleError as exc:
        raise srv.APIError(400, str(exc), "input") from None
    if key is not None:
        state.limiter.record_tokens(key.id, sum(trace.prompt_lens), key.tokens_per_minute)
    return result


async def _encode_all(pooler: Pooler, items: list[Any]) -> list[list[int]]:
    try:
        return await asyncio.to_thread(lambda: [pooler.encode(x) for x in items])
    except LlmcycleError as exc:
        raise srv.APIError(400, str(exc), "input") from None


def _usage(trace: Trace) -> dict[str, int]:
    n = sum(trace.prompt_lens)
    return {"prompt_tokens": n, "total_tokens": n}


def _vector(v: torch.Tensor, fmt: str) -> list[float] | str:
    if fmt == "base64":  # OpenAI's: little-endian float32 bytes (the openai client asks for this by default)
        return base64.b64encode(v.to(torch.float32).numpy().astype("<f4").tobytes()).decode("ascii")
    return v.tolist()


async def embeddings(state: srv.ServerState, request: Request, trace: Trace) -> Response:
    """POST /v1/embeddings."""
    key, req, pooler, rid = await _begin(state, request, EmbeddingRequest, trace, "embd")
    if pooler.is_reward:
        raise srv.APIError(400, f"`{req.model}` is a reward model: it answers /v1/score, /classify and /pooling.",
                           "model")
    if req.dimensions is not None and req.dimensions != pooler.hidden_size:
        raise srv.APIError(400, f"dimensions: this model's embeddings have {pooler.hidden_size} dimensions and "
                                "cannot be shortened.", "dimensions")
    ids = await _encode_all(pooler, req.items())
    trace.prompt_lens = [len(i) for i in ids]
    vectors = await _run(state, trace, key, pooler.embed, ids)
    data = [{"object": "embedding", "index": i, "embedding": _vector(v, req.encoding_format)}
            for i, v in enumerate(vectors)]
    return JSONResponse({"object": "list", "data": data, "model": req.model, "usage": _usage(trace)})


async def pooling(state: srv.ServerState, request: Request, trace: Trace) -> Response:
    """POST /pooling (vLLM): an embedding per input, or a reward model's score as a one-element vector."""
    key, req, pooler, rid = await _begin(state, request, PoolingRequest, trace, "pool")
    ids = await _encode_all(pooler, req.items())
    trace.prompt_lens = [len(i) for i in ids]
    if pooler.is_reward:
        scores = await _run(state, trace, key, pooler.score, ids)
        vectors = [torch.tensor([s]) for s in scores]
    else:
        vectors = await _run(state, trace, key, pooler.embed, ids)
    data = [{"index": i, "object": "pooling", "data": _vector(v, req.encoding_format)} for i, v in enumerate(vectors)]
    return JSONResponse({"id": rid, "object": "list", "created": int(time.time()), "model": req.model,
                         "data": data, "usage": _usage(trace)})


async def classify(state: srv.ServerState, request: Request, trace: Trace) -> Response:
    """POST /classify (vLLM): a reward model's one label, its probability the sigmoid of the score."""
    key, req, pooler, rid = await _begin(state, request, ClassifyRequest, trace, "classify")
    if not pooler.is_reward:
        raise srv.APIError(400, f"`{req.model}` has no classification head; /classify serves reward models.", "model")
    ids = await _encode_all(pooler, req.items())
    trace.prompt_lens = [len(i) for i in ids]
    scores = await _run(state, trace, key, pooler.score, ids)
    data = [{"index": i, "label": "LABEL_0", "probs": [float(torch.sigmoid(torch.tensor(s)))], "num_classes": 1}
            for i, s in enumerate(scores)]
    return JSONResponse({"id": rid, "object": "list", "created": int(time.time()), "model": req.model,
                         "data": data, "usage": _usage(trace)})


async def score(state: srv.ServerState, request: Request, trace: Trace) -> Response:
    """POST /v1/score and /score (vLLM): a reward model's score of each (text_1, text_2) as (prompt, answer);
    an embedding model's cosine similarity of the two texts."""
    key, req, pooler, rid = await _begin(state, request, ScoreRequest, trace, "score")
    pairs = req.items()
    if pooler.is_reward:
        try:
            ids = await asyncio.to_thread(lambda: [pooler.pair_ids(a, b) for a, b in pairs])
        except LlmcycleError as exc:
            raise srv.APIError(400, str(exc), "text_1") from None
        trace.prompt_lens = [len(i) for i in ids]
        scores = await _run(state, trace, key, pooler.score, ids)
    else:
        ids = await _encode_all(pooler, [t for pair in pairs for t in pair])
        trace.prompt_lens = [len(i) for i in ids]
        vectors = await _run(state, trace, key, pooler.embed, ids)
        scores = [float(vectors[2 * i] @ vectors[2 * i + 1]) for i in range(len(pairs))]  # unit vectors: cosine
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return JSONResponse({"id": rid, "object": "list", "created": int(time.time()), "model": req.model,
                         "data": data, "usage": _usage(trace)})
