"""The model registry, and a real server following it: versions pinned by content, aliases moved with an
audit record, a live switch (and rollback) without a restart or a failed request in flight, A/B splits
that are weighted and sticky per user, and feedback joined to its request."""

import asyncio
import json
import shutil
import time

import httpx
import pytest
import torch

from conftest import make_serving_model
from llmcycle.errors import LlmcycleError
from llmcycle.improve.registry import Registry
from llmcycle.monitor.audit import AuditLog
from llmcycle.monitor.request_log import RequestLog, connect
from llmcycle.serve.async_engine import AsyncLLMEngine
from llmcycle.serve.auth import KeyStore
from llmcycle.serve.engine import LLMEngine
from llmcycle.serve.registered import RegisteredModels
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread

PROMPT = "def main(argv):"


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory) -> tuple[str, str]:
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("registry_models")
    return (make_serving_model(tiny_data["tokenizer"], d / "a", seed=0),
            make_serving_model(tiny_data["tokenizer"], d / "b", seed=1))


def _greedy(model_dir: str, n: int = 8) -> str:
    from llmcycle.serve.engine import LLM
    from llmcycle.serve.sampling import SamplingParams

    out = LLM(model_dir, kv_cache_bytes=8 * 2**20).generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=n))
    return out[0].outputs[0].text


def test_versions_are_pinned_by_content_and_aliases_are_audited(models, tmp_path):
    a, b = models
    reg = Registry(tmp_path / "monitor.sqlite")
    src = tmp_path / "src"
    shutil.copytree(a, src)
    v1, new = reg.register("chat", src)
    assert new and v1.version == 1 and v1.path.endswith("registry/chat/v1")
    assert reg.register("chat", src) == (v1, False)  # the same content is the same version
    weights = (src / "model.safetensors").read_bytes()
    # the source is republished (replaced by rename, as every llmcycle stage publishes): v1 stays as it was
    tmp = tmp_path / "new.safetensors"
    shutil.copy2(f"{b}/model.safetensors", tmp)
    tmp.replace(src / "model.safetensors")
    assert open(f"{v1.path}/model.safetensors", "rb").read() == weights
    v2, new = reg.register("chat", src)
    assert new and v2.version == 2 and v2.content_hash != v1.content_hash
    assert reg.resolve("chat").version == 2  # no production alias yet: the newest
    assert reg.alias("chat", "production", 1) is None
    assert reg.resolve("chat").version == 1 and reg.resolve("chat@production").version == 1
    assert reg.alias("chat", "production", 2) == 1
    assert reg.resolve("chat@2") == v2
    with pytest.raises(LlmcycleError, match="no such alias"):
        reg.resolve("chat@staging")
    with pytest.raises(LlmcycleError, match="no version 7"):
        reg.alias("chat", "production", 7)
    with pytest.raises(LlmcycleError, match="no model 'nope'"):
        reg.resolve("nope")
    with pytest.raises(LlmcycleError, match="letters, digits"):
        reg.alias("chat", "12", 1)
    audit = AuditLog(tmp_path / "audit.sqlite")
    actions = [(r["action"], r["target"]) for r in audit.records()]
    assert actions == [("registry_register", "chat@1"), ("registry_register", "chat@2"),
                       ("registry_alias", "chat@production"), ("registry_alias", "chat@production")]
    assert json.loads(audit.records()[-1]["details"]) == {"version": 2, "previous": 1}
    assert audit.verify() == []


def _engine(path: str) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(path, block_size=4, num_blocks=256, max_num_seqs=32))


@pytest.fixture()
def registry_server(models, tmp_path):
    """A registry with both models (v1 production), and a server following `tiny` every 0.1 s."""
    a, b = models
    reg = Registry(tmp_path / "monitor.sqlite")
    reg.register("tiny", a)
    reg.register("tiny", b)
    reg.alias("tiny", "production", 1)
    registered = RegisteredModels(reg, ["tiny"], _engine, poll_s=0.1)
    registered.load()
    log = RequestLog(tmp_path / "monitor.sqlite", flush_interval=0.05)
    state = ServerState({}, request_log=log, store_text=True, registered=registered)
    with serve_in_thread(state) as url:
        yield {"url": url, "reg": reg, "state": state, "registered": registered, "log": log}


