"""Online serving: `llmcycle serve` under a `vllm bench serve`-like client, against transformers `generate`.

One command, one checkpoint, one prompt set:

1. A model directory (`--model`, or a random-weight model of `--size` built here: the default "mini" with
   untied embeddings is 6.8M parameters, the shape of train_throughput.py's model) and `--num-prompts` prompts
   of `--input-len` random token ids (BOS first, no other special ids; seeded). Requests send token ids with
   `ignore_eos` and `max_tokens=--output-len`, so every request does the same work whatever the weights say.
2. llmcycle: `llmcycle serve` in a subprocess on a free loopback port. The client (this process) sends
   streaming `/v1/completions` requests with Poisson arrivals at `--request-rate` (inf: all at once), at most
   `--max-concurrency` in flight, and times every SSE chunk. Metrics as vLLM's: TTFT (to the first chunk
   carrying a choice, as vLLM counts it: a token whose bytes do not yet make a character streams as ""),
   TPOT = (e2e - TTFT) / (output tokens - 1), ITL (gaps between chunks), e2e latency. The per-request clock
   starts when the request leaves the client's semaphore (as vLLM's), so client-side queueing is not in it.
   Then a batch-1 run (concurrency 1, `--batch1-prompts` requests): decode tokens/s = 1 / mean TPOT.
   With `--llama-cpp DIR`: the same two runs against llama.cpp's `llama-server` (`--parallel` = max
   concurrency, same threads) on the f32 GGUF of the same weights (`llmcycle export gguf`), after ours exited.
3. transformers, after the servers have exited (no shared CPU): `AutoModelForCausalLM` in `--dtype`, greedy
   `generate` with min_new_tokens = max_new_tokens = output-len, (a) one prompt at a time and (b) statically
   batched at batch size = max concurrency (equal-length prompts: no padding), same torch thread count.
4. The batch-1 decode bound: measured memory bandwidth (a 512 MiB `copy_`, read + write bytes, best of 5)
   / weight bytes read per decode step (every weight, except the input embedding table when it is untied:
   a step reads only a row of it; the KV cache of these short contexts is left out).

`--device cuda` puts both sides on the GPU (the server gets `--device cuda`, transformers' model and inputs
move there, the bandwidth is the GPU memory's); the default is the CPU for both, whatever the machine has.
`--dtype bfloat16` runs llmcycle and transformers in bf16 (the bound counts 2-byte weights); llama-server
stays on the f32 GGUF.

Run it on a quiet machine: with `--threads` = all cores, any other process stealing a core stalls every
OpenMP barrier (on 2 shared cores transformers' batch-1 decode fell 10x, llmcycle's less), so the ratios then
measure the neighbours. Under load, `--threads 1` gives steadier numbers.

    PYTHONPATH=. python benchmarks/serve.py                       # defaults: a few minutes on 2 cores
    PYTHONPATH=. python benchmarks/serve.py --quick               # smoke run, well under a minute
    PYTHONPATH=. python benchmarks/serve.py --model runs/default/sft/model --request-rate 4   # after `llmcycle run` --json serve.json
    PYTHONPATH=. python benchmarks/serve.py --device cuda                                     # on a GPU
    PYTHONPATH=. python benchmarks/serve.py --size base --num-prompts 16 --request-rate 1 --llama-cpp /tmp/llama-build/bin
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUICK = dict(size="tiny", num_prompts=8, input_len=32, output_len=16, max_concurrency=4, hf_sequential_prompts=2,
             batch1_prompts=2)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------------------
# inputs


def build_model(out: Path, size: str, tokenizer_dir: Path, tie: bool) -> Path:
    """A random-weight llmcycle model of `size` with the tokenizer of `tokenizer_dir` (trained here if absent)."""
    import torch

    from llmcycle.model.config import config_for_size
    from llmcycle.model.transformer import Transformer
    from llmcycle.tokenizer import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    if (tokenizer_dir / "tokenizer.json").exists():
        for f in TOKENIZER_FILES:
            if (tokenizer_dir / f).exists():
                shutil.copy(tokenizer_dir / f, out / f)
        tok = Tokenizer.from_pretrained(out)
    else:  # a fresh checkout has no runs/: train a 4096-token BPE on a slice of the embedded corpus (~10 s)
        from llmcycle.data.pycorpus import collect_python_corpus
        from llmcycle.tokenizer.train import train_tokenizer

        print(f"no tokenizer in {tokenizer_dir} (`llmcycle run` writes one there): training one", flush=True)
        tok = train_tokenizer((d.text for d in collect_python_corpus(max_bytes=2_000_000)), vocab_size=4096)
        tok.save_pretrained(out)
    cfg = config_for_size(size, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id, tie_word_embeddings=tie)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(out)
    return out


def weight_stats(model_dir: Path, dtype: str) -> tuple[int, int]:
    """(parameters, bytes of weights read per decode step in `dtype`) from the safetensors files."""
    from safetensors import safe_open

    params = step_bytes = 0
    tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", False)
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_slice(k)
                n = int(np.prod(t.get_shape()))
                params += n
                if tied or not k.endswith("embed_tokens.weight"):
                    step_bytes += n * {"float32": 4, "bfloat16": 2}[dtype]
    return params, step_bytes


def make_prompts(model_dir: Path, n: int, length: int, seed: int, shared: int = 0) -> list[list[int]]:
    """`n` prompts of `length` random non-special tokens after BOS; the first `shared` tokens (BOS included) are
    the same in every prompt (a common system prompt: what prefix caching saves)."""
    from llmcycle.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    allowed = np.array(sorted(set(range(tok.vocab_size)) - tok.special_ids))
    rng = np.random.default_rng(seed)
    head = [tok.bos_id, *rng.choice(allowed, size=max(shared, 1) - 1).tolist()]
    return [head + rng.choice(allowed, size=length - len(head)).tolist() for _ in range(n)]


# ---------------------------------------------------------------------------------------------------
# llmcycle: server + streaming client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(a: argparse.Namespace, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    return launch_server([f"bench={model_dir}", "--threads", str(a.threads), "--device", a.device,
                          "--dtype", a.dtype, *shlex.split(a.server_args)], port, log)


def child_env() -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH: children run the llmcycle under test."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def launch_server(args: list[str], port: int, log: Path, cmd: list[str] | None = None) -> subprocess.Popen:
    """`llmcycle serve ARGS --port PORT` (or `cmd`, another server) in a process of its own (output appended
    to `log`), once /health answers; SystemExit with the log's end when it exits or does not come up in 180 s."""
    if cmd is None:
        cmd = [sys.executable, "-m", "llmcycle", "serve", *args, "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=open(log, "a"), stderr=subprocess.STDOUT, env=child_env())
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    stop_server(proc)
    raise SystemExit(f"{' '.join(cmd[:4])} did not come up in 180 s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)  # drains, then exits
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(client, url: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": "bench", "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    r = dict(input_tokens=len(prompt), output_tokens=0, ttft=None, itl=[], e2e=None, empty_chunks=0, error=None)
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                r["error"] = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                data, now = json.loads(line[6:]), time.perf_counter()
                if "error" in data:
                    r["error"] = str(data["error"].get("message"))
                    continue
                choice = (data.get("choices") or [None])[0]
                # llama-server closes a stream with an empty-text chunk carrying the finish reason: not a token.
                if choice is not None and (choice.get("text") or not choice.get("finish_reason")):
                    if r["ttft"] is None:
                        r["ttft"] = now - t0
                    else:
                        r["itl"].append(now - last)
                    r["empty_chunks"] += not choice.get("text")
                    last = now
                if data.get("usage"):
                    r["output_tokens"] = data["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        r["error"] = f"{type(e).__name__}: {e}"
    r["e2e"] = time.perf_counter() - t0
    if r["error"] is None and r["ttft"] is None:
        r["error"] = "no tokens streamed"
    return r


async def bench_client(port: int, prompts: list[list[int]], output_len: int, rate: float, concurrency: int,
                       seed: int) -> tuple[list[dict], float]:
    """Send every prompt (Poisson arrivals at `rate`/s, at most `concurrency` in flight); (results, duration)."""
    import httpx

    url = f"http://127.0.0.1:{port}/v1/completions"
    sem, rng = asyncio.Semaphore(concurrency), np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:

        async def limited(p: list[int]) -> dict:
            async with sem:
                return await one_request(client, url, p, output_len)

        start, tasks = time.perf_counter(), []
        for p in prompts:
            tasks.append(asyncio.create_task(limited(p)))
            if rate != float("inf"):
                await asyncio.sleep(rng.exponential(1 / rate))
        results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def summarize(results: list[dict], duration: float) -> dict:
    ok = [r for r in results if r["error"] is None]
    ms = lambda xs: {f"{k}_ms": float(f(np.array(xs) * 1e3)) if xs else None  # noqa: E731
                     for k, f in (("mean", np.mean), ("median", np.median), ("p99", lambda x: np.percentile(x, 99)))}
    out_tok, in_tok = sum(r["output_tokens"] for r in ok), sum(r["input_tokens"] for r in ok)
    return dict(completed=len(ok), failed=len(results) - len(ok), errors=sorted({r["error"] for r in results} - {None}),
                duration_s=duration, input_tokens=in_tok, output_tokens=out_tok,
                request_throughput=len(ok) / duration, output_throughput=out_tok / duration,
                total_token_throughput=(in_tok + out_tok) / duration,
                ttft=ms([r["ttft"] for r in ok]),
                tpot=ms([(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]),
                itl=ms([x for r in ok for x in r["itl"]]), e2e=ms([r["e2e"] for r in ok]),
                empty_text_chunks=sum(r["empty_chunks"] for r in ok),
                chunks_per_output_token=sum(len(r["itl"]) + 1 for r in ok) / max(out_tok, 1))


def print_serving(name: str, s: dict) -> None:
    print(f"============ {name} ============")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["input_tokens"]),
            ("Total generated tokens", s["output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.1f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.1f}")]
    for metric, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E latency")):
        rows += [(f"{k.split('_')[0].capitalize()} {label} (ms)", "-" if v is None else f"{v:.2f}")
                 for k, v in s[metric].items()]
    for label, v in rows:
        print(f"{label:<36}{v:>12}")
    pc = s.get("prefix_cache")
    if pc and pc.get("prefix_cache_queries"):
        print(f"{'Prefix cache hit tokens':<36}{pc['prefix_cache_hits']:>12.0f} of {pc['prefix_cache_queries']:.0f} "
              f"({pc['prefix_cache_hits'] / pc['prefix_cache_queries']:.0%})")
    for e in s["errors"][:5]:
        print(f"  error: {e}")
    print(flush=True)


def run_llmcycle(a: argparse.Namespace, model_dir: Path, prompts: list[list[int]], work: Path) -> dict:
    port, log = free_port(), work / "server.log"
    t = time.perf_counter()
    proc = start_server(a, model_dir, port, log)
    print(f"llmcycle serve up on port {port} in {time.perf_counter() - t:.1f} s ({a.threads} threads)", flush=True)
    return run_serving(a, "llmcycle serve", proc, port, prompts, log)


def run_llama_cpp(a: argparse.Namespace, model_dir: Path, prompts: list[list[int]], work: Path) -> dict:
    """The same client against llama.cpp's `llama-server` on the GGUF of the same weights (f32, as ours), with
    `--parallel` = max concurrency slots of input + output tokens each and the same threads."""
    gguf = work / "model-f32.gguf"
    subprocess.run([sys.executable, "-m", "llmcycle", "export", "gguf", str(model_dir), "--type", "f32", "--out",
                    str(gguf)], check=True, capture_output=True,
                   env=child_env())
    port, log = free_port(), work / "llama-server.log"
    slots = a.max_concurrency
    cmd = [str(a.llama_cpp / "llama-server"), "-m", str(gguf), "--port", str(port), "-t", str(a.threads),
           "--parallel", str(slots), "-c", str(slots * (a.input_len + a.output_len + 8))]
    t = time.perf_counter()
    proc = launch_server([], port, log, cmd=cmd)
    print(f"llama-server up on port {port} in {time.perf_counter() - t:.1f} s ({a.threads} threads)", flush=True)
    return run_serving(a, "llama-server", proc, port, prompts, log)


def prefix_cache_counters(port: int) -> dict | None:
    """llmcycle's cumulative prefix-cache counters from /metrics (queried and hit prompt tokens, warm-up included);
    None for a server without them."""
    import httpx

    found = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        for key in ("prefix_cache_queries", "prefix_cache_hits"):
            if line.startswith(f"llmcycle:{key}_total{{"):
                found[key] = float(line.rsplit(" ", 1)[1])
    return found or None


def run_serving(a: argparse.Namespace, name: str, proc: subprocess.Popen, port: int, prompts: list[list[int]],
                log: Path) -> dict:
    """The main run (rate, concurrency) and the batch-1 run against a started server, then stop it."""
    try:
        warm = asyncio.run(bench_client(port, prompts[:1], min(a.output_len, 8), float("inf"), 1, a.seed))[0][0]
        if warm["error"]:
            raise SystemExit(f"warm-up request failed: {warm['error']}\n{log.read_text()[-3000:]}")
        print(f"running {len(prompts)} requests, rate {a.request_rate}, max concurrency {a.max_concurrency}",
              flush=True)
        res, dur = asyncio.run(bench_client(port, prompts, a.output_len, a.request_rate, a.max_concurrency, a.seed))
        main_run = summarize(res, dur)
        main_run["prefix_cache"] = prefix_cache_counters(port)
        print_serving(name, main_run)
        b1 = prompts[:a.batch1_prompts]
        print(f"batch 1: {len(b1)} requests one at a time", flush=True)
        res1, dur1 = asyncio.run(bench_client(port, b1, a.output_len, float("inf"), 1, a.seed))
        batch1 = summarize(res1, dur1)
    finally:
        stop_server(proc)
    # uvicorn re-raises the SIGTERM it caught once it has drained: -15 is a clean exit.
    print(f"server exited ({proc.returncode})", flush=True)
    bad = [ln for ln in log.read_text().splitlines() if "Traceback" in ln or "ERROR" in ln]
    return dict(serving=main_run, batch1=batch1, server_exit=proc.returncode, server_log_errors=bad[:10])


# ---------------------------------------------------------------------------------------------------
# transformers + bandwidth (in this process, after the server has gone)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def memory_bandwidth(mib: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Bytes/s of a large `copy_` (read + write) on `device`, best of `repeats`."""
    import torch

    src = torch.ones(mib * 2**20 // 4, device=device)
    dst = torch.zeros_like(src)  # zeros_like touches the pages, so the timing sees no page faults
    if device != "cpu":
        dst.copy_(src)  # untimed: a GPU's first copy launches its kernel for the first time
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def run_transformers(a: argparse.Namespace, model_dir: Path, prompts: list[list[int]]) -> dict:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, a.dtype)).to(a.device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def generate(batch: list[list[int]], n: int) -> float:
        ids = torch.tensor(batch, device=a.device)
        sync(a.device)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=pad)
        sync(a.device)
        assert out.shape == (len(batch), ids.shape[1] + n), out.shape
        return time.perf_counter() - t

    bs = a.max_concurrency
    generate(prompts[:1], 4), generate(prompts[:bs], 4)  # warm-up, not counted
    seq = prompts[:a.hf_sequential_prompts]
    print(f"transformers: {len(seq)} prompts one at a time", flush=True)
    seq_s = sum(generate([p], a.output_len) for p in seq)
    batches = [prompts[i:i + bs] for i in range(0, len(prompts), bs)]
    print(f"transformers: {len(prompts)} prompts in {len(batches)} static batches of {bs}", flush=True)
    batch_s = [generate(b, a.output_len) for b in batches]
    # A static batch's time to first token: every request of the batch waits for the batch's prefill and first
    # sampled token (generate with one new token; the median over the batches).
    ttft_s = float(np.median([generate(b, 1) for b in batches]))
    return dict(sequential=dict(prompts=len(seq), seconds=seq_s, output_throughput=len(seq) * a.output_len / seq_s),
                batched=dict(batch_size=bs, batches=len(batches), seconds=sum(batch_s), batch_seconds=batch_s,
                             output_throughput=len(prompts) * a.output_len / sum(batch_s), ttft_ms=1e3 * ttft_s))


# ---------------------------------------------------------------------------------------------------


def report(r: dict) -> None:
    s, hf, b1 = r["llmcycle"]["serving"], r.get("transformers"), r["llmcycle"]["batch1"]
    conc = r["config"]["max_concurrency"]
    print("\n| system | output tok/s | total tok/s | req/s |")
    print("|---|---:|---:|---:|")
    print(f"| llmcycle serve (max concurrency {conc}) | {s['output_throughput']:.1f} | "
          f"{s['total_token_throughput']:.1f} | {s['request_throughput']:.2f} |")
    if hf:
        for k, label in (("batched", f"static batch {conc}"), ("sequential", "batch 1, sequential")):
            print(f"| transformers generate, {label} | {hf[k]['output_throughput']:.1f} | | |")
        print(f"\nllmcycle output tok/s vs transformers batched: "
              f"{s['output_throughput'] / hf['batched']['output_throughput']:.2f}x, "
              f"vs sequential: {s['output_throughput'] / hf['sequential']['output_throughput']:.2f}x")
        print(f"TTFT: llmcycle median {s['ttft']['median_ms']:.1f} ms; transformers static batch {conc}: "
              f"{hf['batched']['ttft_ms']:.1f} ms (the batch's prefill and first token)")
    lc = r.get("llama_cpp")
    if lc:
        ls = lc["serving"]
        print(f"\nllama-server (--parallel {conc}, f32): {ls['output_throughput']:.1f} output tok/s; llmcycle / "
              f"llama-server: {s['output_throughput'] / ls['output_throughput']:.2f}x")
        print("| metric | llmcycle | llama-server |\n|---|---:|---:|")
        for metric in ("ttft", "tpot", "itl"):
            for k in ("median_ms", "p99_ms"):
                print(f"| {metric.upper()} {k.replace('_ms', '')} (ms) | {s[metric][k]:.1f} | {ls[metric][k]:.1f} |")
    bw, wb = r["bandwidth_gb_s"] * 1e9, r["model"]["decode_weight_bytes"]
    if b1["tpot"]["mean_ms"]:
        tps = 1e3 / b1["tpot"]["mean_ms"]
        print(f"batch-1 decode: llmcycle {tps:.1f} tok/s (mean TPOT {b1['tpot']['mean_ms']:.2f} ms over "
              f"{b1['completed']} requests); bound {bw / wb:.0f} tok/s = {bw / 1e9:.1f} GB/s / "
              f"{wb / 2**20:.1f} MiB of weights: {tps / (bw / wb):.1%} of the bound")
        if lc and lc["batch1"]["tpot"]["mean_ms"]:
            lt = 1e3 / lc["batch1"]["tpot"]["mean_ms"]
            print(f"batch-1 decode: llama-server {lt:.1f} tok/s = {lt / (bw / wb):.1%} of the bound; "
                  f"llmcycle / llama-server {tps / lt:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="model directory (default: build a random-weight one of --size)")
    p.add_argument("--size", default="mini", help="config_for_size name of the built model (default: mini)")
    p.add_argument("--tie-embeddings", action="store_true", help="built model: tie input and output embeddings")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "runs/default/sft/model",
                   help="tokenizer for the built model (default: the quickstart's, which `llmcycle run` writes; "
                        "trained here when absent)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request (ignore_eos)")
    p.add_argument("--shared-prefix", type=int, default=0, help="leading prompt tokens common to every prompt")
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per s (inf: at once)")
    p.add_argument("--max-concurrency", type=int, default=16, help="requests in flight; transformers batch size")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (both sides)")
    p.add_argument("--hf-sequential-prompts", type=int, default=8, help="prompts of the batch-1 transformers run")
    p.add_argument("--batch1-prompts", type=int, default=4, help="requests of the llmcycle batch-1 decode run")
    p.add_argument("--device", default="cpu",
                   help="cpu, cuda, cuda:1 ...: where the server (`llmcycle serve --device`) and transformers run")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights of llmcycle and transformers (llama-server stays on the f32 GGUF)")
    p.add_argument("--server-args", default="", help="extra `llmcycle serve` flags, e.g. '--max-num-seqs 8'")
    p.add_argument("--llama-cpp", type=Path, help="folder with llama.cpp's llama-server: run the same client "
                   "against it on the f32 GGUF of the same weights (needs llmcycle[edge])")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers side (e.g. to compare "
                   "server settings)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK} unless given")
    p.add_argument("--json", type=Path, help="write config, machine and every metric here")
    a = p.parse_args()
    if a.quick:
        p.set_defaults(**QUICK)
        a = p.parse_args()
    if a.model:
        from llmcycle.errors import LlmcycleError
        from llmcycle.paths import check_model_dir

        try:
            check_model_dir(a.model, hint="`llmcycle run` writes runs/default/sft/model; without --model a "
                                          "random-weight model is built.")
        except LlmcycleError as e:
            p.error(str(e))

    import torch
    import transformers
    from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    torch.set_num_threads(a.threads)
    torch.set_flush_denormal(True)  # `llmcycle serve` does this; give transformers the same
    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="serve_bench_"))
    try:
        model_dir = a.model.resolve() if a.model else build_model(work / "model", a.size, a.tokenizer,
                                                                  a.tie_embeddings)
        params, step_bytes = weight_stats(model_dir, a.dtype)
        prompts = make_prompts(model_dir, a.num_prompts, a.input_len, a.seed, a.shared_prefix)
        gpu = torch.cuda.get_device_name(a.device) if a.device.startswith("cuda") else None
        r = dict(config={k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                 machine=dict(cpu=cpu_name(), cores=len(os.sched_getaffinity(0)), loadavg=list(os.getloadavg()),
                              torch=torch.__version__, transformers=transformers.__version__, threads=a.threads,
                              device=a.device, gpu=gpu),
                 model=dict(dir=str(a.model) if a.model else f"random {a.size}", params=params,
                            decode_weight_bytes=step_bytes))
        print(f"machine: {r['machine']['cpu']}, {r['machine']['cores']} cores, load {os.getloadavg()[0]:.1f}; "
              f"torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} threads; "
              f"device {a.device}{f' ({gpu})' if gpu else ''}")
        print(f"model: {r['model']['dir']}, {params / 1e6:.2f}M parameters; {a.num_prompts} prompts x "
              f"{a.input_len} tokens -> {a.output_len} tokens", flush=True)
        r["llmcycle"] = run_llmcycle(a, model_dir, prompts, work)
        if a.llama_cpp:
            r["llama_cpp"] = run_llama_cpp(a, model_dir, prompts, work)
        r["bandwidth_gb_s"] = memory_bandwidth(device=a.device) / 1e9
        if not a.no_transformers:
            r["transformers"] = run_transformers(a, model_dir, prompts)
        r["machine"]["loadavg_end"] = list(os.getloadavg())
        report(r)
        if a.json:
            a.json.write_text(json.dumps(r, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
