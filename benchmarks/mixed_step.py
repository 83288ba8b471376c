"""One engine step that mixes decodes with a prefill chunk, against the same work done as two steps.

The serving engine batches whatever is pending into one forward: under Poisson arrivals a new request's
prompt is prefilled in the same step as the running requests' decodes. This measures that step directly on
the runner's paged forward (`model_runner.forward_paged`), random weights, one process:

- decode: `--decodes` rows of one new token, each with `--context` tokens cached;
- prefill: one row of `--prefill` new tokens on an empty cache;
- mixed: both in one forward.

It prints the median ms of each over `--repeats` and mixed / (decode + prefill): 1.0 means mixing costs
nothing extra; a right-padded batch (every row padded to the chunk's length) measured 12x.

    PYTHONPATH=. python benchmarks/mixed_step.py                  # the "base" 82M model, fp32
    PYTHONPATH=. python benchmarks/mixed_step.py --size mini --threads 1
    PYTHONPATH=. python benchmarks/mixed_step.py --dtype bfloat16     # on a CPU with native bf16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

from llmcycle.model.config import config_for_size  # noqa: E402
from llmcycle.model.transformer import Transformer  # noqa: E402
from llmcycle.serve.kv_pool import KVPool  # noqa: E402
from llmcycle.serve.model_runner import forward_paged  # noqa: E402
from llmcycle.serve.packed_linear import pack_linears  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `repeats` calls after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def measure(model: Transformer, decodes: int, context: int, prefill: int, repeats: int,
            block_size: int = 16) -> dict[str, float]:
    """Median ms of the decode step, the prefill step and the mixed step, and the mixed / parts ratio."""
    per_row = -(-(max(context + 1, prefill)) // block_size)
    dtype = next(model.parameters()).dtype
    pool = KVPool(model.config, (decodes + 1) * per_row, block_size, dtype=dtype)
    tables = [list(range(i * per_row, (i + 1) * per_row)) for i in range(decodes + 1)]
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    dec = [(tables[i], context, torch.randint(0, vocab, (1,), generator=g).tolist()) for i in range(decodes)]
    pre = [(tables[-1], 0, torch.randint(0, vocab, (prefill,), generator=g).tolist())]
    ms = {"decode": timed(lambda: forward_paged(model, pool, dec), repeats),
          "prefill": timed(lambda: forward_paged(model, pool, pre), repeats),
          "mixed": timed(lambda: forward_paged(model, pool, dec + pre), repeats)}
    ms["ratio"] = ms["mixed"] / (ms["decode"] + ms["prefill"])
    return ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="base", help="config_for_size name (base: 82M parameters)")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--decodes", type=int, default=15)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and KV cache")
    p.add_argument("--no-pack", action="store_true", help="keep nn.Linear (the engine packs where can_pack holds)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    from llmcycle.threads import set_threads

    threads = set_threads(a.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = Transformer(config_for_size(a.size, vocab_size=a.vocab)).eval().to(getattr(torch, a.dtype))
    if not a.no_pack:
        pack_linears(model)  # as ModelRunner.load_weights does
    r = measure(model, a.decodes, a.context, a.prefill, a.repeats)
    print(f"machine: {cpu_name()}, threads {threads}, model {a.size}, {a.dtype}, "
          f"{'nn.Linear' if a.no_pack else 'packed linear layers'}")
    print(f"{a.decodes} decodes at context {a.context}: {r['decode']:.1f} ms; prefill of {a.prefill}: "
          f"{r['prefill']:.1f} ms; both in one step: {r['mixed']:.1f} ms = {r['ratio']:.2f}x the parts")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": cpu_name(), "threads": threads, **vars(a), **r}, indent=1))


if __name__ == "__main__":
    main()
