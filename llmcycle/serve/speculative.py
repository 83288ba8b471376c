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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.serve.kv_pool import KVPool, forward_paged
from llmcycle.serve.sampling import SamplingParams, process_logits


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


@dataclass
class Drafter:
    """The draft model, its KV pool, and how far each sequence's draft K/V is computed."""

    model: Transformer
    pool: KVPool
    num_speculative_tokens: int
    computed: dict[str, int] = field(default_factory=dict)
    stats: SpecStats = field(default_factory=SpecStats)

    @classmethod
    def load(cls, model_dir: str | Path, target: Transformer, target_pool: KVPool,
             num_speculative_tokens: int) -> Drafter:
        p = next(target.parameters())
        model = Transformer.from_pretrained(model_dir, device=p.device, dtype=p.dtype).eval()
        if model.config.vocab_size != target.config.vocab_size:
            raise LlmcycleError(f"the draft model's vocabulary ({model.config.vocab_size}) differs from the "
                                f"target's ({target.config.vocab_size}); they must share a tokenizer.")
        if num_speculative_tokens < 1:
            raise LlmcycleError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
        pool = KVPool(model.config, target_pool.num_blocks, target_pool.block_size, device=p.device, dtype=p.dtype)
        return cls(model, pool, num_speculative_tokens)

    def forget(self, seq_id: str) -> None:
        self.computed.pop(seq_id, None)

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
        return forward_paged(self.model, self.pool, feed).float()

    def propose(self, rows: list[tuple[str, list[int], int, int, list[int]]], ks: list[int],
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
            logits = forward_paged(self.model, self.pool, feed).float()
        self.stats.num_drafts += len(rows)
        self.stats.num_draft_tokens += sum(ks)
        return tokens, [torch.stack(p) for p in probs]
