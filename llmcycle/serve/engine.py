"""The offline engine: `LLM(model_dir).generate(prompts, SamplingParams(...))`, as vLLM users know it.

`LLMEngine` wires four parts together and `step()` runs them in order:
- `Scheduler` (with the tensor-free `BlockManager`): which sequences compute which tokens this step
  (decodes, prefill chunks, recomputes after preemption); sequences join and leave between steps
  (continuous batching);
- `ModelRunner`: the weights and the paged KV pool; prepares the batch, runs one forward of the unchanged
  Transformer, samples (and, with a draft model, drafts and verifies: `speculative.py`);
- `Scheduler.update`: appends the tokens, finishes sequences on eos / stop ids / length;
- `OutputProcessor`: incremental detokenization, stop strings, the `RequestOutput`s returned.

Each step returns the state of every request that changed (cumulative text and tokens), which is what a
streaming server sends on. LoRA adapters (`lora_modules={name: dir}` or `add_lora`) are served over the one
base model: a request names its adapter (`lora_name`), and requests for different adapters share a step. n > 1 runs n sequences from one prompt; with a seed, sequence i of a request uses
a generator seeded from (seed, i), so the same request gives the same outputs whatever else is running.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.hf_io import generation_eos_ids
from llmcycle.model.transformer import Transformer
from llmcycle.serve.block_manager import BlockManager
from llmcycle.serve.config import ServeConfig
from llmcycle.serve.guided import GuidedDecoding, StructuredOutputsParams
from llmcycle.serve.kv_pool import KVPool
from llmcycle.serve.model_runner import ModelRunner
from llmcycle.serve.output_processor import OutputProcessor, RequestMetrics, RequestOutput, RequestState
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.scheduler import Scheduler, Sequence
from llmcycle.serve.speculative import SpeculativeDecoder
from llmcycle.threads import adapt_threads
from llmcycle.tokenizer import Tokenizer


class LLMEngine:
    """Scheduler, model runner and output processor; `step()` runs one batched step."""

    def __init__(self, model_dir: str | Path | None, block_size: int = ServeConfig.block_size,
                 num_blocks: int | None = None, kv_cache_bytes: int = ServeConfig.kv_cache_mb * 2**20,
                 max_num_seqs: int = ServeConfig.max_num_seqs,
                 max_num_batched_tokens: int = ServeConfig.max_num_batched_tokens,
                 chunk_size: int | None = ServeConfig.chunk_size,
                 enable_prefix_caching: bool = ServeConfig.enable_prefix_caching,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 draft_model: str | Path | None = None,
                 num_speculative_tokens: int = ServeConfig.num_speculative_tokens,
                 model: Transformer | None = None, tokenizer: Tokenizer | None = None,
                 lora_modules: dict[str, str | Path] | None = None):
        # Defaults are ServeConfig's (`ServeConfig.engine_args()` gives them all from a recipe).
        # `model` (with model_dir None) serves a live in-memory model, e.g. a policy's rollouts during
        # PPO/GRPO; without a tokenizer the engine works in token ids only (no text, no stop strings).
        if model is None and model_dir is None:
            raise ValueError("LLMEngine needs a model directory or a model")
        self.model_dir = str(model_dir) if model_dir is not None else "<in-memory model>"
        if model is None:
            model = ModelRunner.load_weights(model_dir, device=device, dtype=dtype, fuse=not lora_modules)
        self.runner = ModelRunner.for_model(model, block_size, num_blocks, kv_cache_bytes)
        self.tokenizer = tokenizer if tokenizer is not None or model_dir is None else Tokenizer.from_pretrained(model_dir)
        self.block_manager = BlockManager(self.runner.pool.num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs, max_num_batched_tokens, chunk_size)
        self.eos_id = self.tokenizer.eos_id if self.tokenizer is not None else None
        # Further ids generation_config.json ends on (a chat model's end-of-turn): stop tokens of every
        # request, as vLLM adds them, so /v1/completions stops at end of turn like transformers' generate.
        gen_eos = generation_eos_ids(model_dir) if model_dir is not None else []
        self.extra_stop_ids = [i for i in gen_eos if i != self.eos_id]
        self.max_model_len = model.config.max_position_embeddings
        if draft_model is not None:
            self.runner.spec = SpeculativeDecoder.load(draft_model, self.runner, self.block_manager,
                                                       num_speculative_tokens)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_id, finish=self.scheduler.finish,
                                                release=self.runner.remove_sequence)
        self._ids = itertools.count()
        self._guided_lock = threading.Lock()  # prepare() runs in server threads beside the engine's
        for name, path in (lora_modules or {}).items():
            self.add_lora(name, path)

    @property
    def model(self) -> Transformer:
        return self.runner.model

    @property
    def pool(self) -> KVPool:
        return self.runner.pool

    @property
    def drafter(self) -> SpeculativeDecoder | None:
        return self.runner.spec

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    # ---- requests -----------------------------------------------------------------------------

    def add_lora(self, name: str, path: str | Path) -> int:
        """Serve the PEFT adapter in `path` under `name` (its id returned); call between steps."""
        return self.runner.adapters.add(name, path)

    @property
    def lora_names(self) -> list[str]:
        return list(self.runner.adapters.ids)

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

    def guided(self) -> GuidedDecoding:
        """The grammar side of this engine (built at the first structured-outputs request)."""
        with self._guided_lock:
            if self.runner.guided is None:
                if self.tokenizer is None:
                    raise LlmcycleError("structured outputs need a tokenizer; this engine works in token ids.")
                stops = sorted({*self.tokenizer.end_of_turn_ids, *self.extra_stop_ids})
                self.runner.guided = GuidedDecoding(self.tokenizer.backend.to_str(), self.vocab_size,
                                                    stops)
            return self.runner.guided

    def _grammar(self, structured: StructuredOutputsParams) -> str:
        if self.drafter is not None:
            raise ValueError("structured_outputs are not supported with speculative decoding on this server")
        return self.guided().check(structured)

    def prepare(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        """Validate the settings and tokenize: ValueError / LlmcycleError name what is wrong."""
        params.validate()
        if params.structured_outputs is not None:
            self._grammar(params.structured_outputs)
        ids = self.encode_prompt(prompt)
        if not ids:
            raise LlmcycleError("the prompt is empty.")
        self.check_length(len(ids), params.max_tokens)
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise LlmcycleError(f"prompt token ids must be in [0, {vocab}).")
        return ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None,
                    lora_name: str | None = None) -> str:
        """Queue a request (`lora_name`: the adapter to run it with; None: the base model)."""
        params = self._with_extra_stops(params or SamplingParams())
        adapter_id = self.runner.adapters.id_of(lora_name)
        ids = self.prepare(prompt, params)
        rid = request_id or f"req-{next(self._ids)}"
        if rid in self.output_processor.requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seqs = [Sequence(f"{rid}#{i}", list(ids), params, eos_token_id=self.eos_id, adapter_id=adapter_id)
                for i in range(params.n)]
        grammar = None if params.structured_outputs is None else self._grammar(params.structured_outputs)
        for i, seq in enumerate(seqs):
            self.scheduler.add(seq)  # first: it refuses a request that can never fit the cache
            self.runner.add_sequence(seq.seq_id, None if params.seed is None else params.seed * 1_000_003 + i,
                                     adapter_id, grammar)
        metrics = RequestMetrics(arrival_time or time.monotonic())
        self.output_processor.add_request(RequestState(rid, ids, params, metrics), seqs)
        return rid

    def abort(self, request_id: str) -> None:
        """Drop a request (waiting or running); its blocks are freed. Unknown ids are ignored."""
        req = self.output_processor.pop_request(request_id)
        for st in req.states if req else []:
            self.scheduler.abort(st.seq.seq_id)

    def abort_all(self) -> None:
        """Drop every request, e.g. after a step failed half-way (its batch's state is unknown)."""
        for rid in list(self.output_processor.requests):
            self.abort(rid)
        self.scheduler.reset_in_flight()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_requests(self) -> int:
        return len(self.output_processor.requests)

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
        adapt_threads()
        self.output_processor.mark_scheduled(batch, time.monotonic())
        out = self.runner.execute(batch, self.block_manager.block_table)
        self.scheduler.update(batch, out.sampled)
        self.runner.after_update(batch, out)
        return self.output_processor.process(out.sampled, out.logprobs, out.chosen_logprobs)


class LLM:
    """Offline batch generation: every prompt added, steps run until all finish, outputs in prompt order."""

    def __init__(self, model_dir: str | Path, **engine_args):
        self.engine = LLMEngine(model_dir, **engine_args)

    def generate(self, prompts: str | list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None,
                 lora_name: str | list[str | None] | None = None) -> list[RequestOutput]:
        """Outputs in prompt order. `lora_name`: one adapter for every prompt, or one per prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        plist = params if isinstance(params, list) else [params] * len(prompts)
        loras = lora_name if isinstance(lora_name, list) else [lora_name] * len(prompts)
        ids = [self.engine.add_request(p, sp, lora_name=a) for p, sp, a in zip(prompts, plist, loras, strict=True)]
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
        return [results[i] for i in ids]
