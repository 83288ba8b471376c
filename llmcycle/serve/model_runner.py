"""The model runner: weights, their paged KV pool, batch preparation, the forward pass and sampling.

`LLMEngine.step` hands it a `ScheduledBatch` (which tokens of which sequences to compute) and gets back
the tokens sampled for the rows that reached their end (`ModelRunnerOutput`). Everything that touches
tensors on the serving path happens here or in what it calls: `kv_pool.PagedBatch` (the kv_cache view of
one forward), `sampling` (penalties, filtering, per-sequence generators) and, when a draft model is
configured, `speculative.SpeculativeDecoder` (drafting before the forward, verification after it).

Weights enter through one door, `ModelRunner.load_weights`: the target and the draft model are both
loaded there. It is the seam for quantized weights. LoRA adapters attach to the loaded target
(`runner.adapters`, serve/lora.py); a sequence's adapter is registered with `add_sequence` (as its seed
is) and travels as one adapter id per row of the prepared batch, next to the block tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.serve.block_manager import num_blocks_for_budget
from llmcycle.serve.guided import GuidedDecoding
from llmcycle.serve.kv_pool import KVPool, PagedBatch
from llmcycle.serve.lora import BASE_ID, LoRAAdapters
from llmcycle.serve.packed_linear import fuse_projections, pack_linears
from llmcycle.serve.sampling import apply_penalties, make_generator, sample
from llmcycle.serve.scheduler import ScheduledBatch, Sequence

if TYPE_CHECKING:
    from llmcycle.serve.speculative import Draft, SpeculativeDecoder

# (block table, number of tokens already cached, new token ids): one row of a paged forward.
Row = tuple[list[int], int, list[int]]


@torch.no_grad()
def forward_paged(model: Transformer, pool: KVPool, seqs: list[Row], num_logits: list[int] | None = None
                  ) -> torch.Tensor:
    """One forward over (block_table, num_cached, new_token_ids) rows; logits of each last new token [B, V].

    With `num_logits`, row b gives the logits of its last num_logits[b] tokens, all rows concatenated
    ([sum(num_logits), V]; speculative decoding verifies several positions per row). Writes the new
    tokens' K/V into the pool. The caller has already allocated the slots (BlockManager).
    """
    batch = PagedBatch(pool, [s[0] for s in seqs], [s[1] for s in seqs], [len(s[2]) for s in seqs])
    input_ids = batch.input_ids([s[2] for s in seqs])
    return model(input_ids, positions=batch.positions, kv_cache=batch, logits_mask=batch.logits_mask(num_logits))


@dataclass
class ModelRunnerOutput:
    """What one `execute` produced, keyed by sequence id.

    `sampled`: a token for every row that reached its end, or a list of tokens for a row decoded
    speculatively (accepted draft tokens then the target's own); rows in the middle of a prefill are
    absent. `logprobs`: {token id: logprob} (chosen + top alternatives) for sequences that asked.
    `chosen_logprobs`: the sampled token's raw logprob for every row sampled here (not the speculative ones),
    which the output processor sums into `cumulative_logprob` (the request log's output perplexity).
    `drafts`: this step's drafts by batch row, for `SpeculativeDecoder.commit` after the scheduler update.
    """

    sampled: dict[str, int | list[int]] = field(default_factory=dict)
    logprobs: dict[str, dict[int, float]] = field(default_factory=dict)
    chosen_logprobs: dict[str, float] = field(default_factory=dict)
    drafts: dict[int, Draft] = field(default_factory=dict)


class ModelRunner:
    """A model and its KV pool; `execute(batch)` runs one step's forward and sampling.

    Holds each live sequence's sampling generator (seeded requests draw from their own, so a request's
    tokens do not depend on its neighbours in the batch) and adapter id. `adapters`: the LoRA adapters
    served over the model. `spec`, when set, decodes speculatively.
    """

    def __init__(self, model: Transformer, pool: KVPool) -> None:
        self.model = model
        self.pool = pool
        self.adapters = LoRAAdapters(model)
        self.spec: SpeculativeDecoder | None = None
        self.guided: GuidedDecoding | None = None  # the engine sets it at the first structured-outputs request
        self._generators: dict[str, torch.Generator | None] = {}
        self._adapter_ids: dict[str, int] = {}

    # ---- construction: the single place weights are loaded ------------------------------------

    @staticmethod
    def load_weights(model_dir: str | Path, device: str | torch.device | None = None,
                     dtype: torch.dtype | None = None, fuse: bool = False) -> Transformer:
        """Load a model directory for inference (eval mode): plain or quantized (`optimize/formats.py`:
        compressed-tensors int8/int4/W8A8, bitsandbytes NF4). Every model the engine runs (target and
        draft) and `llmcycle eval` reads goes through this door. On a CPU in fp32 (or bf16 where the CPU has
        it) the plain linear layers become `PackedLinear` (inference only), and with `fuse` (a model that takes no LoRA adapter) q/k/v and
        gate/up become one product each."""
        from llmcycle.optimize.formats import load_model_dir

        model = load_model_dir(model_dir, device=device, dtype=dtype)
        if fuse:
            fuse_projections(model)
        pack_linears(model)  # CPU fp32/bf16: oneDNN's reordered weights (serve/packed_linear.py)
        return model

    @classmethod
    def for_model(cls, model: Transformer, block_size: int, num_blocks: int | None, kv_cache_bytes: int
                  ) -> ModelRunner:
        """A runner around a loaded model, its pool sized by `num_blocks` or else by the byte budget."""
        cfg = model.config
        p = next(model.parameters())
        if num_blocks is None:
            num_blocks = num_blocks_for_budget(kv_cache_bytes, cfg.num_hidden_layers, cfg.num_key_value_heads,
                                               cfg.head_dim, block_size, p.element_size())
        if num_blocks < 1:
            raise LlmcycleError(f"kv_cache_bytes={kv_cache_bytes} holds no block of {block_size} tokens.")
        return cls(model, KVPool(cfg, num_blocks, block_size, device=p.device, dtype=p.dtype))

    @property
    def device(self) -> torch.device:
        return self.pool.device

    # ---- per-sequence state ------------------------------------------------------------------

    def add_sequence(self, seq_id: str, seed: int | None, adapter_id: int = BASE_ID,
                     grammar: str | None = None) -> None:
        """Register a sequence before it is scheduled: its generator, its LoRA adapter (an id of
        `self.adapters`; BASE_ID for none) and the grammar its tokens must follow (`guided.py`), if any."""
        self._generators[seq_id] = make_generator(seed, self.device)
        self._adapter_ids[seq_id] = adapter_id
        if grammar is not None:
            assert self.guided is not None
            self.guided.add(seq_id, grammar)

    def remove_sequence(self, seq_id: str) -> None:
        """Forget a finished or aborted sequence (unknown ids are ignored)."""
        self._generators.pop(seq_id, None)
        self._adapter_ids.pop(seq_id, None)
        if self.spec is not None:
            self.spec.forget(seq_id)
        if self.guided is not None:
            self.guided.remove(seq_id)

    # ---- one step ----------------------------------------------------------------------------

    def forward(self, rows: list[Row], num_logits: list[int] | None = None) -> torch.Tensor:
        """`forward_paged` over this runner's model and pool; float32 logits."""
        return forward_paged(self.model, self.pool, rows, num_logits).float()

    @staticmethod
    def prepare(batch: ScheduledBatch, block_table: Callable[[str], list[int]],
                drafts: dict[int, Draft]) -> tuple[list[Row], list[int]]:
        """The forward's rows (a drafted row carries its draft tokens after the scheduled one) and how
        many logits each row needs (1, or 1 + its draft tokens for verification)."""
        rows, num_logits = [], []
        for i, s in enumerate(batch.seqs):
            draft = drafts[i].tokens if i in drafts else []
            rows.append((block_table(s.seq.seq_id), s.start, s.token_ids + draft))
            num_logits.append(len(draft) + 1)
        return rows, num_logits

    @torch.no_grad()
    def execute(self, batch: ScheduledBatch, block_table: Callable[[str], list[int]]) -> ModelRunnerOutput:
        """Draft (if speculative), run the forward, sample or verify every row that reached its end."""
        out = ModelRunnerOutput()
        if self.spec is not None:
            out.drafts = self.spec.propose(batch, self._generators)
        rows, num_logits = self.prepare(batch, block_table, out.drafts)
        if self.adapters.ids:
            self.adapters.set_batch([self._adapter_ids[s.seq.seq_id] for s in batch.seqs],
                                    [len(r[2]) for r in rows], num_logits, self.device)
        logits = self.forward(rows, num_logits if out.drafts else None)
        ends = torch.tensor(num_logits).cumsum(0).tolist()
        plain = [i for i, s in enumerate(batch.seqs) if s.needs_sample and i not in out.drafts]
        if plain:
            self._sample([batch.seqs[i].seq for i in plain], logits[[ends[i] - 1 for i in plain]], out)
        for i, draft in out.drafts.items():
            seq = batch.seqs[i].seq
            target = logits[ends[i] - len(draft.tokens) - 1 : ends[i]]
            out.sampled[seq.seq_id] = self.spec.verify(seq, draft, target, self._generators[seq.seq_id])
        return out

    def after_update(self, batch: ScheduledBatch, out: ModelRunnerOutput) -> None:
        """Called once the scheduler has recorded `out`: speculative decoding gives back unused slots."""
        if self.spec is not None and out.drafts:
            self.spec.commit(batch, out.drafts, out.sampled)

    def _sample(self, seqs: list[Sequence], raw: torch.Tensor, out: ModelRunnerOutput) -> None:
        """One token per sequence from its last logits: penalties, sampling, logprobs."""
        params = [s.sampling_params for s in seqs]
        processed = apply_penalties(raw, [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs],
                                    params)
        if self.guided is not None:  # structured outputs: only what each sequence's grammar allows
            self.guided.mask(seqs, processed)
        tokens, chosen_lp, (top_ids, top_lp) = sample(processed, params, [self._generators[s.seq_id] for s in seqs],
                                                      raw_logits=raw)
        chosen = chosen_lp.tolist()
        for j, seq in enumerate(seqs):
            tok = int(tokens[j])
            out.sampled[seq.seq_id] = tok
            if self.guided is not None:
                self.guided.advance(seq, tok)
            out.chosen_logprobs[seq.seq_id] = chosen[j]
            k = seq.sampling_params.logprobs
            if k is not None:
                entry = {tok: float(chosen_lp[j])}
                entry.update({int(t): float(v) for t, v in zip(top_ids[j, :k], top_lp[j, :k])})
                out.logprobs[seq.seq_id] = entry
