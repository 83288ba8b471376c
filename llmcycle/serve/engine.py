"""The offline engine: `LLM(model_dir).generate(prompts, SamplingParams(...))`, as vLLM users know it.

One step = `Scheduler.schedule()` (which sequences compute which tokens: decodes, prefill chunks,
recomputes after preemption) -> one batched forward of the unchanged Transformer over the paged KV pool
(`kv_pool.forward_paged`) -> penalties and sampling for the rows that reached their end -> stop checks ->
`Scheduler.update()`. Sequences join and leave between steps (continuous batching).

Each step returns the state of every request that changed (cumulative text and tokens), which is what
a streaming server sends on. Text grows by incremental detokenization (`detokenizer.py`), and stop
strings are searched only where the new text can complete one; the text is cut where the earliest
stop string begins and the sequence finishes with reason "stop", as vLLM does (the stop string is not
included). n > 1 runs n sequences from one prompt; with a seed, sequence i of a request uses a generator
seeded from (seed, i), so the same request gives the same outputs whatever else is running.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.serve.block_manager import BlockManager, num_blocks_for_budget
from llmcycle.serve.detokenizer import IncrementalDetokenizer
from llmcycle.serve.kv_pool import KVPool, forward_paged
from llmcycle.serve.sampling import (
    SamplingParams,
    apply_penalties,
    find_stop,
    make_generator,
    sample,
    stop_holdback,
)
from llmcycle.serve.scheduler import Scheduler, Sequence
from llmcycle.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative; while unfinished, minus a tail that may be the start of a stop string
    token_ids: list[int]  # cumulative
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} (chosen + top alternatives)


@dataclass
class RequestMetrics:
    """Times (time.monotonic) a server turns into queue time, TTFT, inter-token and end-to-end latency."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """A request's state after a step: `step()` returns one for every request that changed in it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass
class _SeqState:
    seq: Sequence
    index: int
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    done_text: bool = False  # text is final (stop string found, or the sequence finished)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    states: list[_SeqState] = field(default_factory=list)  # kept here: the scheduler forgets finished ones

    @property
    def finished(self) -> bool:
        return all(st.seq.is_finished for st in self.states)


