"""A serving smoke test: a real server on loopback, real HTTP clients, numbers a user would look at.

Used by `llmcycle run` (the serve stage): it starts `llmcycle serve`'s app with the final model on a free
loopback port, sends chat requests (streamed, a few at a time), and checks what a client and an operator
see: every request answered, the streamed text equal to a non-streamed answer for the same request,
and /metrics counting exactly the tokens the responses report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream_chat(client, url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage = None, "", None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise LlmcycleError(f"serve smoke test: HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for c in chunk["choices"]:
                if c["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text += c["delta"]["content"]
            usage = chunk.get("usage") or usage
    return {"prompt": prompt, "text": text, "ttft_s": ttft, "e2e_s": time.perf_counter() - t0,
            "completion_tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"]}


async def _client(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)

    async def one(client, p):
        async with sem:
            return await _stream_chat(client, url, model, p, max_tokens)

    async with httpx.AsyncClient(timeout=120) as client:
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(client, p) for p in prompts))
        duration = time.perf_counter() - t0
        # The same first request, not streamed: the texts must agree.
        body = {"model": model, "messages": [{"role": "user", "content": prompts[0]}], "max_tokens": max_tokens,
                "temperature": 0}
        plain = (await client.post(url + "/v1/chat/completions", json=body)).json()
        metrics = (await client.get(url + "/metrics")).text
    return {"answers": answers, "duration": duration, "plain": plain, "metrics": metrics}


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


@contextlib.contextmanager
def serve_in_thread(state: Any, drain_timeout: float = 5.0) -> Iterator[str]:
    """A real uvicorn server for `state` (a ServerState) on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    from llmcycle.serve.server import build_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(state, drain_timeout=drain_timeout), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise LlmcycleError("the server did not start.")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def smoke_test(model_dir: str | Path, prompts: list[str], concurrency: int = 4, max_tokens: int = 24) -> dict:
    from llmcycle.serve.async_engine import AsyncLLMEngine
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.server import ServerState

    if not prompts:
        raise LlmcycleError("serve smoke test: no prompts.")
    state = ServerState({"model": AsyncLLMEngine(LLMEngine(model_dir, kv_cache_bytes=32 * 2**20))})
    with serve_in_thread(state) as url:
        got = asyncio.run(_client(url, "model", prompts, concurrency, max_tokens))
    answers = got["answers"]
    tokens = sum(a["completion_tokens"] for a in answers) + got["plain"]["usage"]["completion_tokens"]
    counted = _metric(got["metrics"], "llmcycle:generation_tokens_total")
    ttfts = sorted(a["ttft_s"] for a in answers if a["ttft_s"] is not None)
    result = {
        "requests": len(answers),
        "concurrency": concurrency,
        "output_tokens_per_s": sum(a["completion_tokens"] for a in answers) / got["duration"],
        "ttft_median_s": ttfts[len(ttfts) // 2] if ttfts else None,
        "e2e_median_s": sorted(a["e2e_s"] for a in answers)[len(answers) // 2],
        "stream_equals_plain": answers[0]["text"] == got["plain"]["choices"][0]["message"]["content"],
        "metrics_match_usage": counted == tokens,
        "answers": [{k: a[k] for k in ("prompt", "text", "ttft_s", "e2e_s", "completion_tokens")} for a in answers],
    }
    if not (result["stream_equals_plain"] and result["metrics_match_usage"]):
        raise LlmcycleError(f"serve smoke test failed: streamed == plain: {result['stream_equals_plain']}, "
                            f"/metrics tokens {counted} vs responses {tokens}.")
    return result
