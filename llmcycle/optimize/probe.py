"""What serving a model directory costs here: `python -m llmcycle.optimize.probe MODEL_DIR` loads it the way
the engine does and prints one JSON line: batch-1 decode tokens/s, tokens/s with `--concurrency` requests at
once, the resident memory after loading and its peak.

It runs in a process of its own so that the peak resident set is this model's alone (the `quantize` stage of
`llmcycle run` probes the final model and each quantized variant this way). Prompts are fixed random token
ids (no tokenizer needed), greedy, with end-of-sequence ignored, so every variant decodes the same count.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any


def random_prompts(vocab: int, n: int, length: int = 16) -> list[list[int]]:
    """`n` prompts of `length` token ids drawn from a fixed seed, above the special ids."""
    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


def decode_speed(model: Any, tokens: int, concurrency: int, prompt_len: int = 16,
                 repeats: int = 3) -> tuple[float, float]:
    """(batch-1 tokens/s, the median of `repeats` after a warm-up; tokens/s of `concurrency` requests at once)
    of greedy decoding through the engine, `tokens` new tokens a request."""
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.sampling import SamplingParams

    per_seq = -(-(prompt_len + tokens) // 16)
    engine = LLMEngine(None, model=model, block_size=16, num_blocks=concurrency * per_seq + 1,
                       max_num_seqs=concurrency)
    prompts = random_prompts(model.config.vocab_size, concurrency, prompt_len)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    def run(batch: list[list[int]]) -> float:
        for p in batch:
            engine.add_request(p, params)
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return len(batch) * tokens / (time.perf_counter() - start)

    run(prompts[:1])  # warm-up: first calls pick kernels and lay weights out
    single = statistics.median(run(prompts[:1]) for _ in range(repeats))
    return single, run(prompts)


def probe(model_dir: str, tokens: int = 32, concurrency: int = 16) -> dict:
    import torch

    from llmcycle import memory
    from llmcycle.serve.model_runner import ModelRunner

    torch.set_flush_denormal(True)
    model = ModelRunner.load_weights(model_dir)
    loaded_mb = memory.rss_mb()
    single, together = decode_speed(model, tokens, concurrency)
    return {"batch1_tok_s": single, "concurrent_tok_s": together, "concurrency": concurrency,
            "loaded_rss_mb": loaded_mb, "peak_rss_mb": memory.peak_rss_mb()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--concurrency", type=int, default=16, help="requests at once in the throughput run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the CPUs this process may use)")
    a = p.parse_args()
    from llmcycle.threads import set_threads

    set_threads(a.threads)
    print(json.dumps(probe(a.model_dir, a.tokens, a.concurrency)))


if __name__ == "__main__":
    main()
