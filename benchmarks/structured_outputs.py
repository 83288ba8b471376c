"""What structured outputs cost: engine steps with every sequence under a grammar against the same steps free.

A random-weight model (the serve benchmark's builder) decodes `--requests` sequences in one batch, each
`--max-tokens` long, twice per repeat, interleaved: free (`ignore_eos`, so it runs the full length) and
guided by a grammar that cannot end before max_tokens (so both do the same number of steps): a regex of
lowercase words, or a JSON array of bounded strings long enough not to close early. It prints the decode
time per step of both, the ratio, and the grammar work alone (mask + advance per sequence per step), from
the engine's `GuidedDecoding` timed in place.

    PYTHONPATH=. python benchmarks/structured_outputs.py                      # mini, 16 sequences, 64 tokens
    PYTHONPATH=. python benchmarks/structured_outputs.py --size base --requests 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)
from serve import ROOT, build_model  # noqa: E402  (benchmarks/serve.py)

from llmcycle.serve.engine import LLM  # noqa: E402
from llmcycle.serve.guided import GuidedDecoding, StructuredOutputsParams  # noqa: E402
from llmcycle.serve.sampling import SamplingParams  # noqa: E402

GRAMMARS = {
    # never complete before 400 characters: a step never ends a sequence early
    "regex": StructuredOutputsParams(regex=r"[a-z]+( [a-z]+){80,200}"),
    "json": StructuredOutputsParams(json={"type": "array", "minItems": 60, "maxItems": 200,
                                          "items": {"type": "string", "maxLength": 6}}),
}


class Timed:
    """Wraps a GuidedDecoding's per-step work (mask and advance) with a clock."""

    def __init__(self, guided: GuidedDecoding) -> None:
        self.seconds, self.calls = 0.0, 0
        for name in ("mask", "advance"):
            real = getattr(guided, name)

            def timed(*a, _real=real, **k):
                t = time.perf_counter()
                try:
                    return _real(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t
            setattr(guided, name, timed)


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, int]:
    """Seconds and steps of generating every prompt in one batch (after its prefill)."""
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, params)
    engine.step()  # the prefill: the same for both
    steps, t = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return time.perf_counter() - t, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mini")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokenizer", type=Path, default=ROOT / "runs/default/sft/model")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)
    with tempfile.TemporaryDirectory() as work:
        model_dir = build_model(Path(work) / "model", a.size, a.tokenizer, tie=False)
        llm = LLM(model_dir, kv_cache_bytes=256 * 2**20)
        print(f"{cpu_name()}, {a.threads} threads, {a.size}, vocab {llm.engine.model.config.vocab_size}, "
              f"{a.requests} sequences x {a.max_tokens} tokens", flush=True)
        prompts = [f"Item {i}:" for i in range(a.requests)]
        free = SamplingParams(temperature=1.0, seed=0, max_tokens=a.max_tokens, ignore_eos=True)
        guided = llm.engine.guided()
        timer = Timed(guided)
        for name, grammar in GRAMMARS.items():
            constrained = SamplingParams(temperature=1.0, seed=0, max_tokens=a.max_tokens, structured_outputs=grammar)
            run(llm, prompts, free), run(llm, prompts, constrained)  # warm-up
            free_ms, guided_ms, grammar_ms = [], [], []
            for _ in range(a.repeats):
                s, n = run(llm, prompts, free)
                free_ms.append(1000 * s / n)
                timer.seconds = 0.0
                s, n = run(llm, prompts, constrained)
                guided_ms.append(1000 * s / n)
                grammar_ms.append(1000 * timer.seconds / n)
            f, g, m = (statistics.median(x) for x in (free_ms, guided_ms, grammar_ms))
            print(f"{name:>5}: free {f:6.2f} ms/step, guided {g:6.2f} ms/step ({g / f:.2f}x); grammar work "
                  f"{m:.2f} ms/step = {1000 * m / a.requests:.0f} us per sequence per step", flush=True)


if __name__ == "__main__":
    main()
