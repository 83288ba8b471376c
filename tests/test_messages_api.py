"""Anthropic's Messages API on loopback, driven by the official `anthropic` client: plain and streamed
answers equal to the OpenAI chat route's for the same conversation, system prompts, stop sequences and
stop reasons, token counting, keys sent as x-api-key, errors in Anthropic's shape (also mid-stream), tool
use (forced calls whose input follows the schema, plain and streamed, tool results sent back) and
output_config's JSON schema."""

import json

import httpx
import pytest
import torch

from conftest import make_serving_model
from llmcycle.serve.async_engine import AsyncLLMEngine
from llmcycle.serve.auth import KeyStore
from llmcycle.serve.engine import LLMEngine
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

CHAT = [{"role": "user", "content": "def add(a, b):"}]
# The client of 2026 no longer sends sampling settings (Anthropic's newest models fix them); older clients
# and curl do, and the server takes them.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("messages") / "model")


def _engine(model_dir: str) -> AsyncLLMEngine:
    return AsyncLLMEngine(LLMEngine(model_dir, block_size=4, num_blocks=256))


@pytest.fixture(scope="module")
def server(model_dir):
    state = ServerState({"tiny": _engine(model_dir)})
    with serve_in_thread(state) as url:
        yield url, state


@pytest.fixture()
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key="unused", max_retries=0)


def _openai_chat(url: str, messages: list[dict], **kw) -> tuple[str, dict]:
    oa = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    r = oa.chat.completions.create(model="tiny", messages=messages, temperature=0, **kw)
    return r.choices[0].message.content, r.usage


def test_plain_and_streamed_answers_match_the_openai_route(server, client):
    url, _ = server
    expected, usage = _openai_chat(url, [{"role": "system", "content": "Be brief."}, *CHAT], max_tokens=12)
    msg = client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY, system="Be brief.", messages=CHAT)
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert msg.content[0].type == "text" and msg.content[0].text == expected
    assert msg.usage.input_tokens == usage.prompt_tokens and msg.usage.output_tokens == usage.completion_tokens
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    # the system prompt as text blocks renders the same prompt
    blocks = client.messages.create(model="tiny", max_tokens=12, extra_body=GREEDY, messages=CHAT,
                                    system=[{"type": "text", "text": "Be brief."}])
    assert blocks.content[0].text == expected
    with client.messages.stream(model="tiny", max_tokens=12, extra_body=GREEDY, system="Be brief.",
                                messages=CHAT) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected and final.content[0].text == expected
    assert final.usage.output_tokens == usage.completion_tokens and final.stop_reason == msg.stop_reason


