"""The chat page at `/` driven by headless Chromium against a real server on loopback: models listed,
a greedy streamed reply equal to the non-streamed API's, incremental rendering, Stop, errors, API key,
a default max tokens that fits the context, and a conversation trimmed when it outgrows the context."""

import socket
import threading
import time

import httpx
import pytest
import torch

from conftest import make_serving_model

PROMPT = "Tell me a story about a cat."
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def model_dir(tiny_data, tmp_path_factory) -> str:
    torch.set_num_threads(1)
    return make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("chat_page") / "model",
                              max_positions=256)


@pytest.fixture(scope="module")
def server(model_dir):
    """A real uvicorn server in a thread; yields (base url, engine, slow) where setting `slow` makes
    every engine step sleep, so a stream lasts long enough to be stopped half-way."""
    import uvicorn

    from llmcycle.serve.async_engine import AsyncLLMEngine
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.server import ServerState, build_app

    engine = LLMEngine(model_dir, block_size=4, num_blocks=64)
    slow = threading.Event()
    step = engine.step

    def slow_step():
        if slow.is_set():
            time.sleep(0.05)
        return step()

    engine.step = slow_step
    app = build_app(ServerState({"tiny": AsyncLLMEngine(engine)}), drain_timeout=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine, slow
    srv.should_exit = True
    thread.join(timeout=15)


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 900, "height": 640})
    p = ctx.new_page()
    p.set_default_timeout(15_000)
    p.goto(server[0] + "/")
    p.wait_for_function("document.querySelectorAll('#model option').length > 0")
    yield p
    ctx.close()


def _send(page, text: str, temperature: str = "0", max_tokens: str = str(MAX_TOKENS)) -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-tokens", max_tokens)
    page.fill("#prompt", text)
    page.click("#send")


def _wait_idle(page) -> None:
    page.wait_for_function("!document.querySelector('#send').disabled && !document.querySelector('.pending')")


