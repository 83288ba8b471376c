"""Quantized decoding: llmcycle's engine in fp32, bf16, int8, W8A8 and int4 against transformers (fp32) and,
when a llama.cpp build is given, llama.cpp in f32, q8_0 and q4_0, on one random Llama and one set of prompts.

For every variant and thread count (1 and 2 by default), in a child process of its own (this script with
`--child`), so one variant's memory and threads never touch another's:

- batch-1 decode: tokens/s of one greedy request (16-token prompt, `--tokens` new tokens), the median of
  `--repeats` runs after a warm-up run; for llama.cpp, `llama-bench -p 0 -n TOKENS` (token generation only);
- 16 concurrent: 16 requests at once through the engine (llmcycle), one padded batch through `generate`
  (transformers), `llama-server --parallel 16` with 16 concurrent HTTP requests (llama.cpp); generated
  tokens / wall time;
- weight bytes read per decoded token (every weight once, the embedding table not: one row of it is read)
  and that number's share of the memory-bandwidth bound: bound = copy bandwidth (measured here: a 512 MiB
  tensor copy, bytes read + written per second) / weight bytes per token; share = measured tokens/s / bound.

    PYTHONPATH=. python benchmarks/quantize.py --size base                  # ~82M params; ~10 min on 2 cores
    PYTHONPATH=. python benchmarks/quantize.py --size mini --tokens 32 --threads 1     # quick check, ~1 min
    PYTHONPATH=. python benchmarks/quantize.py --llama-cpp /tmp/llama-build/bin        # with llama.cpp

The llama.cpp side needs `llmcycle export gguf` (the GGUF of the same weights) and the binaries
`llama-bench` and `llama-server` in the given folder. Quality (held-out bits per byte of a trained model
per variant) is measured by `llmcycle run`'s quantize stage, not here: a random model's quality means nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLMCYCLE = {"fp32": None, "bf16": None, "int8": "int8", "w8a8-dynamic": "w8a8-dynamic", "int4": "int4"}
LLAMA_TYPES = ("f32", "q8_0", "q4_0")
PROMPT_LEN, CONCURRENT = 16, 16


def copy_bandwidth() -> float:
    """Bytes per second of a large tensor copy (read + write), the best of 5."""
    import torch

    src = torch.ones(128 * 2**20, dtype=torch.float32)  # 512 MiB
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * src.numel() * 4 / (time.perf_counter() - t))
    return best


def prompts(vocab: int, n: int) -> list[list[int]]:
    from llmcycle.optimize.probe import random_prompts

    return random_prompts(vocab, n, PROMPT_LEN)


def step_bytes(model) -> int:
    """Weight bytes read per decoded token: every parameter and buffer but the embedding table (one row)."""
    import torch

    seen, total = set(), 0
    emb = model.model.embed_tokens.weight
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or t.dim() == 0:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size() if t is not emb or model.config.tie_word_embeddings else 0
    for m in model.modules():  # the int4 kernel's repacked weight is not a buffer
        if getattr(m, "_packed", None) is not None:
            total += m._packed.numel() * m._packed.element_size()
    return total + torch.finfo(torch.float32).bits // 8 * model.config.hidden_size


# ---- children: one variant, one thread count ------------------------------------------------------


def child_llmcycle(model_dir: Path, variant: str, tokens: int, repeats: int) -> dict:
    import torch

    from llmcycle.optimize.probe import decode_speed
    from llmcycle.serve.model_runner import ModelRunner

    torch.set_flush_denormal(True)
    model = ModelRunner.load_weights(model_dir, dtype=torch.bfloat16 if variant == "bf16" else None)
    single, together = decode_speed(model, tokens, CONCURRENT, PROMPT_LEN, repeats)
    return {"batch1_tok_s": single, "concurrent_tok_s": together, "step_bytes": step_bytes(model)}


def child_transformers(model_dir: Path, tokens: int, repeats: int) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ps = torch.tensor(prompts(model.config.vocab_size, CONCURRENT))
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)

    def run(batch: torch.Tensor) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(batch, attention_mask=torch.ones_like(batch), **kw)
        return batch.shape[0] * tokens / (time.perf_counter() - t)

    run(ps[:1])
    return {"batch1_tok_s": statistics.median(run(ps[:1]) for _ in range(repeats)), "concurrent_tok_s": run(ps)}


def child_llama_cpp(gguf: Path, bin_dir: Path, tokens: int, threads: int, vocab: int) -> dict:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-p", "0", "-n", str(tokens), "-t",
                          str(threads), "-r", "3", "-o", "json"], capture_output=True, text=True, check=True).stdout
    single = json.loads(out)[0]["avg_ts"]
    return {"batch1_tok_s": single, "concurrent_tok_s": llama_server_throughput(gguf, bin_dir, tokens, threads, vocab)}


def llama_server_throughput(gguf: Path, bin_dir: Path, tokens: int, threads: int, vocab: int) -> float:
    import socket
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = CONCURRENT * (PROMPT_LEN + tokens + 8)
    proc = subprocess.Popen([str(bin_dir / "llama-server"), "-m", str(gguf), "--port", str(port), "-t", str(threads),
                             "--parallel", str(CONCURRENT), "-c", str(ctx), "--log-disable"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)

        def one(p: list[int]) -> int:
            body = {"prompt": p, "n_predict": tokens, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
            return httpx.post(f"{url}/completion", json=body, timeout=600).json()["tokens_predicted"]

        ps = prompts(vocab, CONCURRENT)
        one(ps[0])
        t = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENT) as pool:
            done = sum(pool.map(one, ps))
        return done / (time.perf_counter() - t)
    finally:
        proc.terminate()
        proc.wait()


# ---- the parent ------------------------------------------------------------------------------------


def build(workdir: Path, size: str, args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """The random model, its quantized directories and (with llama.cpp) its GGUF files."""
    import torch

    from llmcycle.model.config import config_for_size
    from llmcycle.model.transformer import Transformer
    from llmcycle.optimize.quantize_cli import quantize_dir

    base = workdir / "fp32"
    cfg = config_for_size(size, vocab_size=4096, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.save_pretrained(base)
    if args.llama_cpp:  # a GGUF file carries its tokenizer: one of the model's vocabulary, from the stdlib
        from llmcycle.tokenizer.train import train_tokenizer

        texts = [f.read_text(errors="replace") for f in sorted(Path(os.__file__).parent.glob("*.py"))[:150]]
        train_tokenizer(texts, vocab_size=cfg.vocab_size).save_pretrained(base)
    dirs = {}
    for name, method in LLMCYCLE.items():
        dirs[name] = base if method is None else workdir / name
        if method is not None:
            quantize_dir(base, dirs[name], method)
    if args.llama_cpp:
        for t in LLAMA_TYPES:
            dirs[f"llama.cpp {t}"] = workdir / f"model-{t}.gguf"
            subprocess.run([sys.executable, "-m", "llmcycle", "export", "gguf", str(base), "--type", t, "--out",
                            str(dirs[f"llama.cpp {t}"])], check=True, env=_env())
    return base, dirs


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def run_child(args: argparse.Namespace, variant: str, path: Path, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--path", str(path), "--tokens", str(args.tokens),
           "--repeats", str(args.repeats), "--child-threads", str(threads)]
    if args.llama_cpp:
        cmd += ["--llama-cpp", str(args.llama_cpp)]
    env = {**_env(), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="base", help="llmcycle model size (base: ~82M parameters with vocab 4096)")
    p.add_argument("--threads", default="1,2", help="thread counts to run, comma-separated")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    p.add_argument("--repeats", type=int, default=3, help="batch-1 runs (median)")
    p.add_argument("--variants", default=None, help="comma-separated subset of the variants")
    p.add_argument("--llama-cpp", type=Path, default=None, help="folder with llama-bench and llama-server")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--path", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.child_threads)
        if args.child == "transformers fp32":
            r = child_transformers(args.path, args.tokens, args.repeats)
        elif args.child.startswith("llama.cpp"):
            r = child_llama_cpp(args.path, args.llama_cpp, args.tokens, args.child_threads, 4096)
        else:
            r = child_llmcycle(args.path, args.child, args.tokens, args.repeats)
        print(json.dumps(r))
        return

    from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

    bandwidth = copy_bandwidth()
    flags = subprocess.run(["sh", "-c", "grep -o -w 'avx2\\|avx512f\\|avx512_bf16\\|avx512_vnni\\|amx_bf16' "
                            "/proc/cpuinfo | sort -u | tr '\\n' ' '"], capture_output=True, text=True).stdout
    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, flags: {flags.strip()}, "
          f"load {os.getloadavg()[0]:.1f}, copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base, dirs = build(Path(tmp), args.size, args)
        dirs["transformers fp32"] = base
        wanted = args.variants.split(",") if args.variants else list(dirs)
        results = []
        for threads in [int(t) for t in args.threads.split(",")]:
            print(f"\n{threads} thread(s)\n{'variant':<22}{'batch-1 tok/s':>14}{'share of bound':>16}"
                  f"{'16 concurrent tok/s':>21}{'weight MiB/token':>18}")
            for variant in wanted:
                r = run_child(args, variant, dirs[variant], threads)
                nbytes = r.get("step_bytes") or _file_bytes(dirs[variant])
                r |= {"variant": variant, "threads": threads, "step_bytes": nbytes,
                      "bound_tok_s": bandwidth / nbytes}
                results.append(r)
                if "error" in r:
                    print(f"{variant:<22}  failed: {r['error']}")
                    continue
                print(f"{variant:<22}{r['batch1_tok_s']:>14.1f}{r['batch1_tok_s'] / r['bound_tok_s']:>15.0%}"
                      f"{r['concurrent_tok_s']:>21.1f}{nbytes / 2**20:>18.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "tokens": args.tokens, "bandwidth": bandwidth,
                                         "cpu": cpu_name(), "flags": flags.strip(), "results": results}, indent=2))


def _file_bytes(path: Path) -> int:
    """Weight bytes per token of a GGUF or model directory, from its files (the embeddings counted whole)."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.glob("*.safetensors"))


if __name__ == "__main__":
    main()
