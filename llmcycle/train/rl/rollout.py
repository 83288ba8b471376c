"""Rollouts for online post-training: sampling completions, and laying prompt+completion out for scoring.

- `Sampler` is the interface PPO and GRPO generate through; `SimpleSampler` implements it with the
  contiguous `KVCache`: prompts left-padded into one batch, positions per row so every prompt starts at
  position 0 (a row's result does not depend on its neighbours), one prefill, then one token per step
  for all rows, each row stopping on its own. `generation.sampler: engine` uses the serving engine
  instead (`llmcycle.serve.rollouts.EngineSampler`: paged KV cache, continuous batching).
- `RolloutBatch` lays each prompt+completion out as one right-padded row (positions from 0, no attention
  mask needed: causal attention never looks right), and `rollout_logps` / `rollout_values` /
  `sequence_scores` read per-completion-token log-probs, values and last-token scores off it.
- Shared by ppo.py and grpo.py: checking the `generation` recipe section, stop ids, per-iteration seeds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import last_token_scores
from llmcycle.model.kv_cache import KVCache
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.config import (
    GenerationSection,
)
from llmcycle.train.core.masking import IGNORE
from llmcycle.train.posttrain.logps import token_logps

# ---- sampling --------------------------------------------------------------------------------------


class Sampler(Protocol):
    def generate(self, model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> list[list[int]]:
        """Completion ids per prompt: at most max_new_tokens, ending at (and including) the first stop token
        when one is produced. temperature 0 is greedy; top_k / top_p (None: off) filter before sampling;
        `generator` makes sampling reproducible."""
        ...


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits [B, V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the top_k tokens and the top_p nucleus."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the more likely ones already cover top_p; the most likely always stays.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class SimpleSampler:
    """Batched KV-cache sampling with one forward per generated token for the whole batch.

    `batch_size` rows are generated together (None: all prompts at once). The default PPO/GRPO sampler
    although the serving engine can do the same (`EngineSampler`, `generation.sampler: engine`): a run's
    weights depend on the exact tokens sampled, and this sampler's random stream is what every recipe's
    results were made with; it samples from the live policy inside the training step (DDP-wrapped, with the
    same temperature / top-k / top-p the log-probs are taken at) without building an engine per rollout.
    """

    def __init__(self, batch_size: int | None = None):
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> list[list[int]]:
        was_training = model.training
        model.eval()
        step = self.batch_size or max(len(prompts), 1)
        out: list[list[int]] = []
        try:
            for i in range(0, len(prompts), step):
                out += self._generate(model, prompts[i: i + step], max_new_tokens, temperature, top_k, top_p,
                                      set(stop_ids), generator)
        finally:
            model.train(was_training)
        return out

    def _generate(self, model, prompts, max_new_tokens, temperature, top_k, top_p, stop, generator):
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        if torch.is_autocast_enabled(device.type):  # keys/values come out of the projections in this dtype
            dtype = torch.get_autocast_dtype(device.type)
        context = model.config.max_position_embeddings
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        if max(len(p) for p in prompts) > context:
            raise ValueError(f"a prompt of {max(map(len, prompts))} tokens is longer than the model's "
                             f"context of {context}")
        # A row's positions run 0..len-1 then on; none fed may pass the model's context (the token
        # predicted at the last position is not fed back, hence + 1).
        budgets = [min(max_new_tokens, context - len(p) + 1) for p in prompts]
        B, P = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros((B, P), dtype=torch.long, device=device)
        real = torch.zeros((B, P), dtype=torch.bool, device=device)
        for r, p in enumerate(prompts):
            ids[r, P - len(p):] = torch.tensor(p, device=device)
            real[r, P - len(p):] = True
        positions = (torch.arange(P, device=device)[None, :] - (P - lengths)[:, None]).clamp(min=0)
        # Prefill mask: causal over real keys. Padding queries attend to themselves only, so no softmax
        # row is empty (an all-masked row is NaN, and NaN values leak through a 0 attention weight).
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        pad_self = torch.eye(P, dtype=torch.bool, device=device) & ~real[:, :, None]
        mask4d = ((causal[None] & real[:, None, :]) | pad_self)[:, None]
        cache = KVCache(model.config, B, P + max(budgets), device=device, dtype=dtype)
        logits = model(ids, positions=positions, kv_cache=cache, attention_mask=mask4d)[:, -1]
        key_mask = real.long()
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for t in range(max(budgets)):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)
            for r, tok in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                out[r].append(tok)
                done[r] = tok in stop or len(out[r]) >= budgets[r]
            if all(done):
                break
            key_mask = torch.cat([key_mask, torch.ones((B, 1), dtype=torch.long, device=device)], dim=1)
            logits = model(nxt[:, None], positions=(lengths + t)[:, None], kv_cache=cache,
                           attention_mask=key_mask)[:, -1]
        return out


# ---- prompt + completion rows ----------------------------------------------------------------------


@dataclass
class RolloutBatch:
    """Prompt+completion, one right-padded row each; completion tensors [N, C] start at column 0."""

    input_ids: torch.Tensor  # [N, T]
    prompt_lengths: torch.Tensor  # [N]
    completion_ids: torch.Tensor  # [N, C], pad after each completion
    mask: torch.Tensor  # [N, C] float, 1 on completion tokens

    def to(self, device) -> RolloutBatch:
        return RolloutBatch(*(x.to(device) for x in (self.input_ids, self.prompt_lengths, self.completion_ids,
                                                      self.mask)))

    def select(self, rows) -> RolloutBatch:
        """Some rows, at the full width: a micro-batch computes exactly what the whole batch did."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return RolloutBatch(self.input_ids[rows], self.prompt_lengths[rows], self.completion_ids[rows],
                            self.mask[rows])

    @property
    def lengths(self) -> torch.Tensor:
        return self.prompt_lengths + self.mask.sum(1).long()

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def rollout_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                  ) -> RolloutBatch:
    N = len(prompts)
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    C = max(max((len(c) for c in completions), default=0), 1)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    comp = torch.full((N, C), pad_id, dtype=torch.long)
    mask = torch.zeros((N, C))
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        if c:
            comp[r, : len(c)] = torch.tensor(list(c), dtype=torch.long)
            mask[r, : len(c)] = 1.0
    return RolloutBatch(ids, torch.tensor([len(p) for p in prompts]), comp, mask)


