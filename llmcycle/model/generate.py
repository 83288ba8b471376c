"""Plain autoregressive sampling with a KV cache: for previews during training and for tests.

The serving engine (`llmcycle.serve.engine.LLM`) is the generator: `llmcycle generate`, `llmcycle serve`,
the evaluation suite and `generation.sampler: engine` rollouts use it. This helper stays for the places
where depending on the engine is wrong:
- inside a training loop (pretraining's sample continuations, post-training's held-out exact match): one
  prompt at a time from the live, in-memory model (DDP-wrapped or not), without allocating a paged KV pool
  next to the optimizer state, and with the RNG stream those runs have always drawn (their logged samples
  stay comparable run to run; they never touch the weights);
- as the reference the engine is tested against (greedy output token for token): the short, obviously
  correct implementation, with nothing of the engine's machinery in it.
"""

from __future__ import annotations

import torch

from llmcycle.model.kv_cache import KVCache
from llmcycle.model.transformer import Transformer


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop_ids: list[int] | tuple[int, ...] = (),
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt; temperature 0 is greedy. Returns only the new token ids."""
    if not prompt_ids:
        raise ValueError("generate needs at least one prompt token")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    max_len = min(len(prompt_ids) + max_new_tokens, model.config.max_position_embeddings)
    prompt_ids = prompt_ids[-max_len:]
    cache = KVCache(model.config, 1, max_len, device=device, dtype=dtype)
    x = torch.tensor([prompt_ids], device=device)
    out: list[int] = []
    while len(out) < max_new_tokens and cache.length + x.shape[1] <= max_len:
        logits = model(x, kv_cache=cache)[0, -1].float()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(nxt)
        if nxt in stop_ids:
            break
        x = torch.tensor([[nxt]], device=device)
    model.train(was_training)
    return out
