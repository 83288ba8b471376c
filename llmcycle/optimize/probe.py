"""What serving a model directory costs here: `python -m llmcycle.optimize.probe MODEL_DIR` loads it the way
the engine does and prints one JSON line: batch-1 decode tokens/s, tokens/s with `--concurrency` requests at
once, the resident memory after loading and its peak, and the bytes its tensors hold.

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


def probe(model_dir: str, tokens: int = 32, concurrency: int = 16, prompt_len: int = 16, repeats: int = 3) -> dict:
    import torch

    from llmcycle import memory
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.model_runner import ModelRunner
    from llmcycle.serve.sampling import SamplingParams

    torch.set_flush_denormal(True)
    model = ModelRunner.load_weights(model_dir)
    loaded_mb = memory.rss_mb()
    per_seq = -(-(prompt_len + tokens) // 16)
    engine = LLMEngine(None, model=model, block_size=16, num_blocks=concurrency * per_seq + 1,
                       max_num_seqs=concurrency)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(prompt_len)] for _ in range(concurrency)]
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
    together = run(prompts)
    tensors = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    packed = sum(m._packed.numel() for m in model.modules() if getattr(m, "_packed", None) is not None)
    return {"batch1_tok_s": single, "concurrent_tok_s": together, "concurrency": concurrency,
            "loaded_rss_mb": loaded_mb, "peak_rss_mb": memory.peak_rss_mb(),
            "tensor_bytes": sum(tensors.values()) + packed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    p.add_argument("--concurrency", type=int, default=16, help="requests at once in the throughput run")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args()
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    print(json.dumps(probe(a.model_dir, a.tokens, a.concurrency)))


if __name__ == "__main__":
    main()
