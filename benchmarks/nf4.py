"""NF4 dequantize + matmul: llmcycle's torch implementation against bitsandbytes' CPU backend.

For a 4096x4096 and a 1024x4096 weight ([out, in], NF4, block size 64, with and without double
quantization) it times, on the same packed bytes:

- dequantize: `llmcycle.optimize.nf4.dequantize_nf4(kernel="torch")` against
  `bnb.functional.dequantize_4bit` (on CPU a C++ kernel), to fp32 and to bf16;
- dequantize + matmul: `Linear4bit.forward` (kernel "torch") against `bnb.matmul_4bit` (on CPU without a
  grad: the same C++ dequantization, then `F.linear`), for `--tokens` rows of fp32 activations;
- forward + backward to the activations (QLoRA's training path): `Linear4bit` (dequantizes again in the
  backward) against `bnb.matmul_4bit` with a grad (its `MatMul4Bit` does the same);
- the dense `F.linear` with the fp32 weight, as the floor both sides pay.

Timed calls of all variants are interleaved (load from other processes hits them alike); the median is
reported. The ratio is ours / bitsandbytes (below 1: ours is faster). Where bitsandbytes is faster,
`kernel="auto"` (the default of `dequantize_nf4` and `Linear4bit`) already uses its op on our bytes.

    PYTHONPATH=. python benchmarks/nf4.py                 # ~1 minute on 2 cores
    PYTHONPATH=. python benchmarks/nf4.py --tokens 1 --reps 20
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/nf4.py --threads 1   # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import bitsandbytes as bnb
import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

from llmcycle.optimize.nf4 import Linear4bit, dequantize_nf4

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_flags() -> list[str]:
    """The SIMD flags that decide which kernels run (lscpu's Flags line)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    line = next((ln for ln in out.splitlines() if ln.startswith("Flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in FLAGS if f in have]


def bench(fns: dict, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each function, the calls of all interleaved."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + reps):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def run_shape(out_f: int, in_f: int, double_quant: bool, tokens: int, reps: int, warmup: int) -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_f, out_f, bias=False)
    w = linear.weight.detach()
    layer = Linear4bit.from_linear(linear, blocksize=64, double_quant=double_quant)
    layer.kernel = "torch"  # ours; "auto" would call bitsandbytes' op on the same bytes
    packed, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    state = layer.state()
    x = torch.randn(tokens, in_f)

    xg = x.clone().requires_grad_(True)

    def bnb_deq(dtype):
        qs.dtype = dtype
        return bnb.functional.dequantize_4bit(packed, qs)

    def bnb_matmul(a):
        qs.dtype = torch.float32
        return bnb.matmul_4bit(a, packed.t(), qs)

    def train_step(forward):
        # QLoRA's path: a gradient for the activations, none for the frozen 4-bit weight.
        with torch.enable_grad():
            forward(xg).sum().backward()
        xg.grad = None

    with torch.no_grad():
        t = bench({
            "ours dequantize fp32": lambda: dequantize_nf4(state, torch.float32, "torch"),
            "bnb  dequantize fp32": lambda: bnb_deq(torch.float32),
            "ours dequantize bf16": lambda: dequantize_nf4(state, torch.bfloat16, "torch"),
            "bnb  dequantize bf16": lambda: bnb_deq(torch.bfloat16),
            "ours deq+matmul": lambda: layer(x),
            "bnb  deq+matmul": lambda: bnb_matmul(x),
            "dense F.linear fp32": lambda: F.linear(x, w),
            "ours fwd+bwd": lambda: train_step(layer),
            "bnb  fwd+bwd": lambda: train_step(bnb_matmul),
        }, reps, warmup)
    print(f"\nweight {out_f}x{in_f}, double_quant={double_quant}, x [{tokens}, {in_f}] fp32 (median of {reps})")
    for k, v in t.items():
        print(f"  {k:<22} {v * 1e3:9.2f} ms")
    for what in ("dequantize fp32", "dequantize bf16", "deq+matmul", "fwd+bwd"):
        print(f"  ratio ours/bnb {what:<16} {t['ours ' + what] / t['bnb  ' + what]:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=256, help="rows of the activations (default 256)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); set OMP_NUM_THREADS too, "
                   "for bitsandbytes' OpenMP kernels")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), bitsandbytes {bnb.__version__}, load {os.getloadavg()[0]:.1f}")
    print(f"lscpu flags: {' '.join(cpu_flags()) or '(none of ' + ', '.join(FLAGS) + ')'}")
    for out_f, in_f in ((4096, 4096), (1024, 4096)):
        for dq in (False, True):
            run_shape(out_f, in_f, dq, args.tokens, args.reps, args.warmup)


if __name__ == "__main__":
    main()
