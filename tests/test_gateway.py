"""Routing served names to upstream endpoints, tested against other llmcycle servers on loopback acting as
the upstreams (OpenAI- and Anthropic-compatible): answers equal to the upstream's own, streams passed on
(usage noted for the request log, kept from a client that did not ask for it), fallbacks on a refused
connection and on 429 (to the next deployment, then down the name's fallbacks to a local model), the
cool-down, errors passed through, keys required for upstream names too, and /v1/models."""

import contextlib
import socket

import httpx
import pytest
import torch

from conftest import make_serving_model
from llmcycle.serve.async_engine import AsyncLLMEngine
from llmcycle.serve.auth import KeyStore
from llmcycle.serve.engine import LLMEngine
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread
from llmcycle.serve.upstream import Router

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
CHAT = [{"role": "user", "content": "def add(a, b):"}]


def _engine(model_dir: str) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(model_dir, block_size=4, num_blocks=256))


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture(scope="module")
def world(tiny_data, tmp_path_factory, monkeypatch_module):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("gateway")
    up_model = make_serving_model(tiny_data["tokenizer"], root / "up")
    local_model = make_serving_model(tiny_data["tokenizer"], root / "local", seed=3)
    keys = KeyStore(root / "upstream-keys.sqlite")
    limited_key, _ = keys.create("gateway", requests_per_minute=1)
    monkeypatch_module.setenv("LIMITED_KEY", limited_key)
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(serve_in_thread(ServerState({"tiny": _engine(up_model)})))
        limited = stack.enter_context(serve_in_thread(ServerState({"tiny": _engine(up_model)}, keys=keys)))
        dead = f"http://127.0.0.1:{_dead_port()}/v1"
        router = Router.from_config([
            {"model": "cloud", "provider": "openai", "base_url": dead, "upstream_model": "tiny"},
            {"model": "cloud", "provider": "openai", "base_url": upstream + "/v1", "upstream_model": "tiny"},
            {"model": "claude", "provider": "anthropic", "base_url": upstream + "/v1", "upstream_model": "tiny"},
            {"model": "limited", "provider": "openai", "base_url": limited + "/v1", "upstream_model": "tiny",
             "api_key_env": "LIMITED_KEY"},
            {"model": "gone", "provider": "openai", "base_url": dead},
        ], fallbacks={"limited": ["local"]}, cooldown_s=60, allowed_fails=1)
        state = ServerState({"local": _engine(local_model)}, router=router)
        rows: list[dict] = []
        record = state.monitor.record
        state.monitor.record = lambda trace, status, error: rows.append(record(trace, status, error)) or rows[-1]
        gateway = stack.enter_context(serve_in_thread(state))
        yield {"gateway": gateway, "upstream": upstream, "rows": rows, "router": router}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_a_refused_deployment_falls_back_and_cools_down(world):
    direct = _client(world["upstream"]).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8,
                                                                temperature=0)
    via = _client(world["gateway"]).chat.completions.create(model="cloud", messages=CHAT, max_tokens=8, temperature=0)
    assert via.choices[0].message.content == direct.choices[0].message.content
    row = world["rows"][-1]
    assert row["model"] == "cloud" and row["variant"].endswith(world["upstream"] + "/v1") and row["status"] == 200
    assert (row["prompt_tokens"], row["completion_tokens"]) == (direct.usage.prompt_tokens, 8)
    dead = world["router"].deployments[0]
    assert dead.cool_until > 0  # skipped now: the next request goes straight to the live one
    assert world["router"].candidates("cloud")[0] is world["router"].deployments[1]


def test_streams_pass_through_with_their_usage(world):
    client = _client(world["gateway"])
    chunks = list(client.chat.completions.create(model="cloud", messages=CHAT, max_tokens=6, temperature=0, stream=True))
    assert all(c.choices for c in chunks)  # the usage chunk the gateway asked for is not passed on
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    direct = _client(world["upstream"]).chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
    assert text == direct.choices[0].message.content
    assert world["rows"][-1]["completion_tokens"] == 6 and world["rows"][-1]["stream"]
    chunks = list(client.chat.completions.create(model="cloud", messages=CHAT, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 6


def test_an_anthropic_upstream(world):
    client = anthropic.Anthropic(base_url=world["gateway"], api_key="x", max_retries=0)
    msg = client.messages.create(model="claude", max_tokens=5, messages=CHAT, extra_body={"temperature": 0})
    direct = anthropic.Anthropic(base_url=world["upstream"], api_key="x", max_retries=0).messages.create(
        model="tiny", max_tokens=5, messages=CHAT, extra_body={"temperature": 0})
    assert msg.content[0].text == direct.content[0].text and msg.usage.output_tokens == 5
    with client.messages.stream(model="claude", max_tokens=5, messages=CHAT, extra_body={"temperature": 0}) as s:
        assert s.get_final_message().content[0].text == direct.content[0].text
    assert (world["rows"][-1]["prompt_tokens"], world["rows"][-1]["completion_tokens"]) == (
        direct.usage.input_tokens, 5)
    r = httpx.post(world["gateway"] + "/v1/chat/completions", json={"model": "claude", "messages": CHAT})
    assert r.status_code == 400 and "/v1/messages" in r.json()["error"]["message"]


def test_429_falls_back_to_a_local_model_and_errors_pass_through(world):
    client = _client(world["gateway"])
    first = client.chat.completions.create(model="limited", messages=CHAT, max_tokens=4, temperature=0)
    assert first.usage.completion_tokens == 4 and world["rows"][-1]["variant"].startswith("openai:")
    second = client.chat.completions.create(model="limited", messages=CHAT, max_tokens=4, temperature=0)
    local = client.chat.completions.create(model="local", messages=CHAT, max_tokens=4, temperature=0)
    assert second.choices[0].message.content == local.choices[0].message.content  # answered here
    assert world["rows"][-2]["model"] == "local"
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="gone", messages=CHAT, max_tokens=4)
    assert e.value.status_code == 503 and "every deployment of `gone` failed" in str(e.value)
    # the upstream's own 400 comes back as it was (not retried elsewhere)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="cloud", messages=CHAT, max_tokens=100000)
    models = {m["id"]: m["owned_by"] for m in httpx.get(world["gateway"] + "/v1/models").json()["data"]}
    assert models["cloud"] == "openai" and models["claude"] == "anthropic" and models["local"] == "llmcycle"


def test_keys_guard_upstream_names(tiny_data, tmp_path):
    keys = KeyStore(tmp_path / "keys.sqlite")
    good, _ = keys.create("alice")
    model = make_serving_model(tiny_data["tokenizer"], tmp_path / "m")
    with serve_in_thread(ServerState({"tiny": _engine(model)})) as upstream:
        router = Router.from_config([{"model": "cloud", "provider": "openai", "base_url": upstream + "/v1",
                                      "upstream_model": "tiny"}], {}, 60, 1)
        with serve_in_thread(ServerState({}, keys=keys, router=router)) as gateway:
            body = {"model": "cloud", "messages": CHAT, "max_tokens": 2}
            assert httpx.post(gateway + "/v1/chat/completions", json=body).status_code == 401
            r = httpx.post(gateway + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {good}"})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
