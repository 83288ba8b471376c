"""Engine replicas on Ray Serve behind llmcycle's server: two replicas of one model on a local Ray, requests
spread over both, answers equal to an in-process engine's, and a replica killed (SIGKILL) while requests
run: every request still ends with all its tokens, the ones in flight sent again to the other replica."""

import asyncio
import json
import os
import signal
import time

import httpx
import pytest
import torch

from conftest import make_serving_model
from llmcycle.serve.engine import LLM
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.server import ServerState
from llmcycle.serve.smoke import serve_in_thread

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replicas(tiny_data, tmp_path_factory):
    from llmcycle.serve.ray_engine import deploy

    torch.set_num_threads(1)
    model = make_serving_model(tiny_data["tokenizer"], tmp_path_factory.mktemp("ray") / "model", max_positions=256)
    started = not ray.is_initialized()
    sets = deploy("m", model, {"block_size": 4, "num_blocks": 512}, {}, 64, 2, None, None, 0.5, 1)
    yield model, sets
    serve.delete("llmcycle-m")
    if started:
        serve.shutdown()
        ray.shutdown()


async def _pids(sets, want: int = 2, timeout: float = 60) -> dict[int, int]:
    """pid -> requests served, asking the deployment until `want` replicas answered."""
    seen: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        info = await sets.handle.info.remote()
        seen[info["pid"]] = info["requests"]
    return seen


def test_replicas_spread_requests_and_survive_a_kill(replicas):
    model, sets = replicas
    prompts = [f"def f{i}(x):" for i in range(12)]
    expected = [o.outputs[0].text for o in LLM(model, block_size=4, num_blocks=512).generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))]
    with serve_in_thread(ServerState({"m": sets})) as url:
        async def one(client: httpx.AsyncClient, p: str) -> dict:
            r = await client.post(url + "/v1/completions", json={"model": "m", "prompt": p, "max_tokens": 60,
                                                                 "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()

        async def main() -> list[dict]:
            async with httpx.AsyncClient(timeout=300) as client:
                first = await asyncio.gather(*(one(client, p) for p in prompts[:6]))
                spread = await _pids(sets)
                assert len(spread) == 2 and all(n > 0 for n in spread.values()), spread  # both served
                rest = [asyncio.create_task(one(client, p)) for p in prompts[6:]]
                await asyncio.sleep(0.5)  # the requests are on the replicas now
                os.kill(next(iter(spread)), signal.SIGKILL)
                return list(first) + list(await asyncio.gather(*rest))

        answers = asyncio.run(main())
    assert sets.num_retries > 0  # the kill hit requests in flight
    assert [a["usage"]["completion_tokens"] for a in answers] == [60] * 12  # none lost, none cut short
    assert [a["choices"][0]["text"] for a in answers] == expected


def test_a_stream_through_the_replicas(replicas):
    model, sets = replicas
    expected = LLM(model, block_size=4, num_blocks=512).generate(
        ["import os"], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))[0].outputs[0].text
    with serve_in_thread(ServerState({"m": sets})) as url:
        body = {"model": "m", "prompt": "import os", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
                "stream": True}
        text = ""
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
    assert text == expected