def _completion_columns(x: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """x [N, T, ...] at the positions that predict each completion token -> [N, C, ...]: column t of a row
    is position prompt_length - 1 + t (the state before completion token t)."""
    C, T = batch.completion_ids.shape[1], x.shape[1]
    idx = (batch.prompt_lengths[:, None] - 1 + torch.arange(C, device=x.device)[None, :]).clamp(max=T - 1)
    if x.dim() == 3:
        idx = idx[:, :, None].expand(-1, -1, x.shape[2])
    return x.gather(1, idx)


def rollout_logps(model: torch.nn.Module, batch: RolloutBatch, temperature: float = 1.0) -> torch.Tensor:
    """log pi(completion token t | prompt, tokens < t) [N, C] in fp32, 0 on padding, at `temperature`."""
    logits = _completion_columns(model(batch.input_ids), batch)
    if temperature > 0 and temperature != 1.0:
        logits = logits.float() / temperature
    targets = batch.completion_ids.masked_fill(batch.mask == 0, IGNORE)
    return token_logps(logits, targets)


def rollout_values(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """A scalar-head model's value of the state before each completion token [N, C], 0 on padding."""
    return _completion_columns(model(batch.input_ids), batch).float() * batch.mask


def sequence_scores(model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
    """A scalar-head model's score of each prompt+completion at its last token [N] (as reward models are
    trained and as transformers' sequence classifiers read them)."""
    return last_token_scores(model(batch.input_ids), batch.lengths).float()


def in_chunks(fn: Callable[[RolloutBatch], torch.Tensor], batch: RolloutBatch, size: int) -> torch.Tensor:
    """fn over row chunks of `size` (bounded memory), concatenated."""
    return torch.cat([fn(batch.select(range(i, min(i + size, len(batch))))) for i in range(0, len(batch), size)])


# ---- shared by ppo.py and grpo.py --------------------------------------------------------------------


def make_sampler(g: GenerationSection) -> Sampler:
    if g.sampler == "engine":
        from llmcycle.serve.rollouts import EngineSampler

        return EngineSampler()
    return SimpleSampler(g.batch_size or None)


def check_generation(g: GenerationSection) -> None:
    if g.temperature <= 0:
        raise LlmcycleError("generation.temperature must be > 0 for online training: the policy is trained on "
                            "the log-probs of what it sampled.")
    if g.max_new_tokens < 1:
        raise LlmcycleError("generation.max_new_tokens must be at least 1.")
    if g.top_p is not None and not 0 < g.top_p <= 1:
        raise LlmcycleError("generation.top_p must be in (0, 1].")


def stop_ids(tok: Tokenizer) -> list[int]:
    """End-of-turn and eos: a completion ends with one of them (or runs out of tokens)."""
    return list(tok.end_of_turn_ids)


def iteration_seed(seed: int, iteration: int, rank: int, salt: str = "sample") -> int:
    """A seed per (run seed, iteration, process): sampling and shuffling at iteration k are the same whether
    the run went straight through or resumed, on every process, with no generator state to store."""
    digest = hashlib.sha256(f"{seed}:{iteration}:{rank}:{salt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def decode_completions(tok: Tokenizer, completions: list[list[int]], stop: Sequence[int]) -> list[str]:
    """Completion text without its stop token and special tokens: what reward functions read."""
    stop = set(stop)
    return [tok.decode([t for t in c if t not in stop], skip_special_tokens=True) for c in completions]
