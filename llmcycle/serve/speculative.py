"""Speculative decoding with a small draft model (Leviathan et al. 2023; Chen et al. 2023).

Each step, for every decoding sequence that qualifies, the draft proposes k tokens one by one from its
own paged KV pool (same block tables as the target: a slot id means the same token in both pools), and
the target scores all k + 1 positions in one forward. Acceptance keeps the output exactly what the target
alone would produce:
- greedy: draft tokens are kept while they equal the target's argmax; the first disagreement is
  replaced by the target's argmax, and when all agree the target's next argmax comes free;
- sampling: draft token x is kept with probability min(1, p(x) / q(x)); on the first rejection a token is
  drawn from norm(max(0, p - q)); if all k are kept one more is drawn from p. The emitted tokens are
  then distributed exactly as sampling from the target (p, q after temperature / top-k / top-p / min-p).
Sequences with penalties or logprobs requested decode normally (their processed distribution depends on
the tokens before, which complicates verification for little gain).

`SpeculativeDecoder` is all of it: planning (which rows draft, how many tokens, slots reserved), drafting,
verification and acceptance, and the bookkeeping after the scheduler recorded the step (unused slots
given back, how far each sequence's draft K/V goes). The model runner calls `propose` before its forward,
`verify` per drafted row after it, and `commit` once the scheduler has appended the accepted tokens. Of
the block manager it needs only `BlockSlots`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.serve.kv_pool import KVPool
from llmcycle.serve.model_runner import ModelRunner
from llmcycle.serve.sampling import SamplingParams, process_logits
from llmcycle.serve.scheduler import ScheduledBatch, ScheduledSeq, Sequence


def qualifies(params: SamplingParams) -> bool:
    """Whether a request can be decoded speculatively (see the module docstring)."""
    return (params.repetition_penalty == 1.0 and params.presence_penalty == 0.0
            and params.frequency_penalty == 0.0 and params.logprobs is None)


def accept_greedy(target_logits: torch.Tensor, draft_tokens: list[int]) -> list[int]:
    """target_logits [k+1, V] at the positions of (last token, d1..dk) -> the tokens to emit (1..k+1)."""
    best = target_logits.argmax(dim=-1).tolist()
    out = []
    for i, d in enumerate(draft_tokens):
        if d != best[i]:
            out.append(best[i])
            return out
        out.append(d)
    out.append(best[len(draft_tokens)])
    return out


def accept_sampled(target_probs: torch.Tensor, draft_probs: torch.Tensor, draft_tokens: list[int],
                   generator: torch.Generator | None) -> list[int]:
    """Rejection sampling: target_probs [k+1, V], draft_probs [k, V] (what d1..dk were drawn from)."""
    k = len(draft_tokens)
    u = torch.rand(k, generator=generator, device=target_probs.device).tolist()
    out = []
    for i, d in enumerate(draft_tokens):
        p, q = float(target_probs[i, d]), float(draft_probs[i, d])
        if q > 0 and u[i] < min(1.0, p / q):
            out.append(d)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_(min=0)
        total = float(residual.sum())
        dist = residual / total if total > 0 else target_probs[i]
        out.append(int(torch.multinomial(dist, 1, generator=generator)))
        return out
    out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
    return out


@dataclass
class SpecStats:
    """vLLM's spec-decode counters: acceptance rate = accepted / draft tokens."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


class BlockSlots(Protocol):
    """The part of `BlockManager` speculative decoding uses: draft tokens need slots before they are kept."""

    def block_table(self, seq_id: str) -> list[int]: ...

    def reserve(self, seq_id: str, extra_tokens: int) -> bool: ...

    def trim(self, seq_id: str) -> None: ...

    def __contains__(self, seq_id: object) -> bool: ...


@dataclass
class Draft:
    """One row's draft: its tokens and the processed draft distributions [k, V] they were drawn from."""

    tokens: list[int]
    probs: torch.Tensor


