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
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.hf_io import generation_eos_ids
from llmcycle.model.transformer import Transformer
from llmcycle.serve.block_manager import BlockManager, num_blocks_for_budget
from llmcycle.serve.detokenizer import IncrementalDetokenizer
from llmcycle.serve.kv_pool import KVPool, forward_paged
from llmcycle.serve.sampling import (
    SamplingParams,
    apply_penalties,
    find_stop,
    make_generator,
    process_logits,
    sample,
    stop_holdback,
)
from llmcycle.serve.scheduler import ScheduledBatch, ScheduledSeq, Scheduler, Sequence
from llmcycle.serve.speculative import Drafter, accept_greedy, accept_sampled, qualifies
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
    detok: IncrementalDetokenizer | None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""


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

    def __init__(self, model_dir: str | Path | None, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int = 256 * 2**20, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 chunk_size: int | None = None, enable_prefix_caching: bool = True,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 draft_model: str | Path | None = None, num_speculative_tokens: int = 4,
                 model: Transformer | None = None, tokenizer: Tokenizer | None = None):
        # `model` (with model_dir None) serves a live in-memory model, e.g. a policy's rollouts during
        # PPO/GRPO; without a tokenizer the engine works in token ids only (no text, no stop strings).
        if model is None and model_dir is None:
            raise ValueError("LLMEngine needs a model directory or a model")
        self.model_dir = str(model_dir) if model_dir is not None else "<in-memory model>"
        self.model = model if model is not None else Transformer.from_pretrained(model_dir, device=device,
                                                                                 dtype=dtype).eval()
        self.tokenizer = tokenizer if tokenizer is not None or model_dir is None else Tokenizer.from_pretrained(model_dir)
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
        self.eos_id = self.tokenizer.eos_id if self.tokenizer is not None else None
        # Further ids generation_config.json ends on (a chat model's end-of-turn): stop tokens of every
        # request, as vLLM adds them, so /v1/completions stops at end of turn like transformers' generate.
        gen_eos = generation_eos_ids(model_dir) if model_dir is not None else []
        self.extra_stop_ids = [i for i in gen_eos if i != self.eos_id]
        self.max_model_len = cfg.max_position_embeddings
        self.drafter = (Drafter.load(draft_model, self.model, self.pool, num_speculative_tokens)
                        if draft_model is not None else None)
        self._requests: dict[str, _Request] = {}
        self._state: dict[str, _SeqState] = {}  # live sequence id -> its state
        self._owner: dict[str, _Request] = {}
        self._ids = itertools.count()

    # ---- requests -----------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is None:
            raise LlmcycleError("this engine has no tokenizer: give prompts as token ids.")
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def _with_extra_stops(self, params: SamplingParams) -> SamplingParams:
        """`params` plus the model's extra stop ids (a copy: the caller's object is left as it was)."""
        missing = [i for i in self.extra_stop_ids if i not in params.stop_token_ids]
        if not missing or params.ignore_eos:  # ignore_eos ignores every end-of-generation id
            return params
        return replace(params, stop_token_ids=[*params.stop_token_ids, *missing])

    def check_length(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise LlmcycleError if the prompt plus max_tokens does not fit the model's context."""
        if num_prompt_tokens + max_tokens > self.max_model_len:
            raise LlmcycleError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the model's context "
                f"of {self.max_model_len} tokens."
            )

    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate the settings and tokenize: ValueError / LlmcycleError name what is wrong."""
        params.validate()
        ids = self.encode_prompt(prompt)
        if not ids:
            raise LlmcycleError("the prompt is empty.")
        self.check_length(len(ids), params.max_tokens)
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise LlmcycleError(f"prompt token ids must be in [0, {vocab}).")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        params = self._with_extra_stops(params or SamplingParams())
        ids = self.prepare(prompt, params)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = _Request(rid, ids, params, RequestMetrics(arrival_time or time.monotonic()))
        for i in range(params.n):
            sid = f"{rid}#{i}"
            seq = Sequence(sid, list(ids), params, eos_token_id=self.eos_id)
            seed = None if params.seed is None else params.seed * 1_000_003 + i
            detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
            st = _SeqState(seq, i, make_generator(seed, self.pool.device), detok)
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

    def abort_all(self) -> None:
        """Drop every request, e.g. after a step failed half-way (its batch's state is unknown)."""
        for rid in list(self._requests):
            self.abort(rid)
        self.scheduler.reset_in_flight()

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
            **({"spec_decode_num_drafts": self.drafter.stats.num_drafts,
                "spec_decode_num_draft_tokens": self.drafter.stats.num_draft_tokens,
                "spec_decode_num_accepted_tokens": self.drafter.stats.num_accepted_tokens}
               if self.drafter is not None else {}),
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
        spec = self._plan_speculation(batch) if self.drafter is not None else {}
        drafts: dict[int, tuple[list[int], torch.Tensor]] = {}
        if spec:
            idx = list(spec)
            rows = [(batch.seqs[i].seq.seq_id, self.block_manager.block_table(batch.seqs[i].seq.seq_id),
                     batch.seqs[i].start, batch.seqs[i].start + 1, batch.seqs[i].seq.tokens) for i in idx]
            seqs = [batch.seqs[i].seq for i in idx]
            toks, qs = self.drafter.propose(rows, [spec[i] for i in idx], [q.sampling_params for q in seqs],
                                            [self._state[q.seq_id].generator for q in seqs])
            drafts = {i: (t, q) for i, t, q in zip(idx, toks, qs)}
        rows = [(self.block_manager.block_table(s.seq.seq_id), s.start, s.token_ids + drafts.get(i, ([],))[0])
                for i, s in enumerate(batch.seqs)]
        num_logits = [len(drafts[i][0]) + 1 if i in drafts else 1 for i in range(len(batch))]
        logits = forward_paged(self.model, self.pool, rows, num_logits if drafts else None).float()
        ends = torch.tensor(num_logits).cumsum(0).tolist()
        sampled: dict[str, int | list[int]] = {}
        plain = [i for i, s in enumerate(batch.seqs) if s.needs_sample and i not in drafts]
        if plain:
            self._sample_plain([batch.seqs[i].seq for i in plain], logits[[ends[i] - 1 for i in plain]], sampled)
        for i, (draft_tokens, q) in drafts.items():
            seq = batch.seqs[i].seq
            target = logits[ends[i] - len(draft_tokens) - 1 : ends[i]]
            params = seq.sampling_params
            if params.greedy:
                tokens = accept_greedy(target, draft_tokens)
            else:
                p = process_logits(target, [params] * len(target)).softmax(dim=-1)
                tokens = accept_sampled(p, q, draft_tokens, self._state[seq.seq_id].generator)
            sampled[seq.seq_id] = tokens
            self.drafter.stats.num_accepted_tokens += len(tokens) - 1
        self.scheduler.update(batch, sampled)
        for i in drafts:
            self._after_speculation(batch.seqs[i], len(drafts[i][0]), len(sampled[batch.seqs[i].seq.seq_id]) - 1)
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

    def _sample_plain(self, seqs: list[Sequence], raw: torch.Tensor, sampled: dict) -> None:
        """One token per sequence from its last logits: penalties, sampling, logprobs."""
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

    def _plan_speculation(self, batch: ScheduledBatch) -> dict[int, int]:
        """Which rows decode speculatively this step, and how many draft tokens each (slots reserved)."""
        for seq in batch.preempted:
            self.drafter.forget(seq.seq_id)  # its draft K/V went with its blocks
        plan = {}
        for i, s in enumerate(batch.seqs):
            seq = s.seq
            if not (s.needs_sample and s.num_new_tokens == 1 and seq.output_token_ids
                    and qualifies(seq.sampling_params)):
                continue
            # Emitting at most k + 1 tokens must not pass max_tokens (which also keeps us in context).
            k = min(self.drafter.num_speculative_tokens,
                    seq.sampling_params.max_tokens - len(seq.output_token_ids) - 1)
            if k >= 1 and self.block_manager.reserve(seq.seq_id, k):
                plan[i] = k
        return plan

    def _after_speculation(self, s: ScheduledSeq, num_draft: int, num_accepted: int) -> None:
        sid = s.seq.seq_id
        if sid not in self.block_manager:
            self.drafter.forget(sid)  # finished in this step
            return
        self.block_manager.trim(sid)
        # Draft K/V is valid through the accepted draft tokens that were fed to the draft (all but d_k).
        self.drafter.computed[sid] = s.start + 1 + min(num_accepted, num_draft - 1)

    def _detokenize(self, st: _SeqState) -> None:
        """Extend the text with the new token; finish the sequence at the first stop string."""
        seq, stop = st.seq, st.seq.sampling_params.stop
        if st.detok is None:
            return  # token ids only
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and not seq.sampling_params.ignore_eos and (
                ids[-1] == self.eos_id or ids[-1] in seq.sampling_params.stop_token_ids):
            ids = ids[:-1]  # the stop token is not part of the text, as in vLLM
        delta = st.detok.push(ids, final=seq.is_finished)
        if not delta:
            return
        old = len(st.text)
        st.text += delta
        if stop:
            # Only a stop string overlapping the new text can be new: search from there.
            begin = max(0, old - max(len(s) for s in stop) + 1)
            cut = find_stop(st.text[begin:], stop)
            if cut is not None:
                st.text = st.text[: begin + cut]
                if seq.is_finished:
                    seq.finish_reason = "stop"  # the stop string came with the last allowed token
                else:
                    self.scheduler.finish(seq.seq_id, "stop")
                return

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
        if self.drafter is not None:
            self.drafter.forget(sid)
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