def test_stream_events_come_in_anthropics_order(server):
    url, _ = server
    body = {"model": "tiny", "max_tokens": 6, "messages": CHAT, "stream": True, "temperature": 0}
    names = []
    with httpx.stream("POST", url + "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    deltas = names.count("content_block_delta")
    assert names == (["message_start", "ping", "content_block_start"] + ["content_block_delta"] * deltas
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert deltas >= 1


def test_stop_sequences_and_max_tokens_set_the_stop_reason(client):
    full = client.messages.create(model="tiny", max_tokens=16, extra_body=GREEDY, messages=CHAT)
    assert full.stop_reason == "max_tokens" and full.usage.output_tokens == 16
    text = full.content[0].text
    stop = next(text[i:i + 2] for i in range(1, len(text) - 1) if text[i:i + 2].strip())
    cut = client.messages.create(model="tiny", max_tokens=16, extra_body=GREEDY, messages=CHAT, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[:text.index(stop)]
    with client.messages.stream(model="tiny", max_tokens=16, extra_body=GREEDY, messages=CHAT,
                                stop_sequences=["never seen", stop]) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "stop_sequence" and streamed.stop_sequence == stop
    assert streamed.content[0].text == cut.content[0].text


def test_count_tokens_is_the_prompt_the_answer_bills(client):
    msg = client.messages.create(model="tiny", max_tokens=2, messages=CHAT, system="x")
    count = client.messages.count_tokens(model="tiny", messages=CHAT, system="x")
    assert count.input_tokens == msg.usage.input_tokens > 0


def test_errors_have_anthropics_shape(server, client):
    url, state = server
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="nope", max_tokens=4, messages=CHAT)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    cases = [
        ({"model": "tiny", "messages": CHAT}, "max_tokens"),                       # required, as in Anthropic's API
        ({"model": "tiny", "max_tokens": 4, "messages": CHAT, "temperature": 1.5}, "temperature"),
        ({"model": "tiny", "max_tokens": 4, "messages": []}, "messages"),
        ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]}, "role"),
        ({"model": "tiny", "max_tokens": 4, "messages": CHAT, "stop_sequence": ["x"]}, "stop_sequence"),
        ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "image"),
        ({"model": "tiny", "max_tokens": 100000, "messages": CHAT}, "context"),
        ({"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "word " * 400}]}, "context"),
    ]
    for body, needle in cases:
        r = httpx.post(url + "/v1/messages", json=body)
        assert r.status_code == 400, (body, r.text)
        err = r.json()
        assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error", err
        assert needle in err["error"]["message"], (needle, err)
    r = httpx.post(url + "/v1/messages", content=b"{oops", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/messages", json={"model": "tiny", "max_tokens": 2, "messages": CHAT},
                   headers={"anthropic-version": "yesterday"})
    assert r.status_code == 400 and "anthropic-version" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/messages")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):  # the client raises it for a stream too
        with client.messages.stream(model="tiny", max_tokens=100000, messages=CHAT) as s:
            s.get_final_message()


def test_a_failed_step_mid_stream_is_an_error_event(model_dir):
    eng = _engine(model_dir)
    with serve_in_thread(ServerState({"m": eng})) as url:
        real, calls = eng.engine.model.forward, {"n": 0}

        def broken(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # after the prefill and one decode: the stream has started
                raise RuntimeError("injected fault")
            return real(*a, **k)

        eng.engine.model.forward = broken
        client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as e:
            with client.messages.stream(model="m", max_tokens=8, extra_body=GREEDY, messages=CHAT) as s:
                s.get_final_message()
        assert "injected fault" in str(e.value)
        eng.engine.model.forward = real
        assert client.messages.create(model="m", max_tokens=3, messages=CHAT).usage.output_tokens == 3


def test_keys_come_as_x_api_key(model_dir, tmp_path):
    store = KeyStore(tmp_path / "keys.sqlite")
    good, _ = store.create("alice")
    with serve_in_thread(ServerState({"m": _engine(model_dir)}, keys=store)) as url:
        ok = anthropic.Anthropic(base_url=url, api_key=good, max_retries=0)
        assert ok.messages.create(model="m", max_tokens=2, messages=CHAT).usage.output_tokens == 2
        bearer = anthropic.Anthropic(base_url=url, auth_token=good, max_retries=0)  # Authorization: Bearer
        assert bearer.messages.create(model="m", max_tokens=2, messages=CHAT).usage.output_tokens == 2
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=url, api_key="llm-wrong", max_retries=0).messages.create(
                model="m", max_tokens=2, messages=CHAT)
        assert e.value.body["error"]["type"] == "authentication_error"
        # the OpenAI routes take the same header
        r = httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 1},
                       headers={"x-api-key": good})
        assert r.status_code == 200


# ---- tool use, structured output ---------------------------------------------------------------

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"name": "get_weather", "description": "The weather now", "input_schema": WEATHER}]


@pytest.fixture(scope="module")
def long_client(tiny_data, tmp_path_factory):
    """A model with room for the tool descriptions (the tiny tokenizer spends ~250 tokens on one)."""
    model = make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("tool_use") / "model",
                               max_positions=1024)
    with serve_in_thread(ServerState({"m": AsyncLLMEngine(LLMEngine(model, block_size=8, num_blocks=512))})) as url:
        yield anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)


def test_forced_tool_use_plain_and_streamed(long_client):
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    for choice in ({"type": "any"}, {"type": "tool", "name": "get_weather"}):
        msg = long_client.messages.create(model="m", max_tokens=200, messages=ask, tools=TOOLS, tool_choice=choice,
                                          extra_body=GREEDY)
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert msg.stop_reason == "tool_use" and uses and uses[0].name == "get_weather"
        assert uses[0].id.startswith("toolu_")
        jsonschema.validate(uses[0].input, WEATHER)
    with long_client.messages.stream(model="m", max_tokens=200, messages=ask, tools=TOOLS,
                                     tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use" and [b.input for b in final.content if b.type == "tool_use"] == [
        b.input for b in msg.content if b.type == "tool_use"]
    # the call and its result sent back: a turn the template renders and the model answers
    back = ask + [{"role": "assistant", "content": [b.model_dump() for b in msg.content]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "3 C"},
                                               {"type": "text", "text": "Thanks."}]}]
    reply = long_client.messages.create(model="m", max_tokens=5, messages=back, tools=TOOLS,
                                        tool_choice={"type": "none"}, extra_body=GREEDY)
    assert reply.stop_reason == "max_tokens" and reply.content[0].type == "text"
    count = long_client.messages.count_tokens(model="m", messages=back, tools=TOOLS)
    assert count.input_tokens == reply.usage.input_tokens
    with pytest.raises(anthropic.BadRequestError, match="server tools"):
        long_client.messages.create(model="m", max_tokens=5, messages=ask,
                                    tools=[{"type": "web_search_20250305", "name": "web_search"}])


def test_output_config_json_schema(long_client):
    msg = long_client.messages.create(model="m", max_tokens=200, messages=[{"role": "user", "content": "Where?"}],
                                      output_config={"format": {"type": "json_schema", "schema": WEATHER}},
                                      extra_body={"temperature": 1.0})
    assert msg.stop_reason == "end_turn"
    jsonschema.validate(json.loads(msg.content[0].text), WEATHER)
