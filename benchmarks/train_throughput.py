"""Pre-training throughput: llmcycle's Transformer against Hugging Face's LlamaForCausalLM.

Same configuration, same initial weights (our state dict copied into HF's), same batch, same loss
(cross-entropy on the logits, computed outside the model the same way for both), same AdamW, in one
process. Reports the median tokens/s of the timed steps (forward + backward + optimizer step) and
MFU against a matmul peak measured on this machine in the same run. `--device cuda` runs both sides on
the GPU (bf16 autocast there as on CPU) and measures the peak on it.

    python benchmarks/train_throughput.py --dtype both --json train_throughput.json
    python benchmarks/train_throughput.py --device cuda --dtype bf16 --batch 32 --seq 1024   # on a GPU
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

from llmcycle.model import ModelConfig, Transformer
from llmcycle.model.config import describe

# ~6.8M parameters: the "mini" shape with a 4096 vocabulary, untied.
BENCH_CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                    num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False,
                    max_position_embeddings=2048)


CPU = torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_seconds(a: torch.Tensor, b: torch.Tensor) -> float:
    """One matmul, timed to its end (a GPU runs it asynchronously)."""
    _sync(a.device)
    t = time.perf_counter()
    a @ b
    _sync(a.device)
    return time.perf_counter() - t


def matmul_peak(dtype: torch.dtype, budget_s: float = 2.0, device: torch.device = CPU) -> float:
    """Best FLOP/s of square matmuls (512..2048 on CPU, 2048..8192 on a GPU): the ceiling MFU is measured
    against.

    Grows the size only while one matmul stays cheap: on a CPU without native bf16 a 2048^3 bf16
    matmul takes about a minute instead of 0.1 s.
    """
    best = 0.0
    gpu = device.type == "cuda"
    for n in (2048, 4096, 8192) if gpu else (512, 1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        if gpu:
            _matmul_seconds(a, b)  # cuBLAS handle and kernel selection are not the matmul
        first = _matmul_seconds(a, b)
        fastest = first
        for _ in range(min(20, int(budget_s / first))):
            fastest = min(fastest, _matmul_seconds(a, b))
        best = max(best, 2 * n**3 / fastest)
        if first * 8 > budget_s:  # the next size costs 8x this one
            break
    return best


def matmul_rate(dtype: torch.dtype, n: int = 2048, device: torch.device = CPU) -> float:
    n = 8192 if device.type == "cuda" else n
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    return 2 * n**3 / _matmul_seconds(a, b)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def hf_llama(cfg: ModelConfig, state: dict[str, torch.Tensor]):
    import transformers

    hf_cfg = transformers.LlamaConfig.from_dict(cfg.to_hf_dict())
    model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model


def make_step(model: torch.nn.Module, is_hf: bool, x: torch.Tensor, y: torch.Tensor, bf16: bool,
              compile_: bool) -> Callable[[], float]:
    """One training step (forward, loss, backward, AdamW) as a closure returning the loss."""
    model.train()
    # fused AdamW runs on CPU too (torch >= 2.4) and is the fastest there; both sides get it.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compile_ else model

    def step() -> float:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            # HF: no KV cache while training (use_cache=True would build one every step).
            logits = fwd(input_ids=x, use_cache=False).logits if is_hf else fwd(x)
        # The loss is computed here, identically for both sides, not inside either model.
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the step on a GPU too

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="both")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also run torch.compile variants of both sides")
    p.add_argument("--sides", default="llmcycle,transformers", help="comma-separated subset")
    p.add_argument("--force-bf16", action="store_true",
                   help="run bf16 even when this CPU has no fast bf16 matmul (it can take minutes per step)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (both sides, batches and the matmul peak)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")

    # Denormals in fp32 backward slowed training up to 7x on this CPU; flush them to zero.
    torch.set_flush_denormal(True)
    cfg = ModelConfig(**BENCH_CONFIG)
    torch.manual_seed(0)
    ours0 = Transformer(cfg)
    state = {k: v.clone() for k, v in ours0.state_dict().items()}
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)
    flops_tok = cfg.flops_per_token(args.seq)

    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    if device.type == "cuda":
        print(f"machine: {device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}, "
              f"TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}; host {cpu_name()}")
    else:
        print(f"machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
              f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"model: {describe(cfg)} ({cfg.num_parameters():,} parameters), batch {args.batch} x {args.seq}")
    print(f"training FLOPs/token: {flops_tok / 1e6:.1f}M; matmul peak so far: fp32 {peaks['fp32'] / 1e9:.1f} "
          f"GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")

    native_bf16 = peaks["bf16"] > peaks["fp32"]
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    if "bf16" in dtypes and not native_bf16 and not args.force_bf16:
        # No AMX / AVX512-BF16 (CPU): bf16 matmuls are emulated and slower than fp32, so mixed precision
        # is not a setting anyone would train with here. Say so instead of timing it for hours.
        print("bf16: skipped, the bf16 matmul is slower than fp32 on this CPU (use --force-bf16 to time it)")
        dtypes.remove("bf16")
    sides = args.sides.split(",")
    results = []
    for dt in dtypes:
        variants = []
        for compile_ in [False, True] if args.compile else [False]:
            for side in sides:
                is_hf = side == "transformers"
                model = (hf_llama(cfg, state) if is_hf else copy.deepcopy(ours0)).to(device)
                variants.append(dict(side=side, dtype=dt, compile=compile_,
                                     step=make_step(model, is_hf, x, y, dt == "bf16", compile_)))
        for v in variants:
            t = time.perf_counter()
            try:
                v["first_loss"] = v["step"]()
                for _ in range(args.warmup - 1):
                    v["step"]()
            except Exception as e:  # a compile failure on one side is a result, not a crash
                v["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{v['side']} {dt} compile={v['compile']}: failed ({v['error']})")
            v["warmup_s"] = time.perf_counter() - t
            v["times"] = []
        live = [v for v in variants if "error" not in v]
        # Interleave the timed steps: other processes on a shared machine then slow every variant
        # alike instead of whichever happened to run during a burst. The matmul peak is sampled
        # between rounds too, so a burst during the first measurement does not inflate MFU.
        for _ in range(args.steps):
            for v in live:
                t = time.perf_counter()
                v["step"]()
                v["times"].append(time.perf_counter() - t)
            peaks["fp32"] = max(peaks["fp32"], matmul_rate(torch.float32, device=device))
            if native_bf16:
                peaks["bf16"] = max(peaks["bf16"], matmul_rate(torch.bfloat16, device=device))
        for v in variants:
            v.pop("step")
            results.append(v)
            if "error" in v:
                continue
            sec = statistics.median(v["times"])
            v.update(step_s=sec, tokens_per_s=args.batch * args.seq / sec)
            print(f"  {v['side']:12s} {dt} compile={v['compile']!s:5s}: {v['tokens_per_s']:7.0f} tok/s "
                  f"(median {sec * 1e3:.0f} ms, min {min(v['times']) * 1e3:.0f} ms, warm-up {v['warmup_s']:.0f} s, "
                  f"first loss {v['first_loss']:.4f})", flush=True)

    # MFU: median throughput against the best matmul rate seen in the whole run. Where bf16 is
    # emulated (slower than fp32) the machine's real ceiling for any dtype is the fp32 one.
    ceiling = {"fp32": peaks["fp32"], "bf16": max(peaks["bf16"], peaks["fp32"])}
    print(f"\nmatmul peak on {device_name(device)} (best of the run): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    for v in results:
        if "error" not in v:
            v["mfu"] = v["tokens_per_s"] * flops_tok / ceiling[v["dtype"]]

    # Table: each row against transformers at the same setting, and against transformers' best setting.
    def hf_tps(r: dict, same_compile: bool) -> float | None:
        rows = [q["tokens_per_s"] for q in results if q["side"] == "transformers" and q["dtype"] == r["dtype"]
                and "error" not in q and (not same_compile or q["compile"] == r["compile"])]
        return max(rows, default=None)

    print("\n| side | dtype | compile | tokens/s | vs transformers, same setting | vs best transformers | MFU |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['side']} | {r['dtype']} | {'yes' if r['compile'] else 'no'} | failed | | | |")
            continue
        same, best = hf_tps(r, True), hf_tps(r, False)
        r["ratio_same_setting"] = r["tokens_per_s"] / same if same else None
        r["ratio_vs_best_transformers"] = r["tokens_per_s"] / best if best else None
        cells = [f"{x:.2f}x" if x else "-" for x in (r["ratio_same_setting"], r["ratio_vs_best_transformers"])]
        print(f"| {r['side']} | {r['dtype']} | {'yes' if r['compile'] else 'no'} | {r['tokens_per_s']:.0f} | "
              f"{cells[0]} | {cells[1]} | {r['mfu']:.1%} |")
    if args.json:
        meta = dict(machine=device_name(device), device=str(device), threads=torch.get_num_threads(),
                    torch=torch.__version__, cuda=torch.version.cuda if device.type == "cuda" else None,
                    params=cfg.num_parameters(), config=BENCH_CONFIG, batch=args.batch, seq=args.seq,
                    steps=args.steps, warmup=args.warmup, flops_per_token=flops_tok, matmul_peak_flops=peaks,
                    mfu_ceiling_flops=ceiling)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=2)


if __name__ == "__main__":
    main()