def _chat(url: str, user: str | None = None, max_tokens: int = 8, **extra) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0.0, **({"user": user} if user else {}), **extra}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_moving_an_alias_switches_live_without_failing_a_request_in_flight(registry_server):
    url, reg, registered = registry_server["url"], registry_server["reg"], registry_server["registered"]
    first = _chat(url)["choices"][0]["message"]["content"]
    models = httpx.get(url + "/v1/models").json()["data"]
    assert {"tiny", "tiny@1"} <= {m["id"] for m in models}

    async def long_stream() -> tuple[int, str, str | None]:
        body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 100,
                "temperature": 0.0, "ignore_eos": True, "stream": True}
        text, finish = "", None
        async with httpx.AsyncClient(timeout=60) as c, c.stream("POST", url + "/v1/chat/completions",
                                                                json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    ch = json.loads(line[6:])["choices"][0]
                    text += ch["delta"].get("content") or ""
                    finish = ch["finish_reason"] or finish
                    if len(text) > 5 and reg.resolve("tiny").version == 1:
                        reg.alias("tiny", "production", 2)  # moved while this stream is half-way
            return r.status_code, text, finish

    status, text, finish = asyncio.run(long_stream())
    assert status == 200 and finish == "length"
    _wait(lambda: registered.routes["tiny"]["keys"] == {"2": "tiny@2"})
    second = _chat(url)["choices"][0]["message"]["content"]
    assert second != first
    _wait(lambda: "tiny@1" not in registry_server["state"].engines)  # retired once nothing used it
    reg.alias("tiny", "production", 1)  # rollback: the alias back
    _wait(lambda: registered.routes["tiny"]["keys"] == {"1": "tiny@1"})
    assert _chat(url)["choices"][0]["message"]["content"] == first
    log = registry_server["log"]

    def variants() -> list[str]:
        return [r["variant"] for r in connect(log.path).execute(
            "SELECT variant FROM requests WHERE route = '/v1/chat/completions' ORDER BY id")]

    _wait(lambda: len(variants()) >= 4)  # the writer flushes every 50 ms
    assert variants() == ["1", "1", "2", "1"]


def test_a_version_that_fails_to_load_leaves_the_old_one_serving(registry_server, tmp_path):
    url, reg, registered = registry_server["url"], registry_server["reg"], registry_server["registered"]
    first = _chat(url)["choices"][0]["message"]["content"]
    broken = tmp_path / "broken"
    shutil.copytree(reg.version("tiny", 1).path, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    v3, _ = reg.register("tiny", broken)
    reg.alias("tiny", "production", v3.version)
    time.sleep(1.0)  # several reads of the registry, each failing to load v3
    assert registered.routes["tiny"]["keys"] == {"1": "tiny@1"}
    assert _chat(url)["choices"][0]["message"]["content"] == first
    reg.alias("tiny", "production", 2)  # a good version still switches
    _wait(lambda: registered.routes["tiny"]["keys"] == {"2": "tiny@2"})


def test_an_ab_split_is_weighted_and_sticky_per_user(registry_server):
    url, reg, registered = registry_server["url"], registry_server["reg"], registry_server["registered"]
    reg.alias("tiny", "challenger", 2)
    reg.set_split("tiny", {"production": 70, "challenger": 30})
    _wait(lambda: set(registered.routes["tiny"]["keys"]) == {"1", "2"})
    users = [f"user-{i}" for i in range(200)]

    async def send(us: list[str]) -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as c:
            sem = asyncio.Semaphore(16)

            async def one(u: str) -> dict:
                async with sem:
                    r = await c.post(url + "/v1/chat/completions", json={
                        "model": "tiny", "user": u, "max_tokens": 1,
                        "messages": [{"role": "user", "content": PROMPT}]})
                    assert r.status_code == 200
                    return r.json()
            return await asyncio.gather(*(one(u) for u in us))

    asyncio.run(send(users))
    asyncio.run(send(users[:50]))  # the same users again
    log = registry_server["log"]
    _wait(lambda: log.written >= 250)
    rows = connect(log.path).execute("SELECT \"user\", variant FROM requests WHERE \"user\" IS NOT NULL").fetchall()
    by_user: dict[str, set] = {}
    for user, variant in rows:
        by_user.setdefault(user, set()).add(variant)
    assert all(len(v) == 1 for v in by_user.values())  # one user, one variant
    share = sum(v == {"1"} for v in by_user.values()) / len(by_user)
    assert abs(share - 0.7) < 4 * (0.7 * 0.3 / 200) ** 0.5
    ab = httpx.get(url + "/dashboard/data").json()["ab"]  # the dashboard's A/B table: both arms, a verdict
    assert {r["variant"] for r in ab} == {"1", "2"} and sum(r["requests"] for r in ab) == 250
    assert {r["verdict"] for r in ab} == {"control", "not enough data"}  # no feedback was given
    reg.end_split("tiny")
    _wait(lambda: registered.routes["tiny"]["keys"] == {"1": "tiny@1"})


def test_feedback_joins_its_request_and_bad_feedback_is_a_400(registry_server):
    url = registry_server["url"]
    rid = _chat(url, user="u1")["id"]
    ok = httpx.post(url + "/v1/feedback", json={"request_id": rid, "thumbs": "up", "comment": "good"})
    assert ok.status_code == 200, ok.text
    assert httpx.post(url + "/v1/feedback", json={"request_id": rid, "score": 2}).status_code == 200
    for body, status in [({"request_id": rid}, 400), ({"request_id": rid, "score": 9}, 400),
                         ({"request_id": rid, "thumbs": "sideways"}, 400), ({"score": 5}, 400),
                         ({"request_id": rid, "score": 5, "extra": 1}, 400), ([1, 2], 400),
                         ({"request_id": "chatcmpl-unknown", "score": 5}, 404)]:
        r = httpx.post(url + "/v1/feedback", json=body)
        assert r.status_code == status, (body, r.text)
        assert "message" in r.json()["error"]
    bad = httpx.post(url + "/v1/feedback", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    log = registry_server["log"]
    _wait(lambda: log.written >= 3)
    rows = log.store.rows("SELECT r.variant, f.thumbs, f.score, f.positive, f.comment FROM feedback f "
                          "JOIN requests r ON r.request_id = f.request_id ORDER BY f.id")
    assert rows == [{"variant": "1", "thumbs": 1, "score": None, "positive": 1, "comment": "good"},
                    {"variant": "1", "thumbs": None, "score": 2, "positive": 0, "comment": None}]


def test_with_keys_a_user_rates_only_its_own_requests(models, tmp_path):
    keys = KeyStore(tmp_path / "keys.sqlite")
    alice, _ = keys.create("alice")
    bob, _ = keys.create("bob")
    annotator, _ = keys.create("ann", role="annotator")
    log = RequestLog(tmp_path / "requests.sqlite", flush_interval=0.05)
    state = ServerState({"m": _engine(models[0])}, keys, request_log=log)
    from llmcycle.improve.labels import Labels

    state.labels = Labels(log.store)
    state.labels.add_items([{"prompt": "p", "a": "x", "b": "y"}])
    with serve_in_thread(state) as url:
        ann = {"Authorization": f"Bearer {annotator}"}
        item = httpx.get(url + "/v1/label/next", headers=ann).json()["item"]
        assert {c["id"] for c in item["completions"]} == {"a", "b"}
        assert httpx.get(url + "/v1/label/next", headers={"Authorization": f"Bearer {alice}"}).status_code == 403
        bad = httpx.post(url + "/v1/label", headers=ann, json={"item_id": item["item_id"], "choice": "left"})
        assert bad.status_code == 400 and "choice" in bad.json()["error"]["message"]
        assert httpx.post(url + "/v1/label", headers=ann, json={"item_id": item["item_id"], "choice": "b"}).json() == \
            {"ok": True}
        assert httpx.get(url + "/v1/label/next", headers=ann).json() == {"item": None}
        assert state.labels.store.rows("SELECT annotator, choice FROM labels") == [{"annotator": "ann", "choice": "b"}]
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {alice}"},
                       json={"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        rid = r.json()["id"]
        fb = {"request_id": rid, "thumbs": "down"}
        assert httpx.post(url + "/v1/feedback", json=fb).status_code == 401
        assert httpx.post(url + "/v1/feedback", json=fb, headers={"Authorization": f"Bearer {bob}"}).status_code == 404
        assert httpx.post(url + "/v1/feedback", json=fb,
                          headers={"Authorization": f"Bearer {alice}"}).status_code == 200
        # an annotator key labels and rates, but may not generate
        assert httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {annotator}"},
                          json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code == 403


def test_a_server_on_an_unknown_registry_name_fails_at_startup(models, tmp_path):
    reg = Registry(tmp_path / "monitor.sqlite")
    with pytest.raises(LlmcycleError, match="no model 'ghost'"):
        RegisteredModels(reg, ["ghost"], _engine).load()