@dataclass
class SpeculativeDecoder:
    """The draft model (a `ModelRunner` with its own pool), and how far each sequence's draft K/V is computed."""

    draft: ModelRunner
    blocks: BlockSlots
    num_speculative_tokens: int
    computed: dict[str, int] = field(default_factory=dict)
    stats: SpecStats = field(default_factory=SpecStats)

    @classmethod
    def load(cls, model_dir: str | Path, target: ModelRunner, blocks: BlockSlots,
             num_speculative_tokens: int) -> SpeculativeDecoder:
        """Load the draft model next to `target`: same device and dtype, a pool of the same geometry (a slot
        id means the same token in both pools, so the target's block tables serve the draft too)."""
        p = next(target.model.parameters())
        model = ModelRunner.load_weights(model_dir, device=p.device, dtype=p.dtype, fuse=True)  # drafts take no LoRA
        if model.config.vocab_size != target.model.config.vocab_size:
            raise LlmcycleError(f"the draft model's vocabulary ({model.config.vocab_size}) differs from the "
                                f"target's ({target.model.config.vocab_size}); they must share a tokenizer.")
        if num_speculative_tokens < 1:
            raise LlmcycleError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        pool = KVPool(model.config, target.pool.num_blocks, target.pool.block_size, device=p.device, dtype=p.dtype)
        return cls(ModelRunner(model, pool), blocks, num_speculative_tokens)

    def forget(self, seq_id: str) -> None:
        self.computed.pop(seq_id, None)

    # ---- before the target's forward ---------------------------------------------------------

    def plan(self, batch: ScheduledBatch) -> dict[int, int]:
        """Which rows decode speculatively this step, and how many draft tokens each (slots reserved)."""
        for seq in batch.preempted:
            self.forget(seq.seq_id)  # its draft K/V went with its blocks
        plan = {}
        for i, s in enumerate(batch.seqs):
            seq = s.seq
            if not (s.needs_sample and s.num_new_tokens == 1 and seq.output_token_ids
                    and qualifies(seq.sampling_params)):
                continue
            # Emitting at most k + 1 tokens must not pass max_tokens (which also keeps us in context).
            k = min(self.num_speculative_tokens, seq.sampling_params.max_tokens - len(seq.output_token_ids) - 1)
            if k >= 1 and self.blocks.reserve(seq.seq_id, k):
                plan[i] = k
        return plan

    def propose(self, batch: ScheduledBatch, generators: dict[str, torch.Generator | None]) -> dict[int, Draft]:
        """Plan, then draft: {batch row: Draft} for the rows that decode speculatively this step."""
        plan = self.plan(batch)
        if not plan:
            return {}
        idx = list(plan)
        seqs = [batch.seqs[i].seq for i in idx]
        rows = [(q.seq_id, self.blocks.block_table(q.seq_id), batch.seqs[i].start, batch.seqs[i].start + 1, q.tokens)
                for i, q in zip(idx, seqs)]
        toks, qs = self.draft_tokens(rows, [plan[i] for i in idx], [q.sampling_params for q in seqs],
                                     [generators[q.seq_id] for q in seqs])
        return {i: Draft(t, q) for i, t, q in zip(idx, toks, qs)}

    def sync_rows(self, rows: list[tuple[str, list[int], int, int, list[int]]]) -> torch.Tensor:
        """Bring each row's draft K/V up to `end` and return the draft's logits there [B, V].

        A row is (seq id, block table, start, end, all tokens so far): the target computes tokens
        [start, end) this step. The draft catches up lazily: a sequence it has not seen (new, or
        recomputed after preemption) is fed from token 0, one seen before from where its draft K/V
        ends (before `start` when the last accepted draft token was never fed to the draft).
        """
        feed = []
        for sid, table, start, end, tokens in rows:
            begin = min(self.computed.get(sid, 0), start)
            feed.append((table, begin, tokens[begin:end]))
            self.computed[sid] = end
        return self.draft.forward(feed)

    def draft_tokens(self, rows: list[tuple[str, list[int], int, int, list[int]]], ks: list[int],
                     params: list[SamplingParams], generators: list[torch.Generator | None]
                     ) -> tuple[list[list[int]], list[torch.Tensor]]:
        """Draft ks[i] tokens after each row's `end` (rows as in `sync_rows`); returns the tokens and the
        processed draft distributions [k_i, V] they were drawn from."""
        logits = self.sync_rows(rows)
        tokens: list[list[int]] = [[] for _ in rows]
        probs: list[list[torch.Tensor]] = [[] for _ in rows]
        active = list(range(len(rows)))
        while active:
            q = process_logits(logits, [params[i] for i in active]).softmax(dim=-1)
            for j, i in enumerate(active):
                if params[i].greedy:
                    d = int(q[j].argmax())
                else:
                    d = int(torch.multinomial(q[j], 1, generator=generators[i]))
                tokens[i].append(d)
                probs[i].append(q[j])
            active = [i for i in active if len(tokens[i]) < ks[i]]
            if not active:
                break
            feed = []
            for i in active:
                sid, table, _, end, _ = rows[i]
                pos = end + len(tokens[i]) - 1  # the newest draft token's position
                feed.append((table, pos, [tokens[i][-1]]))
                self.computed[sid] = pos + 1
            logits = self.draft.forward(feed)
        self.stats.num_drafts += len(rows)
        self.stats.num_draft_tokens += sum(ks)
        return tokens, [torch.stack(p) for p in probs]

    # ---- after the target's forward ----------------------------------------------------------

    def verify(self, seq: Sequence, draft: Draft, target_logits: torch.Tensor,
               generator: torch.Generator | None) -> list[int]:
        """The tokens to emit for a drafted row, from the target's logits [k+1, V] at (last token, d1..dk)."""
        params = seq.sampling_params
        if params.greedy:
            tokens = accept_greedy(target_logits, draft.tokens)
        else:
            p = process_logits(target_logits, [params] * len(target_logits)).softmax(dim=-1)
            tokens = accept_sampled(p, draft.probs, draft.tokens, generator)
        self.stats.num_accepted_tokens += len(tokens) - 1
        return tokens

    def commit(self, batch: ScheduledBatch, drafts: dict[int, Draft], sampled: dict[str, int | list[int]]) -> None:
        """After the scheduler appended the emitted tokens: give back the slots rejected drafts held, and
        record how far each sequence's draft K/V is valid."""
        for i, draft in drafts.items():
            s: ScheduledSeq = batch.seqs[i]
            sid = s.seq.seq_id
            if sid not in self.blocks:
                self.forget(sid)  # finished in this step
                continue
            self.blocks.trim(sid)
            num_accepted = len(sampled[sid]) - 1
            # Draft K/V is valid through the accepted draft tokens that were fed to the draft (all but d_k).
            self.computed[sid] = s.start + 1 + min(num_accepted, len(draft.tokens) - 1)
