"""The serving engine as the rollout sampler of online post-training (PPO, GRPO).

`EngineSampler` implements `llmcycle.train.rl.rollout.Sampler` over an `LLMEngine` built around the live
policy (its weights change every iteration, so the engine, and its KV pool, is built per call: the pool
is a small allocation next to a rollout). All prompts are submitted at once and decoded with continuous
batching: a short completion frees its slot at once instead of padding along with the longest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmcycle.serve.engine import LLMEngine
from llmcycle.serve.sampling import SamplingParams


class EngineSampler:
    """Token-id rollouts through the paged engine; same contract as `SimpleSampler.generate`."""

    def __init__(self, block_size: int = 16, kv_cache_bytes: int = 64 * 2**20, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 4096) -> None:
        self.engine_args = dict(block_size=block_size, kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens)

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 stop_ids: Sequence[int] = (), generator: torch.Generator | None = None) -> list[list[int]]:
        model = getattr(model, "module", model)  # DDP
        if any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        context = model.config.max_position_embeddings
        if max(map(len, prompts), default=0) >= context:
            raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no room in the model's "
                             f"context of {context}")
        was_training = model.training
        model.eval()
        try:
            engine = LLMEngine(None, model=model, enable_prefix_caching=True, **self.engine_args)
            ids = []
            for p in prompts:
                # One seed per prompt from the caller's generator: reproducible, independent of batching.
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator)) if generator is not None else None
                params = SamplingParams(temperature=temperature, top_k=top_k or -1, top_p=top_p or 1.0,
                                        max_tokens=min(max_new_tokens, context - len(p)), seed=seed,
                                        stop_token_ids=list(stop_ids), ignore_eos=True)
                ids.append(engine.add_request(list(p), params))
            done: dict[str, list[int]] = {}
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out.outputs[0].token_ids
            return [done[i] for i in ids]
        finally:
            model.train(was_training)
