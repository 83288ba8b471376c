"""Hostile requests against a real server on loopback (each of these was once done to it): every one is
answered 4xx in OpenAI's error shape, none reaches the batch, and afterwards the server is healthy and
correct (the same greedy text, every gauge and KV block back to zero). Plus a bounded fuzz run over the
request schemas that /openapi.json publishes, a drain as SIGTERM starts it, and the 404/405/models surface."""

import asyncio
import collections
import json
import signal
import socket
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import _engine, _idle, _metrics, _slow_engine, running

from conftest import make_serving_model
from llmcycle.serve.protocol import RequestLimits
from llmcycle.serve.server import DrainingServer, ServerState, build_app

GREEDY = {"model": "tiny", "prompt": "def add(a, b):", "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("hostile") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    """One model, a 64 KiB body limit (so 413 needs no megabytes), the default other limits."""
    with running({"tiny": _engine(model_dir)}) as (url, state):
        state.limits = RequestLimits(max_body_bytes=64 * 2**10)
        reference = httpx.post(url + "/v1/completions", json=GREEDY).json()["choices"][0]["text"]
        yield url, state, reference


def _assert_healthy(url: str, state: ServerState, reference: str) -> None:
    """Healthy and correct: the same greedy text as before, nothing left running, every gauge at zero."""
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    r = httpx.post(url + "/v1/completions", json=GREEDY)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference
    assert _idle(state)
    m = _metrics(url)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert m[f'llmcycle:{gauge}{{model_name="tiny"}}'] == 0, gauge
    assert all(e.num_step_errors == 0 for e in state.engines.values())  # nothing ever failed a batch


def _raw(body: str) -> bytes:
    return body.encode()


def _nested(depth: int) -> bytes:
    return b'{"model": "tiny", "prompt": ' + b"[" * depth + b"]" * depth + b"}"


# (name, path, body: dict -> json, bytes -> sent as is, headers, status, needle in the message)
C, CHAT = "/v1/completions", "/v1/chat/completions"
CATALOGUE = [
    ("huge n", C, {"model": "tiny", "prompt": "a", "n": 100_000_000}, None, 400, "n must be <= 16"),
    ("200 prompts", C, {"model": "tiny", "prompt": ["a"] * 200}, None, 400, "at most 128 prompts"),
    ("huge best_of", C, {"model": "tiny", "prompt": "a", "best_of": 100_000_000}, None, 400, "best_of"),
    ("chat huge n", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "n": 10**9}, None,
     400, "n must"),
    ("top_k past int64", C, {"model": "tiny", "prompt": "a", "top_k": 10**20, "temperature": 1}, None, 400, "top_k"),
    ("top_k 1e20", C, _raw('{"model": "tiny", "prompt": "a", "top_k": 1e20}'), None, 422, "top_k"),
    ("seed past int64", C, {"model": "tiny", "prompt": "a", "seed": 2**63}, None, 400, "seed"),
    ("seed below int64", C, {"model": "tiny", "prompt": "a", "seed": -(2**63) - 1}, None, 400, "seed"),
    ("top_logprobs huge", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "logprobs": True,
                                 "top_logprobs": 10**30}, None, 400, "logprobs"),
    ("max_tokens huge", C, {"model": "tiny", "prompt": "a", "max_tokens": 10**30}, None, 400, "context"),
    ("token id huge", C, {"model": "tiny", "prompt": [10**30]}, None, 400, "token ids"),
    ("body over the limit", C, {"model": "tiny", "prompt": "a" * 70_000}, None, 413, "larger than"),
    ("50,000 stop strings", C, {"model": "tiny", "prompt": "a", "stop": ["x"] * 50_000}, None, 413, "larger"),
    ("17 stop strings", C, {"model": "tiny", "prompt": "a", "stop": [f"s{i}" for i in range(17)]}, None, 400,
     "at most 16"),
    ("long stop string", C, {"model": "tiny", "prompt": "a", "stop": "x" * 2000}, None, 400, "stop string"),
    ("many stop_token_ids", C, {"model": "tiny", "prompt": "a", "stop_token_ids": [1] * 2000}, None, 400,
     "stop_token_ids"),
    ("lone surrogate", C, _raw('{"model": "tiny", "prompt": "a\\ud800b"}'), None, 400, "surrogate"),
    ("lone surrogate in chat", CHAT, _raw('{"model": "tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'),
     None, 400, "surrogate"),
    ("lone surrogate in a key", C, _raw('{"model": "tiny", "prompt": "a", "\\ud800": 1}'), None, 400, "surrogate"),
    ("10,000 levels of nesting", C, _nested(10_000), None, 400, "nested"),
    ("100 levels of nesting", C, _nested(100), None, 400, "nested"),
    ("NaN", C, _raw('{"model": "tiny", "prompt": "a", "temperature": NaN}'), None, 400, "NaN"),
    ("Infinity", C, _raw('{"model": "tiny", "prompt": "a", "top_p": Infinity}'), None, 400, "Infinity"),
    ("-Infinity", C, _raw('{"model": "tiny", "prompt": "a", "presence_penalty": -Infinity}'), None, 400, "Infinity"),
    ("NaN as a string", C, {"model": "tiny", "prompt": "a", "temperature": "nan"}, None, 422, "temperature"),
    ("not UTF-8", C, b'{"model": "tiny", "prompt": "\xff\xfe"}', None, 400, "not valid JSON"),
    ("text/plain", C, _raw(json.dumps(GREEDY)), {"content-type": "text/plain"}, 415, "application/json"),
    ("form", CHAT, _raw("a=b"), {"content-type": "application/x-www-form-urlencoded"}, 415, "application/json"),
    ("no content type", C, _raw(json.dumps(GREEDY)), {"content-type": ""}, 415, "application/json"),
    ("content part with a number", CHAT, {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}, None, 422, "text"),
]


@pytest.mark.parametrize("name,path,body,headers,status,needle", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_hostile_request_is_a_4xx_in_openai_shape(server, name, path, body, headers, status, needle):
    url, state, reference = server
    kw = {"content": body, "headers": {"content-type": "application/json", **(headers or {})}} \
        if isinstance(body, bytes) else {"json": body}
    r = httpx.post(url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] and err["code"] in (status, "context_length_exceeded"), err
    _assert_healthy(url, state, reference)


def test_chunked_body_over_the_limit_is_413(server):
    """A chunked body has no Content-Length: the bytes are counted as they arrive."""
    url, state, reference = server

    def chunks():
        yield b'{"model": "tiny", "prompt": "'
        for _ in range(100):
            yield b"a" * 1024
        yield b'"}'

    r = httpx.post(url + C, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]["message"]
    _assert_healthy(url, state, reference)


def test_overlong_prompt_is_refused_from_its_bytes_without_tokenizing(server):
    url, state, reference = server
    eng = state.engines["tiny"].engine
    bound = state.bytes_per_token["tiny"]
    assert bound is not None and bound >= max(eng.tokenizer.token_bytes())
    calls = []
    real = eng.encode_prompt
    eng.encode_prompt = lambda p: calls.append(p) or real(p)
    try:
        text = "a" * (eng.max_model_len * bound + 1)  # provably more tokens than the context holds
        r = httpx.post(url + C, json={"model": "tiny", "prompt": text})
        chat = httpx.post(url + CHAT, json={"model": "tiny", "messages": [{"role": "user", "content": text}]})
    finally:
        del eng.encode_prompt
    for resp, param in ((r, "prompt"), (chat, "messages")):
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["code"] == "context_length_exceeded"
        assert resp.json()["error"]["param"] == param
    assert calls == []
    # a prompt under the bound but over the context is tokenized, then refused with the same code
    r = httpx.post(url + C, json={"model": "tiny", "prompt": "word " * 200})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    _assert_healthy(url, state, reference)


def test_tokenizing_a_long_prompt_does_not_stall_other_clients(model_dir):
    """With no byte bound (as for a WordPiece tokenizer) a long prompt is tokenized, but off the event
    loop: /health answers meanwhile."""
    with running({"tiny": _engine(model_dir)}) as (url, state):
        state.bytes_per_token["tiny"] = None
        eng = state.engines["tiny"].engine
        real = eng.encode_prompt
        started = threading.Event()

        def slow_encode(p):  # a tokenizer busy for a second, holding the GIL as a Python tokenizer would
            started.set()
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                sum(range(1000))
            return real(p)

        eng.encode_prompt = slow_encode
        result = {}
        t = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            url + C, json={"model": "tiny", "prompt": "word " * 200}, timeout=30)))
        t.start()
        assert started.wait(10)
        latencies = []
        for _ in range(5):
            t0 = time.monotonic()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            latencies.append(time.monotonic() - t0)
        t.join(30)
        del eng.encode_prompt
        assert result["r"].status_code == 400
        assert max(latencies) < 0.5, latencies


def test_bodies_are_parsed_and_validated_off_the_event_loop(server, monkeypatch):
    """A body of megabytes takes a while to parse, walk and validate: none of it on the event loop."""
    import llmcycle.serve.server as srv

    url, state, reference = server
    threads = []
    real = srv._check_tree
    def on_event_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:  # a worker thread (asyncio.to_thread's; named by asyncio or uvloop)
            return False

    monkeypatch.setattr(srv, "_check_tree", lambda *a: threads.append(on_event_loop()) or real(*a))
    r = httpx.post(url + C, json={"model": "tiny", "prompt": [1] * 10_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert threads == [False], threads
    _assert_healthy(url, state, reference)


# ---- a bounded fuzz run over the request schemas ---------------------------------------------------


@pytest.fixture(scope="module")
def schemas(server) -> dict:
    """The request schemas as the server publishes them."""
    spec = httpx.get(server[0] + "/openapi.json").json()
    components = spec["components"]["schemas"]
    out = {}
    for path in (C, CHAT):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        out[path] = components[ref.rsplit("/", 1)[1]]
    return out


# allow_subnormal=False: an earlier test in the same process may have set torch.set_flush_denormal(True)
# (training does), and hypothesis refuses to draw subnormals then; 1e-320 is in the typed pool anyway.
ANY = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_subnormal=False),
              st.text(max_size=20), st.sampled_from(["\ud800", "nan", "-1", "", "tiny", "user"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=8,
)


def _typed(prop: dict) -> st.SearchStrategy:
    """Values of the schema's own types (edges included) or of any type at all."""
    types = {s.get("type") for s in prop.get("anyOf", [prop])}
    pools = [ANY]
    if "integer" in types:
        pools.append(st.sampled_from([-1, 0, 1, 2, 17, 2**31, 2**63, -(2**63) - 1, 10**20]))
    if "number" in types:
        pools.append(st.sampled_from([0.0, 1e-320, 1e308, -2.5, 0.5, 1.0, float("nan"), float("inf")]))
    if "string" in types:
        pools.append(st.one_of(st.text(max_size=30), st.just("\ud800")))
    if "boolean" in types:
        pools.append(st.booleans())
    if "array" in types:
        pools.append(st.lists(st.one_of(st.text(max_size=5), st.integers(-5, 600)), max_size=20))
    return st.one_of(*pools)


@st.composite
def hostile_bodies(draw, schemas):
    path = draw(st.sampled_from([C, CHAT]))
    schema = schemas[path]
    body = {"model": "tiny", "max_tokens": 4}
    body.update({"prompt": "x = 1"} if path == C else {"messages": [{"role": "user", "content": "hi"}]})
    names = draw(st.lists(st.sampled_from(sorted(schema["properties"]) + ["bogus"]), max_size=4, unique=True))
    for name in names:
        body[name] = draw(_typed(schema["properties"].get(name, {})))
    return path, body


def test_fuzz_the_request_schemas_never_5xx(server, schemas):
    url, state, reference = server
    statuses = []
    with httpx.Client(base_url=url, timeout=60) as client:

        @settings(max_examples=100, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
        @given(hostile_bodies(schemas))
        def one(case):
            path, body = case
            content = json.dumps(body, allow_nan=True)  # NaN/Infinity literals on purpose
            r = client.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code < 500, (body, r.text)
            statuses.append(r.status_code)
            if r.status_code >= 400:
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            elif body.get("stream") is True:
                assert "InternalServerError" not in r.text and r.text.endswith("data: [DONE]\n\n"), r.text

        one()
    print(sorted(collections.Counter(statuses).items()))
    assert 200 in statuses and {400, 422} <= set(statuses)  # both served and refused bodies were tried
    _assert_healthy(url, state, reference)


# ---- routes, models, openapi ---------------------------------------------------------------------


def test_404_405_models_and_openapi(server, model_dir):
    url, _, _ = server
    r = httpx.get(url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404 and "/v1/nope" in r.json()["error"]["message"]
    r = httpx.get(url + C)
    assert r.status_code == 405 and r.json()["error"]["type"] == "MethodNotAllowedError"
    assert "POST" in r.headers["allow"]
    models = httpx.get(url + "/v1/models")
    assert model_dir not in models.text and "/" not in json.dumps([m["root"] for m in models.json()["data"]])
    assert models.json()["data"][0]["max_model_len"] == 128
    spec = httpx.get(url + "/openapi.json").json()
    comp = spec["components"]["schemas"]
    assert {"prompt", "n", "top_k", "seed", "stop"} <= set(comp["CompletionRequest"]["properties"])
    assert "messages" in comp["ChatCompletionRequest"]["properties"]
    for path in (C, CHAT):
        ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[1] in comp


# ---- draining -------------------------------------------------------------------------------------


def _draining_server(model_dir: str, seconds: float) -> tuple[DrainingServer, threading.Thread, str]:
    """A DrainingServer over a slowed engine, started in a thread; (server, thread, url)."""
    state = ServerState({"m": _slow_engine(model_dir, seconds=seconds)})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = DrainingServer(uvicorn.Config(build_app(state, drain_timeout=5), host="127.0.0.1", port=port,
                                           log_level="warning"), state, drain_timeout=30)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


STREAM = {"model": "m", "prompt": "def", "max_tokens": 60, "ignore_eos": True, "stream": True,
          "stream_options": {"include_usage": True}}


def test_drain_answers_503_finishes_streams_then_exits(model_dir):
    """What SIGTERM does (`handle_exit`, called here from the test thread): the listener stays up, new
    requests get 503 and /health "draining", the running stream completes, then the server stops."""
    server, thread, url = _draining_server(model_dir, seconds=0.02)
    state, body = server.state, STREAM
    events = []
    with httpx.stream("POST", url + C, json=body, timeout=60) as r:
        lines = r.iter_lines()
        while len(events) < 2:
            line = next(lines)
            if line.startswith("data:"):
                events.append(line)
        server.handle_exit(signal.SIGTERM, None)
        refused = httpx.post(url + C, json={"model": "m", "prompt": "a", "max_tokens": 2})
        health = httpx.get(url + "/health")
        assert state.engines["m"].num_in_flight == 1  # still running while the others were refused
        events += [line for line in lines if line.startswith("data:")]
    assert refused.status_code == 503 and refused.json()["error"]["type"] == "ServiceUnavailableError"
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 60
    thread.join(30)
    assert not thread.is_alive() and server.drained_cleanly is True


def test_a_second_signal_stops_at_once(model_dir):
    server, thread, url = _draining_server(model_dir, seconds=0.1)  # 60 tokens: 6 s
    t0 = time.monotonic()
    with httpx.stream("POST", url + C, json=STREAM, timeout=60) as r:
        lines = r.iter_lines()  # keep a reference: a collected iterator closes the stream
        next(line for line in lines if line.startswith("data:"))
        server.handle_exit(signal.SIGTERM, None)
        server.handle_exit(signal.SIGINT, None)
        thread.join(10)
    assert not thread.is_alive() and time.monotonic() - t0 < 5
    assert server.forced and not server.drained_cleanly
