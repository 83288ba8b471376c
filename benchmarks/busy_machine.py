"""Training on a busy machine: tokens/s alone against tokens/s beside one competing CPU-bound process.

Each measurement is a fresh child process that trains the 6.8M-parameter benchmark model (train_throughput.py's
shape, eager, fp32, AdamW, batch 8 x 256) for `--seconds` after two warm-up steps, through llmcycle's own
thread setup (`llmcycle.threads`: threads = usable CPUs, then following the CPUs other processes leave free
once per step; OpenMP threads that spin briefly then sleep). The "before" rows run the same child as every
llmcycle command ran until then: a fixed thread count per CPU and GNU OpenMP's default spin (300k).

Competitors, started before the trainer and killed after it:
- `python`: one pure-Python busy loop (one core's worth of work, no OpenMP);
- `torch`: a foreign PyTorch program multiplying 512x512 matrices in a loop with torch's default threads
  and OpenMP's default spinning (it did not import llmcycle);
- `llmcycle`: a second copy of the trainer.

    PYTHONPATH=. python benchmarks/busy_machine.py                  # ~3 min on 2 cores
    PYTHONPATH=. python benchmarks/busy_machine.py --competitors torch --seconds 10

Run it on an otherwise quiet machine: the idle rows are the baseline every other row is divided by.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from machine import cpu_name  # noqa: E402  (benchmarks/machine.py)

# "before": what every llmcycle command ran with until this benchmark existed (OpenMP's default spin, a fixed
# thread count per CPU); OMP_NUM_THREADS fixes the count, as an explicit `train.threads` does.
POLICIES = {"llmcycle": {}, "before": {"GOMP_SPINCOUNT": "300000", "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}}
COMPETITORS = {
    "python": [sys.executable, "-c", "while True: pass"],
    "torch": [sys.executable, "-c", "import torch\na = torch.randn(512, 512)\nwhile True: a @ a"],
    "llmcycle": [sys.executable, __file__, "--child", "--seconds", "100000"],
}


def child(seconds: float) -> None:
    """Train until `seconds` have passed; print tokens/s as JSON."""
    import torch
    import torch.nn.functional as F

    from llmcycle.model import ModelConfig, Transformer
    from llmcycle.threads import adapt_threads, set_threads

    threads = set_threads()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                      max_position_embeddings=512)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (8, 257))

    def step() -> None:
        adapt_threads()  # as Session.step does
        logits = model(x[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    print(json.dumps({"tok_s": steps * 8 * 256 / elapsed, "steps": steps, "threads": threads,
                      "threads_end": torch.get_num_threads(),
                      "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}))


def measure(policy: str, competitor: str | None, seconds: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **POLICIES[policy]}
    rival = None
    if competitor is not None:
        rival_env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if competitor == "llmcycle":
            rival_env.update(POLICIES[policy])  # two copies of the same program
        else:
            rival_env.pop("GOMP_SPINCOUNT", None)  # a foreign program: OpenMP's defaults
        rival = subprocess.Popen(COMPETITORS[competitor], env=rival_env, stdout=subprocess.DEVNULL)
        time.sleep(1.0)
    try:
        out = subprocess.run([sys.executable, __file__, "--child", "--seconds", str(seconds)], env=env,
                             capture_output=True, text=True, check=True)
    finally:
        if rival is not None:
            rival.kill()
            rival.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="timed training per measurement")
    p.add_argument("--competitors", default="python,torch,llmcycle", help="comma-separated subset")
    p.add_argument("--policies", default="llmcycle,before", help="comma-separated subset")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args()
    if a.child:
        child(a.seconds)
        return
    print(f"machine: {cpu_name()}")
    rows = []
    for policy in a.policies.split(","):
        idle = measure(policy, None, a.seconds)["tok_s"]
        rows.append({"policy": policy, "competitor": "none", "tok_s": idle, "of_idle": 1.0})
        print(f"{policy:9s} alone            {idle:9.0f} tok/s", flush=True)
        for comp in a.competitors.split(","):
            m = measure(policy, comp, a.seconds)
            busy = m["tok_s"]
            rows.append({"policy": policy, "competitor": comp, "tok_s": busy, "of_idle": busy / idle,
                         "threads_end": m["threads_end"]})
            print(f"{policy:9s} beside {comp:9s} {busy:9.0f} tok/s = {busy / idle:6.1%} of alone "
                  f"({m['threads_end']} threads at the end)", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": cpu_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