def _record_assistant_text(page) -> None:
    """Record every text the (next) assistant message shows, however the mutations are batched."""
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver((records) => {
            for (const r of records)
                for (const n of r.addedNodes)
                    if (n.nodeType === Node.TEXT_NODE && n.parentElement?.matches('.msg.assistant'))
                        window.seen.push(n.data);
        }).observe(document.querySelector('#messages'), {childList: true, subtree: true});
    }""")


def test_page_streams_the_same_greedy_reply_as_the_api(page, server):
    base = server[0]
    assert page.title() == "llmcycle chat"
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny"]
    _record_assistant_text(page)
    _send(page, PROMPT)
    _wait_idle(page)

    msgs = page.eval_on_selector_all("#messages > .msg", "ms => ms.map(m => [m.className, m.textContent])")
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0,
            "max_tokens": MAX_TOKENS}
    ref = httpx.post(base + "/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"]["content"]
    assert ref.strip(), "the tiny model's greedy reply should not be empty"
    assert msgs == [["msg user", PROMPT], ["msg assistant", ref]]
    assert page.text_content("#error") == ""
    seen = [s for s in page.evaluate("window.seen") if s]
    assert len(set(seen)) > 1 and seen[-1] == ref  # rendered chunk by chunk, growing to the full reply
    assert all(ref.startswith(s) for s in seen)
    page.screenshot(path="/tmp/chat_page.png")

    # The second turn sends the whole conversation, the first reply included.
    with page.expect_request("**/v1/chat/completions") as req:
        page.fill("#prompt", "And then?")
        page.press("#prompt", "Enter")  # Enter sends
    _wait_idle(page)
    assert req.value.post_data_json["messages"] == [
        {"role": "user", "content": PROMPT}, {"role": "assistant", "content": ref},
        {"role": "user", "content": "And then?"}]
    assert page.eval_on_selector_all("#messages > .msg", "ms => ms.map(m => m.className)") == [
        "msg user", "msg assistant", "msg user", "msg assistant"]


def test_shift_enter_is_a_newline_and_system_prompt_is_sent(page):
    page.click("summary")  # the system prompt sits in a collapsed <details>
    page.fill("#system", "Be brief.")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "2")
    page.fill("#prompt", "one")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "two")
    assert page.input_value("#prompt") == "one\ntwo"
    assert page.eval_on_selector_all("#messages > .msg", "ms => ms.length") == 0
    with page.expect_request("**/v1/chat/completions") as req:
        page.click("#send")
    _wait_idle(page)
    sent = req.value.post_data_json
    assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "one\ntwo"}]
    assert (sent["stream"], sent["temperature"], sent["max_tokens"], sent["model"]) == (True, 0, 2, "tiny")


def test_stop_aborts_the_stream(page, server):
    _, engine, slow = server
    slow.set()  # ~50 ms per token: 200 tokens would take ~10 s
    try:
        _send(page, PROMPT, max_tokens="200")
        page.wait_for_function("document.querySelector('.msg.assistant')?.textContent.length > 0")
        assert page.is_enabled("#stop") and page.is_disabled("#send")
        t0 = time.monotonic()
        page.click("#stop")
        _wait_idle(page)
        assert time.monotonic() - t0 < 3
        partial = page.text_content(".msg.assistant")
        assert partial and page.text_content("#error") == "" and page.is_disabled("#stop")
        deadline = time.monotonic() + 5  # the server notices the disconnect and aborts the request
        while engine.num_requests and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.num_requests == 0
    finally:
        slow.clear()
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "temperature": 0, "max_tokens": 200}
    full = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30).json()["choices"][0]["message"]
    assert full["content"].startswith(partial) and len(partial) < len(full["content"])  # cut off mid-reply
    assert page.eval_on_selector_all("#messages > .msg", "ms => ms.map(m => m.className)") == [
        "msg user", "msg assistant"]  # the stopped reply stays in the conversation


def test_server_error_is_shown_and_the_turn_taken_back(page, server):
    base = server[0]
    page.fill("#api-key", "sk-test-123")
    page.dispatch_event("#api-key", "change")
    with page.expect_request("**/v1/chat/completions") as req:
        _send(page, PROMPT, max_tokens="-1")
    _wait_idle(page)
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": -1, "stream": True}
    resp = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert resp.status_code == 400
    assert page.text_content("#error") == resp.json()["error"]["message"]
    assert "max_tokens" in page.text_content("#error")
    assert page.eval_on_selector_all("#messages > .msg", "ms => ms.length") == 0
    assert page.input_value("#prompt") == PROMPT  # put back for editing
    # The API key is kept for the tab's session and sent as a bearer token.
    assert req.value.headers["authorization"] == "Bearer sk-test-123"
    assert page.evaluate("sessionStorage.getItem('llmcycle-api-key')") == "sk-test-123"


def test_default_max_tokens_fits_and_a_long_conversation_is_trimmed(page, model_dir):
    """Max tokens is left to the server by default (the context minus the prompt), so the first message
    works; when the conversation outgrows the context the oldest exchanges stop being sent, visibly."""
    from llmcycle.tokenizer import Tokenizer

    assert page.input_value("#max-tokens") == ""
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.fill("#temperature", "0")
    page.fill("#prompt", "hi")
    page.click("#send")
    _wait_idle(page)
    assert page.text_content("#error") == "" and page.text_content("#notice") == ""
    assert "max_tokens" not in sent[0]  # auto: the server's default, what the context leaves
    assert page.text_content(".msg.assistant")

    tok = Tokenizer.from_pretrained(model_dir)
    long = "the cat sat on the mat. " * 4
    while len(tok.encode(long)) < 90:  # three such turns do not fit a 256-token context
        long += "the cat sat on the mat. "
    page.fill("#max-tokens", "8")
    for i in range(3):
        page.fill("#prompt", f"{i} {long}")
        page.click("#send")
        _wait_idle(page)
        assert page.text_content("#error") == "", page.text_content("#error")
    assert "context of 256 tokens" in page.text_content("#notice")
    last = sent[-1]["messages"]
    assert last[-1] == {"role": "user", "content": f"2 {long}".strip()} and last[0]["role"] == "user"
    assert all(m["content"] != "hi" for m in last)
    shown = page.eval_on_selector_all("#messages > .msg", "ms => ms.map(m => m.className)")
    n_dropped = sum("dropped" in c for c in shown)
    assert n_dropped >= 2 and f"the {n_dropped} oldest messages" in page.text_content("#notice")
    assert len(shown) - n_dropped == len(last) + 1  # what is sent is what is not faded, plus the reply


def test_thumbs_under_an_answer_and_the_labelling_page(browser, model_dir, tmp_path):
    """The chat page's thumbs reach /v1/feedback joined to the answer's request; the labelling page shows an
    item and records the choice of the side clicked."""
    from llmcycle.improve.labels import Labels
    from llmcycle.monitor.request_log import RequestLog
    from llmcycle.serve.async_engine import AsyncLLMEngine
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.server import ServerState
    from llmcycle.serve.smoke import serve_in_thread

    log = RequestLog(tmp_path / "requests.sqlite", flush_interval=0.05)
    state = ServerState({"tiny": AsyncLLMEngine(LLMEngine(model_dir, block_size=4, num_blocks=64))}, request_log=log)
    state.labels = Labels(log.store)
    state.labels.add_items([{"prompt": "Which is larger, 3 or 5?", "a": "5", "b": "3"}])
    with serve_in_thread(state) as url:
        ctx = browser.new_context()
        p = ctx.new_page()
        p.set_default_timeout(15_000)
        p.goto(url + "/")
        p.wait_for_function("document.querySelectorAll('#model option').length > 0")
        _send(p, PROMPT, max_tokens="4")
        _wait_idle(p)
        p.click(".feedback button[data-thumbs='down']")
        p.wait_for_function("document.querySelector('.feedback').textContent.includes('marked bad')")
        deadline = time.monotonic() + 10
        rows = []
        while not rows and time.monotonic() < deadline:  # the answer's row: written within 50 ms
            time.sleep(0.05)
            rows = log.store.rows("SELECT f.thumbs, r.route FROM feedback f "
                                  "JOIN requests r ON r.request_id = f.request_id")
        assert rows == [{"thumbs": 0, "route": "/v1/chat/completions"}]
        p.goto(url + "/label?annotator=ann")  # keys are off: the annotator names itself
        p.wait_for_selector("text=Which is larger, 3 or 5?")
        left = p.text_content("#left") == "5"
        p.keyboard.press("1")  # left is better
        p.wait_for_selector("text=Nothing left")
        ctx.close()
    labels = state.labels.store.rows("SELECT annotator, choice FROM labels")
    assert labels == [{"annotator": "ann", "choice": "a" if left else "b"}]
