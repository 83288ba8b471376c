"""The OpenAI-compatible server on loopback: the official `openai` client, streaming vs not, metrics that
match the requests exactly, OpenAI-shaped errors, API keys and rate limits, client disconnects, a bounded
queue, recovery from an internal error, several models, 64 concurrent streams, and SIGTERM draining."""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from conftest import make_serving_model, wait_until_healthy
from llmcycle.serve.async_engine import AsyncLLMEngine
from llmcycle.serve.auth import KeyStore
from llmcycle.serve.engine import LLM, LLMEngine
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("server") / "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(engines: dict[str, AsyncLLMEngine], keys: KeyStore | None = None):
    """A real uvicorn server on loopback in a thread; yields (base url, state)."""
    state = ServerState(engines, keys)
    with serve_in_thread(state) as url:
        yield url, state


def _engine(model_dir: str, **kw) -> AsyncLLMEngine:
    max_waiting = kw.pop("max_waiting", 256)
    return AsyncLLMEngine(LLMEngine(model_dir, **{"block_size": 4, "num_blocks": 256, **kw}), max_waiting=max_waiting)


def _idle(state: ServerState, timeout: float = 30.0) -> bool:
    """Every engine back to nothing running, nothing waiting, no KV block in use."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(e.engine.stats()["num_requests_running"] == 0 and e.engine.stats()["num_requests_waiting"] == 0
               and e.engine.block_manager.num_free_blocks == e.engine.block_manager.num_blocks
               and e.engine.num_requests == 0 for e in state.engines.values()):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def server(model_dir):
    with running({"tiny": _engine(model_dir), "tiny-b": _engine(model_dir, block_size=8)}) as (url, state):
        yield url, state


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# ---- the openai client ---------------------------------------------------------------------


def test_openai_client_completions_match_offline_engine(server, client, model_dir):
    prompts = ["def add(a, b):", "import os\nimport"]
    resp = client.completions.create(model="tiny", prompt=prompts, max_tokens=10, temperature=0)
    offline = LLM(model_dir, block_size=4, num_blocks=64).generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    assert [c.text for c in resp.choices] == [o.outputs[0].text for o in offline]
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.usage.completion_tokens == sum(len(o.outputs[0].token_ids) for o in offline)
    assert resp.usage.prompt_tokens == sum(len(o.prompt_token_ids) for o in offline)
    assert {m.id for m in client.models.list().data} == {"tiny", "tiny-b"}
    # the second model (another engine, other block size) gives the same greedy text
    other = client.completions.create(model="tiny-b", prompt=prompts, max_tokens=10, temperature=0)
    assert [c.text for c in other.choices] == [c.text for c in resp.choices]


def test_streamed_text_equals_non_streamed(server, client):
    for kwargs in [dict(temperature=0), dict(temperature=1.0, seed=7, top_p=0.9)]:
        full = client.completions.create(model="tiny", prompt="class Foo:", max_tokens=24, **kwargs)
        chunks = list(client.completions.create(model="tiny", prompt="class Foo:", max_tokens=24, stream=True,
                                                stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
        assert sum(1 for c in chunks if c.choices and c.choices[0].text) > 1  # really incremental
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    stream = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"


def test_stop_n_seed_and_logprobs(server, client):
    base = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=16, temperature=0).choices[0].text
    stop = base[len(base) // 2: len(base) // 2 + 2]
    assert stop.strip(), base
    cut = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"

    a = client.completions.create(model="tiny", prompt="x =", max_tokens=12, temperature=1.0, n=3, seed=11)
    b = client.completions.create(model="tiny", prompt="x =", max_tokens=12, temperature=1.0, n=3, seed=11)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # the n samples differ from each other

    lp = client.completions.create(model="tiny", prompt="x =", max_tokens=5, temperature=0, logprobs=3)
    info = lp.choices[0].logprobs
    assert len(info.tokens) == len(info.token_logprobs) == len(info.top_logprobs) == 5
    for _tok, tlp, top in zip(info.tokens, info.token_logprobs, info.top_logprobs):
        assert len(top) <= 3 and tlp <= 0
        assert max(top.values()) == pytest.approx(tlp)  # greedy: the chosen token is the most likely one
    assert "".join(info.tokens) == lp.choices[0].text

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)


# ---- metrics, errors ------------------------------------------------------------------------


def test_metrics_count_exactly_the_requests_sent(model_dir):
    with running({"m": _engine(model_dir)}) as (url, state):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        prompt_total = completion_total = 0
        for i in range(5):
            r = client.completions.create(model="m", prompt="def " * (i + 1), max_tokens=3 + i, temperature=0,
                                          stream=i % 2 == 1, **({"stream_options": {"include_usage": True}}
                                                                if i % 2 == 1 else {}))
            usage = list(r)[-1].usage if i % 2 == 1 else r.usage
            prompt_total += usage.prompt_tokens
            completion_total += usage.completion_tokens
        assert _idle(state)
        m = _metrics(url)
        assert m['llmcycle:prompt_tokens_total{model_name="m"}'] == prompt_total
        assert m['llmcycle:generation_tokens_total{model_name="m"}'] == completion_total
        success = sum(v for k, v in m.items() if k.startswith("llmcycle:request_success_total"))
        assert success == 5
        for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
            assert m[f'llmcycle:{h}_count{{model_name="m"}}'] == 5
        # one inter-token gap per token after the first of each request
        assert m['llmcycle:inter_token_latency_seconds_count{model_name="m"}'] == completion_total - 5
        assert m['llmcycle:num_requests_running{model_name="m"}'] == 0
        assert m['llmcycle:num_requests_waiting{model_name="m"}'] == 0
        assert m['llmcycle:kv_cache_usage_perc{model_name="m"}'] == 0
        assert m['llmcycle:prefix_cache_queries_total{model_name="m"}'] >= prompt_total - 5


def test_errors_have_the_openai_shape_and_name_the_problem(server):
    url, state = server
    cases = [
        (b"{not json", 400, "not valid JSON"),
        ({"model": "nope", "prompt": "a"}, 404, "nope"),
        ({"model": "tiny", "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
        ({"model": "tiny", "prompt": "a", "top_p": 1.5}, 400, "top_p"),
        ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"model": "tiny", "prompt": "word " * 200}, 400, "context"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 1000}, 400, "context"),
        ({"model": "tiny", "prompt": "a", "max_token": 3}, 422, "max_token"),
        ({"model": "tiny", "prompt": "a", "n": "two"}, 422, "n"),
        ({"prompt": "a"}, 422, "model"),
        ({"model": "tiny", "prompt": "a", "logit_bias": {"5": 1}}, 400, "logit_bias"),
        ([1, 2], 400, "JSON object"),
    ]
    for body, status, needle in cases:
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        r = httpx.post(url + "/v1/completions", **kw)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        code = "context_length_exceeded" if needle == "context" else status  # OpenAI's code for it
        assert needle in err["message"] and err["code"] == code and err["type"], (body, err)
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 422 and "role" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 422
    assert _idle(state)


def test_internal_error_is_500_and_the_server_keeps_serving(model_dir):
    eng = _engine(model_dir)
    with running({"m": eng}) as (url, state):
        real = eng.engine.model.forward
        calls = {"n": 0}

        def broken(*a, **k):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected fault")
            return real(*a, **k)

        eng.engine.model.forward = broken
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "a b", "max_tokens": 4})
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "a b", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert eng.num_step_errors == 1
        assert _idle(state)


# ---- keys, limits ---------------------------------------------------------------------------


def test_api_keys_and_rate_limits(model_dir, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    good, _ = store.create("alice")
    limited, _ = store.create("bob", requests_per_minute=2)
    revoked, _ = store.create("carol")
    store.revoke("carol")
    with running({"m": _engine(model_dir)}, keys=store) as (url, state):
        body = {"model": "m", "prompt": "a", "max_tokens": 2}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        for key in ("llm-wrong", revoked):
            r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # probes need no key
        ok = openai.OpenAI(base_url=url + "/v1", api_key=good, max_retries=0)
        assert ok.completions.create(model="m", prompt="a", max_tokens=2).usage.completion_tokens == 2
        hdr = {"Authorization": f"Bearer {limited}"}
        assert [httpx.post(url + "/v1/completions", json=body, headers=hdr).status_code for _ in range(2)] == [200, 200]
        r = httpx.post(url + "/v1/completions", json=body, headers=hdr)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "RateLimitError"
        store.revoke("alice")  # seen at once by the running server
        with pytest.raises(openai.AuthenticationError):
            ok.completions.create(model="m", prompt="a", max_tokens=2)


# ---- disconnects, queue, load ---------------------------------------------------------------


def _slow_engine(model_dir: str, seconds: float = 0.02, **kw) -> AsyncLLMEngine:
    """An engine whose every step also sleeps: a tiny model is too fast to catch a request mid-way."""
    eng = _engine(model_dir, **kw)
    real = eng.engine.model.forward

    def slow(*a, **k):
        time.sleep(seconds)
        return real(*a, **k)

    eng.engine.model.forward = slow
    return eng


def test_client_disconnect_aborts_and_frees_blocks(model_dir):
    with running({"tiny": _slow_engine(model_dir)}) as (url, state):
        for path, body in [("/v1/completions", {"prompt": "def"}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]:
            with httpx.stream("POST", url + path, json={"model": "tiny", "max_tokens": 100, "ignore_eos": True,
                                                        "stream": True, **body}) as r:
                lines = r.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(line.startswith("data: {") for line in got)
            assert _idle(state), "an abandoned stream kept its request or blocks"
            assert not state.metrics._seen  # nor its per-request metrics bookkeeping
        # a non-streamed request whose client gives up is aborted too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 100,
                                                      "ignore_eos": True}, timeout=0.3)
        assert _idle(state)
        # none of the three ran to the end: they were aborted, not finished
        assert not any(k.startswith("llmcycle:request_success_total") for k in _metrics(url))


def test_bounded_queue_answers_503(model_dir):
    eng = _slow_engine(model_dir, max_num_seqs=1, max_waiting=1)
    with running({"m": eng}) as (url, state):
        long = {"model": "m", "prompt": "a", "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=long) as first:
            lines = first.iter_lines()  # keep a reference: a collected iterator closes the stream
            next(lines)  # running
            waiting = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", timeout=60, json={
                "model": "m", "prompt": "b", "max_tokens": 2}))
            waiting.start()
            deadline = time.monotonic() + 10
            while eng.engine.scheduler.num_waiting < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "c", "max_tokens": 2})
            assert r.status_code == 503 and "queue is full" in r.json()["error"]["message"]
        waiting.join(30)
        assert _idle(state)


def test_64_concurrent_streaming_clients(server):
    url, state = server

    async def one(client: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"model": "tiny", "prompt": f"def f{i}(x):", "max_tokens": 12, "temperature": 0.8, "seed": i,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        text, usage = "", None
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    obj = json.loads(line[6:])
                    text += "".join(c["text"] for c in obj["choices"])
                    usage = obj.get("usage") or usage
                elif line == "data: [DONE]":
                    return text, usage["completion_tokens"]
        raise AssertionError("stream ended without [DONE]")

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - t0 < 60
    assert [n for _, n in results] == [12] * 64
    assert _idle(state)


# ---- SIGTERM --------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_drains_running_requests_then_exits(model_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle.cli", "serve", f"m={model_dir}", "--port", str(port),
                             "--threads", "1", "--log-level", "warning", "--max-n", "2", "--max-body-mb", "0.01"],
                            env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url)
        # the command's request limits reach the server
        assert httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "def", "n": 3}).status_code == 400
        assert httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "x" * 20_000}).status_code == 413
        body = {"model": "m", "prompt": "def", "max_tokens": 100, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(line)
                    if len(events) == 2:
                        proc.send_signal(signal.SIGTERM)
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 100  # the request finished in full
        # a clean drain exits 0 (uvicorn alone would re-raise the signal and die by it)
        assert proc.wait(30) == 0
        out = proc.stdout.read()
        assert re.search(r"model 'm' from", out), out
    finally:
        if proc.poll() is None:
            proc.kill()
