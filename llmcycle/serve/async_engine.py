"""The streaming engine a server uses: `LLMEngine` stepping in its own thread, results as async iterators.

The engine thread owns the `LLMEngine` (nothing else touches it): it takes new requests and aborts from a
command queue between steps, runs `step()`, and hands each step's outputs to the asyncio loop in one
`call_soon_threadsafe`. Torch releases the GIL in its kernels, so HTTP handling goes on while a step runs.

`generate()` validates and tokenizes in the caller (so a bad request fails before anything is queued),
then yields the request's cumulative `RequestOutput` after every step that changed it. Leaving the
iterator early (a client that disconnected) aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from llmcycle.errors import LlmcycleError
from llmcycle.serve.config import ServeConfig
from llmcycle.serve.engine import LLMEngine, RequestOutput
from llmcycle.serve.sampling import SamplingParams

log = logging.getLogger(__name__)


class QueueFull(LlmcycleError):
    """The waiting queue is at its bound (HTTP 503)."""


class EngineUnavailable(LlmcycleError):
    """The engine is draining for shutdown, or stopped (HTTP 503)."""


class EngineStepError(RuntimeError):
    """A step raised; every request in flight is failed with this (HTTP 500), the engine goes on."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    aborted: bool = False  # outputs already on their way to the loop are dropped


class AsyncLLMEngine:
    """Thread-driven `LLMEngine` with an async `generate`; `max_waiting` bounds queued requests."""

    def __init__(self, engine: LLMEngine, max_waiting: int = ServeConfig.max_waiting,
                 on_output: Callable[[RequestOutput], None] | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_output = on_output  # called in the event loop for every output (metrics)
        self.on_abort: Callable[[str], None] | None = None  # called with the id of an aborted request
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and _pending between loop and engine thread
        self._pending = 0  # adds sent to the engine thread and not yet taken
        self._wake = threading.Event()
        self._stopping = False
        self._draining = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self.num_step_errors = 0

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> AsyncLLMEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="llmcycle-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_in_flight(self) -> int:
        with self._lock:
            return len(self._streams)

    async def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, wait for those in flight; then stop the thread."""
        self._draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while drain and self.num_in_flight and (deadline is None or time.monotonic() < deadline):
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    # ---- requests -------------------------------------------------------------------------------

    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate and tokenize in the caller: raises ValueError / LlmcycleError before anything is queued.
        (Tokenizing and reading the config are safe beside the engine thread.)"""
        return self.engine.prepare(prompt, params)

    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str | None = None, lora_name: str | None = None) -> AsyncIterator[RequestOutput]:
        ids = self.prepare(prompt, params)
        self.engine.runner.adapters.id_of(lora_name)  # an unknown adapter fails here, before queuing
        if self._draining or self._thread is None:
            raise EngineUnavailable("the server is shutting down and takes no new requests.")
        rid = request_id or f"req-{next(self._ids)}"
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.engine.scheduler.num_waiting + self._pending >= self.max_waiting:
                raise QueueFull(f"the waiting queue is full ({self.max_waiting} requests); retry later.")
            if rid in self._streams:
                raise LlmcycleError(f"request id {rid!r} is already in use.")
            self._streams[rid] = stream
            self._pending += 1
        self._commands.put(("add", rid, ids, params, time.monotonic(), lora_name))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.aborted = True
            self._commands.put(("abort", request_id))
            self._wake.set()
            if self.on_abort is not None:
                self.on_abort(request_id)

    # ---- the engine thread ----------------------------------------------------------------------

    def _take_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, arrival, lora_name = cmd
                with self._lock:
                    self._pending -= 1
                    alive = rid in self._streams
                if alive:  # not aborted while it sat in the command queue
                    try:
                        self.engine.add_request(ids, params, request_id=rid, arrival_time=arrival,
                                                lora_name=lora_name)
                    except Exception as exc:  # noqa: BLE001 - handed to the request's caller
                        self._deliver([(rid, exc)])
            else:
                self.engine.abort(cmd[1])

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._take_commands()
            except Exception as exc:  # noqa: BLE001 - the thread must outlive any one request
                log.exception("engine command failed")
                self._fail_all(exc)
            if not self.engine.has_unfinished():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # noqa: BLE001 - keep serving: fail the requests in flight only
                log.exception("engine step failed; failing the requests in flight")
                self.num_step_errors += 1
                self._fail_all(exc)
                continue
            if outputs:
                self._deliver([(o.request_id, o) for o in outputs])

    def _fail_all(self, exc: Exception) -> None:
        """After a failed step the batch's state is unknown: drop every request and reset the engine."""
        with self._lock:
            rids = list(self._streams)
        self.engine.abort_all()
        err = EngineStepError(f"internal error in the engine step: {type(exc).__name__}: {exc}")
        self._deliver([(rid, err) for rid in rids])

    def _deliver(self, items: list[tuple[str, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, object]]] = {}
        with self._lock:
            for rid, item in items:
                stream = self._streams.get(rid)
                if stream is None:
                    continue  # aborted meanwhile
                if isinstance(item, BaseException) or item.finished:
                    del self._streams[rid]
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._put_all, batch)
            except RuntimeError:
                pass  # the loop is closed: nobody is listening any more

    def _put_all(self, batch: list[tuple[_Stream, object]]) -> None:
        for stream, item in batch:
            if stream.aborted:
                continue
            if self.on_output is not None and isinstance(item, RequestOutput):
                try:
                    self.on_output(item)
                except Exception:  # noqa: BLE001 - metrics must never break a response
                    log.exception("on_output failed")
            stream.queue.put_nowait(item)
