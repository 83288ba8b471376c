"""The offline engine: `LLM(model_dir).generate(prompts, SamplingParams(...))`, as vLLM users know it.

One step = `Scheduler.schedule()` (which sequences compute which tokens: decodes, prefill chunks,
recomputes after preemption) -> one batched forward of the unchanged Transformer over the paged KV pool
(`kv_pool.forward_paged`) -> penalties and sampling for the rows that reached their end -> stop checks ->
`Scheduler.update()`. Sequences join and leave between steps (continuous batching).

Stop strings are checked on the detokenized output after each token; the text is cut where the earliest
stop string begins and the sequence finishes with reason "stop", as vLLM does (the stop string is not
included). n > 1 runs n sequences from one prompt; with a seed, sequence i of a request uses a generator
seeded from (seed, i), so the same request gives the same outputs whatever else is running.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.serve.block_manager import BlockManager, num_blocks_for_budget
from llmcycle.serve.kv_pool import KVPool, forward_paged
from llmcycle.serve.sampling import SamplingParams, apply_penalties, find_stop, make_generator, sample
from llmcycle.serve.scheduler import Scheduler, Sequence
from llmcycle.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} (chosen + top alternatives)


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seq_ids: list[str]
    seqs: dict[str, Sequence] = field(default_factory=dict)  # kept here: the scheduler forgets finished ones
    texts: dict[str, str] = field(default_factory=dict)
    logprobs: dict[str, list[dict[int, float]]] = field(default_factory=dict)


class LLMEngine:
    """Model, tokenizer, paged KV pool, block manager and scheduler; `step()` runs one batched step."""

    def __init__(self, model_dir: str | Path, block_size: int = 16, num_blocks: int | None = None,
                 kv_cache_bytes: int = 256 * 2**20, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 chunk_size: int | None = None, enable_prefix_caching: bool = True,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
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
        self._requests: dict[str, _Request] = {}
        self._owner: dict[str, _Request] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._ids = itertools.count()

    # ---- requests -----------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = (params or SamplingParams()).validate()
        ids = self.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else list(prompt)
        if len(ids) + params.max_tokens > self.model.config.max_position_embeddings:
            raise LlmcycleError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's context "
                f"of {self.model.config.max_position_embeddings} tokens."
            )
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        req = _Request(rid, ids, params, [f"{rid}#{i}" for i in range(params.n)])
        for i, sid in enumerate(req.seq_ids):
            req.seqs[sid] = Sequence(sid, list(ids), params, eos_token_id=self.eos_id)
            self.scheduler.add(req.seqs[sid])
            self._owner[sid] = req
            self._generators[sid] = make_generator(None if params.seed is None else params.seed * 1_000_003 + i,
                                                   self.pool.device)
            req.texts[sid] = ""
            req.logprobs[sid] = []
        self._requests[rid] = req
        return rid

    def abort(self, request_id: str) -> None:
        req = self._requests.pop(request_id, None)
        for sid in req.seq_ids if req else []:
            self.scheduler.abort(sid)
            self._forget(sid)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return the outputs of requests that finished in it."""
        batch = self.scheduler.schedule()
        if len(batch) == 0:
            return []
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
            tokens, chosen_lp, (top_ids, top_lp) = sample(processed, params, [self._generators[s.seq_id]
                                                                              for s in seqs], raw_logits=raw)
            for j, seq in enumerate(seqs):
                tok = int(tokens[j])
                sampled[seq.seq_id] = tok
                if seq.sampling_params.logprobs is not None:
                    k = seq.sampling_params.logprobs
                    entry = {tok: float(chosen_lp[j])}
                    entry.update({int(t): float(v) for t, v in zip(top_ids[j, :k], top_lp[j, :k])})
                    self._owner[seq.seq_id].logprobs[seq.seq_id].append(entry)
        self.scheduler.update(batch, sampled)
        for sid in sampled:
            self._check_stop_strings(sid)
        return self._collect_finished()

    def _check_stop_strings(self, sid: str) -> None:
        req = self._owner[sid]
        seq = req.seqs[sid]
        text = self._decode(seq)
        req.texts[sid] = text
        if req.params.stop and not seq.is_finished:
            cut = find_stop(text, req.params.stop)
            if cut is not None:
                req.texts[sid] = text[:cut]
                self.scheduler.finish(sid, "stop")

    def _decode(self, seq: Sequence) -> str:
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and not seq.sampling_params.ignore_eos and (
                ids[-1] == self.eos_id or ids[-1] in seq.sampling_params.stop_token_ids):
            ids = ids[:-1]  # the stop token is not part of the text, as in vLLM
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _collect_finished(self) -> list[RequestOutput]:
        done = []
        for rid, req in list(self._requests.items()):
            seqs = [req.seqs[sid] for sid in req.seq_ids]
            if all(s.is_finished for s in seqs):
                outs = []
                for i, (sid, seq) in enumerate(zip(req.seq_ids, seqs)):
                    text = req.texts[sid] if seq.finish_reason == "stop" and req.params.stop else self._decode(seq)
                    if req.params.stop:
                        cut = find_stop(text, req.params.stop)
                        text = text if cut is None else text[:cut]
                    outs.append(CompletionOutput(i, text, list(seq.output_token_ids), seq.finish_reason,
                                                 req.logprobs[sid] if req.params.logprobs is not None else None))
                done.append(RequestOutput(rid, req.prompt_token_ids, outs, True))
                del self._requests[rid]
                for sid in req.seq_ids:
                    self._forget(sid)
        return done

    def _forget(self, sid: str) -> None:
        self._owner.pop(sid, None)
        self._generators.pop(sid, None)


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
                results[out.request_id] = out
        return [results[i] for i in ids]