class LLMEngine:
    """Model, tokenizer, paged KV pool, block manager and scheduler; `step()` runs one batched step."""

    def __init__(self, model_dir: str | Path, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int = 256 * 2**20, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 chunk_size: int | None = None, enable_prefix_caching: bool = True,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.model_dir = str(model_dir)
        self.model = Transformer.from_pretrained(model_dir, device=device, dtype=dtype).eval()
        self.tokenizer = Tokenizer.from_pretrained(model_dir)
        cfg = self.model.config
        p = next(self.model.parameters())
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(kv_cache_bytes, cfg.num_hidden_layers, cfg.num_key_value_heads,
                                               cfg.head_dim, block_size, p.element_size())
        if num_blocks < 1:
            raise LlmcycleError(f"kv_cache_bytes={kv_cache_bytes} holds no block of {block_size} tokens.")
        self.pool = KVPool(cfg, num_blocks, block_size, device=p.device, dtype=p.dtype)
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, chunk_size)
        self.eos_id = self.tokenizer.eos_id
        self.max_model_len = cfg.max_position_embeddings
        self._requests: dict[str, _Request] = {}
        self._state: dict[str, _SeqState] = {}  # live sequence id -> its state
        self._owner: dict[str, _Request] = {}
        self._ids = itertools.count()

    # ---- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise LlmcycleError if the prompt plus max_tokens does not fit the model's context."""
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise LlmcycleError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                f"of {self.max_model_len} tokens."
            )

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        params = (params or SamplingParams()).validate()
        ids = self.encode_prompt(prompt)
        if not ids:
            raise LlmcycleError("the prompt is empty.")
        self.check_length(len(ids), params.max_tokens)
        if any(not 0 <= t < self.model.config.vocab_size for t in ids):
            raise LlmcycleError(f"prompt token ids must be in [0, {self.model.config.vocab_size}).")
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = _Request(rid, ids, params, RequestMetrics(arrival_time or time.monotonic()))
        for i in range(params.n):
            sid = f"{rid}#{i}"
            seq = Sequence(sid, list(ids), params, eos_token_id=self.eos_id)
            seed = None if params.seed is None else params.seed * 1_000_003 + i
            st = _SeqState(seq, i, make_generator(seed, self.pool.device), IncrementalDetokenizer(self.tokenizer))
            req.states.append(st)
            self._state[sid] = st
            self._owner[sid] = req
            self.scheduler.add(seq)
        self._requests[rid] = req
        return rid

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or running); its blocks are freed. Unknown ids are ignored."""
        req = self._requests.pop(request_id, None)
        for st in req.states if req else []:
            self.scheduler.abort(st.seq.seq_id)
            self._forget(st.seq.seq_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> dict[str, float]:
        """Gauges and counters for monitoring (vLLM's names without the prefix)."""
        bm = self.block_manager
        return {
            "num_requests_running": self.scheduler.num_running,
            "num_requests_waiting": self.scheduler.num_waiting,
            "kv_cache_usage_perc": bm.usage,
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
        }

    # ---- one step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the state of every request that changed in it."""
        batch = self.scheduler.schedule()
        if len(batch) == 0:
            return []
        now = time.monotonic()
        for s in batch:
            m = self._owner[s.seq.seq_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        rows = [(self.block_manager.block_table(s.seq.seq_id), s.start, s.token_ids) for s in batch]
        logits = forward_paged(self.model, self.pool, rows).float()
        chosen = [i for i, s in enumerate(batch.seqs) if s.needs_sample]
        sampled: dict[str, int] = {}
        if chosen:
            seqs = [batch.seqs[i].seq for i in chosen]
            raw = logits[chosen]
            params = [s.sampling_params for s in seqs]
            processed = apply_penalties(raw, [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
                                        params)
            tokens, chosen_lp, (top_ids, top_lp) = sample(processed, params, [self._state[s.seq_id].generator
                                                                              for s in seqs], raw_logits=raw)
            for j, seq in enumerate(seqs):
                tok = int(tokens[j])
                sampled[seq.seq_id] = tok
                if seq.sampling_params.logprobs is not None:
                    k = seq.sampling_params.logprobs
                    entry = {tok: float(chosen_lp[j])}
                    entry.update({int(t): float(v) for t, v in zip(top_ids[j, :k], top_lp[j, :k])})
                    self._state[seq.seq_id].logprobs.append(entry)
        self.scheduler.update(batch, sampled)
        now = time.monotonic()
        changed: dict[str, _Request] = {}
        for sid in sampled:
            req = self._owner[sid]
            self._detokenize(self._state[sid])
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            changed[req.request_id] = req
        return [self._output(req, now) for req in changed.values()]

    def _detokenize(self, st: _SeqState) -> None:
        """Extend the text with the new token; finish the sequence at the first stop string."""
        seq, stop = st.seq, st.seq.sampling_params.stop
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and not seq.sampling_params.ignore_eos and (
                ids[-1] == self.eos_id or ids[-1] in seq.sampling_params.stop_token_ids):
            ids = ids[:-1]  # the stop token is not part of the text, as in vLLM
        delta = st.detok.push(ids, final=seq.is_finished)
        if not delta:
            st.done_text = seq.is_finished
            return
        old = len(st.text)
        st.text += delta
        if stop:
            # Only a stop string overlapping the new text can be new: search from there.
            begin = max(0, old - max(len(s) for s in stop) + 1)
            cut = find_stop(st.text[begin:], stop)
            if cut is not None:
                st.text = st.text[: begin + cut]
                st.done_text = True
                if seq.is_finished:
                    seq.finish_reason = "stop"  # the stop string came with the last allowed token
                else:
                    self.scheduler.finish(seq.seq_id, "stop")
                return
        st.done_text = seq.is_finished

    def _output(self, req: _Request, now: float) -> RequestOutput:
        outs = []
        for st in req.states:
            text = st.text
            if not st.seq.is_finished and req.params.stop:
                text = text[: len(text) - stop_holdback(text, req.params.stop)]
            outs.append(CompletionOutput(st.index, text, list(st.seq.output_token_ids), st.seq.finish_reason,
                                         list(st.logprobs) if req.params.logprobs is not None else None))
        finished = req.finished
        if finished:
            req.metrics.finished_time = now
            del self._requests[req.request_id]
            for st in req.states:
                self._forget(st.seq.seq_id)
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished, req.metrics)

    def _forget(self, sid: str) -> None:
        self._owner.pop(sid, None)
        self._state.pop(sid, None)


class LLM:
    """Offline batch generation: every prompt added, steps run until all finish, outputs in prompt order."""

    def __init__(self, model_dir: str | Path, **engine_args):
        self.engine = LLMEngine(model_dir, **engine_args)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.engine.add_request(p, sp) for p, sp in zip(prompts, plist)]
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[i] for i in ids]
