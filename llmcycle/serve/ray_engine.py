"""Engine replicas on Ray Serve: one served model, several engines (on one machine or a Ray cluster).

`llmcycle serve DIR --ray-replicas 2` (or `ray_autoscaling: {min_replicas, max_replicas,
target_ongoing_requests}` in a recipe) runs each model's `LLMEngine` as a Ray Serve deployment,
`EngineReplica`, instead of in the server's process. The HTTP server stays llmcycle's own (the same API,
keys, limits, request log, metrics); for each model it holds a `ReplicaSet`, which the routes use as they
use an `AsyncLLMEngine`: requests are checked and tokenized here, then sent through the deployment's
handle, and Ray Serve routes each to a replica by its queue (power of two choices on ongoing requests) and,
with autoscaling, adds or removes replicas as the ongoing requests per replica move away from the target.

A replica that dies takes its requests with it; the `ReplicaSet` sends each again, to a live replica, up to
`retries` times, and passes on only the tokens the client has not seen yet. So that the tokens sent again
are the same ones, every sampled request carries a seed (one is drawn for a request that has none): the
engine's per-sequence generators then replay the same draws. (A replica's batch may still differ in the
last bits of a reduction from the dead one's; with random weights and a wide margin the tests see the same
tokens.)

For a Ray cluster: start it (`ray start --head` on one machine, `ray start --address HEAD:6379` on the
others) and give `ray_address: auto`; replicas are placed on any node with a free CPU (`ray_num_cpus` each),
and every node needs the model directory at the same path (or a shared file system).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from llmcycle.errors import LlmcycleError
from llmcycle.model.config import ModelConfig
from llmcycle.model.hf_io import generation_eos_ids
from llmcycle.serve.async_engine import AsyncLLMEngine, EngineStepError, EngineUnavailable
from llmcycle.serve.engine import LLMEngine
from llmcycle.serve.guided import GuidedDecoding
from llmcycle.serve.output_processor import RequestOutput
from llmcycle.serve.sampling import SamplingParams
from llmcycle.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def _require_ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise LlmcycleError("engine replicas need Ray Serve: pip install 'llmcycle[ray]'") from None
    return ray, serve


class EngineReplica:
    """One engine in a Ray Serve replica (the deployment's class)."""

    def __init__(self, model_dir: str, engine_args: dict, lora_modules: dict[str, str], max_waiting: int,
                 threads: int | None) -> None:
        from llmcycle.threads import set_threads

        set_threads(threads)
        self.engine = AsyncLLMEngine(LLMEngine(model_dir, lora_modules=lora_modules, **engine_args),
                                     max_waiting=max_waiting).start()
        self.requests = 0

    async def generate(self, ids: list[int], params: SamplingParams, request_id: str,
                       lora_name: str | None) -> AsyncIterator[RequestOutput]:
        self.requests += 1
        async for out in self.engine.generate(ids, params, request_id=request_id, lora_name=lora_name):
            yield out

    def info(self) -> dict:
        """Which process this is and what it served (tests kill one and see requests spread)."""
        return {"pid": os.getpid(), "requests": self.requests, **self.engine.engine.stats()}


class EngineInfo:
    """What the server reads of an engine whose replicas run elsewhere: the tokenizer, the context and the
    request checks (`LLMEngine`'s own, on the config alone, no weights)."""

    drafter = None  # speculative decoding is a replica's setting; structured outputs check for it here

    def __init__(self, model_dir: str | Path, lora_names: list[str]) -> None:
        self.model_dir = str(model_dir)
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        config = ModelConfig.from_json_file(Path(model_dir) / "config.json")
        self.vocab_size, self.max_model_len = config.vocab_size, config.max_position_embeddings
        self.eos_id = self.tokenizer.eos_id
        self.extra_stop_ids = [i for i in generation_eos_ids(model_dir) if i != self.eos_id]
        self.lora_names = list(lora_names)
        self._guided: GuidedDecoding | None = None

    encode_prompt = LLMEngine.encode_prompt
    check_length = LLMEngine.check_length
    prepare = LLMEngine.prepare
    _grammar = LLMEngine._grammar

    def guided(self) -> GuidedDecoding:
        if self._guided is None:
            stops = sorted({*self.tokenizer.end_of_turn_ids, *self.extra_stop_ids})
            self._guided = GuidedDecoding(self.tokenizer.backend.to_str(), self.vocab_size, stops)
        return self._guided

    def stats(self) -> dict[str, float]:
        return {}  # the replicas' gauges are Ray Serve's (its dashboard and metrics)


class ReplicaSet:
    """An `AsyncLLMEngine` look-alike over a Ray Serve deployment of `EngineReplica`s."""

    def __init__(self, handle: Any, info: EngineInfo, retries: int = 3) -> None:
        self.handle, self.engine, self.retries = handle, info, retries
        self.on_output = None  # set by the server, as for an AsyncLLMEngine
        self.on_abort = None
        self.num_step_errors = 0
        self.num_retries = 0  # requests sent again after their replica died
        self._in_flight = 0
        self._draining = False

    def start(self) -> ReplicaSet:
        self._draining = False  # a server (re)starting takes requests: the replicas live on between servers
        return self

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self._draining = True
        waited = 0.0
        while drain and self._in_flight and (timeout is None or waited < timeout):
            await asyncio.sleep(0.05)
            waited += 0.05

    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        return self.engine.prepare(prompt, params)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        ray, _ = _require_ray()
        ids = self.prepare(prompt, params)
        if lora_name is not None and lora_name not in self.engine.lora_names:
            raise LlmcycleError(f"unknown LoRA adapter {lora_name!r}.")
        if self._draining:
            raise EngineUnavailable("the server is shutting down and takes no new requests.")
        if params.seed is None and not params.greedy:  # a retry on another replica replays the same draws
            params = replace(params, seed=random.getrandbits(62))
        rid = request_id or f"req-{random.getrandbits(48):x}"
        delivered, failures = -1, 0
        self._in_flight += 1
        try:
            while True:
                stream = self.handle.options(stream=True).generate.remote(ids, params, rid, lora_name)
                try:
                    async for out in stream:
                        seen = sum(len(c.token_ids) for c in out.outputs)
                        if seen <= delivered and not out.finished:
                            continue  # sent again after a replica died: the client has these tokens
                        delivered = max(delivered, seen)
                        if self.on_output is not None:
                            self.on_output(out)
                        yield out
                    return
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
                    failures += 1
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    if failures > self.retries:
                        raise EngineStepError(f"the replicas failed {failures} times: {reason}") from None
                    self.num_retries += 1
                    log.warning("request %s: its replica failed (%s); sending it to another", rid, reason)
                finally:
                    stream.cancel()  # a client gone aborts the request on its replica
        finally:
            self._in_flight -= 1


def deploy(name: str, model_dir: str, engine_args: dict, lora_modules: dict[str, str], max_waiting: int,
           replicas: int, autoscaling: dict | None, address: str | None, num_cpus: float,
           threads: int | None) -> ReplicaSet:
    """Start (or join) Ray, run `model_dir`'s engine as a Serve deployment of `replicas` replicas (or
    autoscaled), and return the set the server routes to."""
    ray, serve = _require_ray()
    if not ray.is_initialized():
        from llmcycle.threads import usable_cpus

        kwargs: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address is None:  # a local instance: the CPUs this process may use
            kwargs["num_cpus"] = usable_cpus()
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise LlmcycleError(f"cannot connect to the Ray cluster at {address!r}: {exc}") from None
    serve.start(proxy_location="Disabled")  # the HTTP server is llmcycle's: no Serve proxy on port 8000
    options: dict[str, Any] = {"name": f"llmcycle-{name}", "ray_actor_options": {"num_cpus": num_cpus},
                               "max_ongoing_requests": max_waiting}
    if autoscaling:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(EngineReplica).options(**options)
    handle = serve.run(deployment.bind(str(Path(model_dir).resolve()), engine_args, lora_modules, max_waiting,
                                       threads), name=f"llmcycle-{name}", route_prefix=None)
    return ReplicaSet(handle, EngineInfo(model_dir, list(lora_modules)))


def teardown(names: list[str]) -> None:
    """Delete the Serve applications `deploy` made (on a cluster they would outlive the server)."""
    _, serve = _require_ray()
    for name in names:
        try:
            serve.delete(f"llmcycle-{name}")
        except Exception as exc:  # noqa: BLE001 - the server is exiting; say so and go on
            log.warning("could not delete the Ray Serve application of %r: %s", name, exc)
