"""Pooling routes: /v1/embeddings from a served causal model (last token) and a masked-LM one (mean), checked
against the model's own hidden states and through the official `openai` client (base64 and float); a reward
model written as `llmcycle reward` writes it, served by `llmcycle serve` (no longer refused), answering
/v1/score, /classify and /pooling with the score its training computes; and the errors."""

import os
import socket
import subprocess
import sys

import httpx
import pytest
import torch

from conftest import make_serving_model, wait_until_healthy
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.model.transformer import Transformer
from llmcycle.serve.async_engine import AsyncLLMEngine
from llmcycle.serve.engine import LLMEngine
from llmcycle.serve.pooling import Pooler, is_reward_model
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.posttrain.chat_data import pair_ids

openai = pytest.importorskip("openai")
TEXTS = ["def add(a, b):", "import os", "class Point:\n    x: int"]


@pytest.fixture(scope="module")
def dirs(tiny_data, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pooling")
    causal = make_serving_model(tiny_data["tokenizer"], root / "causal")
    encoder = make_serving_model(tiny_data["tokenizer"], root / "mlm", seed=1)
    mlm = Transformer.from_pretrained(encoder)
    mlm.config.is_causal = False
    mlm.save_pretrained(encoder)
    reward = ScalarHeadModel.from_causal_lm(Transformer.from_pretrained(causal))
    torch.nn.init.normal_(reward.score.weight, std=0.5)
    reward.save_pretrained(root / "reward")
    Tokenizer.from_pretrained(causal).save_pretrained(root / "reward")
    return {"causal": causal, "mlm": encoder, "reward": str(root / "reward"), "tokenizer": tiny_data["tokenizer"]}


@pytest.fixture(scope="module")
def server(dirs):
    engines = {"m": AsyncLLMEngine(LLMEngine(dirs["causal"], block_size=4, num_blocks=128)),
               "enc": AsyncLLMEngine(LLMEngine(dirs["mlm"], block_size=4, num_blocks=128))}
    with serve_in_thread(ServerState(engines, poolers={"rm": Pooler.load_reward(dirs["reward"])})) as url:
        yield url


def _hidden(model_dir: str, text: str) -> torch.Tensor:
    model = Transformer.from_pretrained(model_dir).eval()
    ids = torch.tensor([Tokenizer.from_pretrained(model_dir).encode(text, add_special_tokens=True)])
    with torch.no_grad():
        return model(ids, return_hidden=True)[0].float()


def test_embeddings_are_the_pooled_hidden_states(server, dirs):
    client = openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0)
    r = client.embeddings.create(model="m", input=TEXTS)  # the client asks for base64 and decodes it
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 0
    for d, text in zip(r.data, TEXTS):
        expected = torch.nn.functional.normalize(_hidden(dirs["causal"], text)[-1], dim=0)  # last token
        assert torch.allclose(torch.tensor(d.embedding), expected, atol=1e-4)
    floats = httpx.post(server + "/v1/embeddings", json={"model": "m", "input": TEXTS[1], "encoding_format": "float"})
    assert torch.allclose(torch.tensor(floats.json()["data"][0]["embedding"]), torch.tensor(r.data[1].embedding),
                          atol=1e-6)
    enc = client.embeddings.create(model="enc", input=TEXTS[2]).data[0].embedding
    expected = torch.nn.functional.normalize(_hidden(dirs["mlm"], TEXTS[2]).mean(0), dim=0)  # mean over tokens
    assert torch.allclose(torch.tensor(enc), expected, atol=1e-4)
    # an embedding model scores a pair by cosine similarity
    s = httpx.post(server + "/v1/score", json={"model": "m", "text_1": TEXTS[0], "text_2": [TEXTS[0], TEXTS[1]]}).json()
    assert abs(s["data"][0]["score"] - 1.0) < 1e-4
    assert abs(s["data"][1]["score"] - float(torch.tensor(r.data[0].embedding) @ torch.tensor(r.data[1].embedding))) < 1e-4


def test_a_reward_model_scores_as_it_was_trained(server, dirs):
    model = ScalarHeadModel.from_pretrained(dirs["reward"]).eval()
    tok = Tokenizer.from_pretrained(dirs["reward"])
    prompts, answers = ["What is 2 + 3?", "What is 2 + 3?"], ["5", "6"]
    r = httpx.post(server + "/v1/score", json={"model": "rm", "text_1": prompts, "text_2": answers})
    assert r.status_code == 200, r.text
    got = [d["score"] for d in r.json()["data"]]
    with torch.no_grad():
        want = [float(model(torch.tensor([pair_ids(tok, p, a)]))[0, -1]) for p, a in zip(prompts, answers)]
    assert got == pytest.approx(want, abs=1e-4) and got[0] != got[1]
    c = httpx.post(server + "/classify", json={"model": "rm", "input": ["a b c"]}).json()["data"][0]
    p = httpx.post(server + "/pooling", json={"model": "rm", "input": "a b c"}).json()["data"][0]["data"]
    assert c["label"] == "LABEL_0" and c["probs"][0] == pytest.approx(float(torch.sigmoid(torch.tensor(p[0]))))
    assert is_reward_model(dirs["reward"]) and not is_reward_model(dirs["causal"])
    models = {m["id"]: m for m in httpx.get(server + "/v1/models").json()["data"]}
    assert models["rm"]["task"] == "reward" and "m" in models


def test_pooling_errors(server):
    cases = [
        ("/v1/completions", {"model": "rm", "prompt": "x"}, "reward model"),
        ("/v1/embeddings", {"model": "rm", "input": "x"}, "reward model"),
        ("/classify", {"model": "m", "input": "x"}, "classification head"),
        ("/v1/embeddings", {"model": "m", "input": "word " * 400}, "context"),
        ("/v1/embeddings", {"model": "m", "input": [[]]}, "empty"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 3}, "dimensions"),
        ("/v1/score", {"model": "rm", "text_1": ["a", "b"], "text_2": ["c"]}, "one length"),
        ("/v1/embeddings", {"model": "m", "input": [99999]}, "token ids"),
    ]
    for route, body, needle in cases:
        r = httpx.post(server + route, json=body)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], (route, body, r.text)
    r = httpx.post(server + "/v1/embeddings", json={"model": "nope", "input": "x"})
    assert r.status_code == 404
    r = httpx.post(server + "/v1/embeddings", json={"model": "m", "input": "x", "colour": 1})
    assert r.status_code == 422


def test_llmcycle_serve_loads_a_reward_model_directory(dirs):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle.cli", "serve", f"rm={dirs['reward']}", f"m={dirs['causal']}",
                             "--port", str(port), "--threads", "1", "--request-log", "off", "--log-level", "warning"],
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url)
        r = httpx.post(url + "/v1/score", json={"model": "rm", "text_1": "hi", "text_2": "hello"})
        assert r.status_code == 200 and isinstance(r.json()["data"][0]["score"], float)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "reward model 'rm'" in out, out
