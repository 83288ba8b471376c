"""What the request log costs: `llmcycle serve` with monitoring on (the default SQLite log, plus prices and
stored, PII-redacted text: the most work a row can take) against the same server with `--request-log off`.

Many short streamed requests (`--output-len` tokens each, all sent at once, `--max-concurrency` in flight) are
the worst case for a per-request cost: the log's work is per request, the model's per token. The two servers
run one after the other, alternating `--rounds` times (on, off, on, off, ...) so drift of the machine falls on
both; the script prints requests/s and tokens/s of each and the ratio on/off (issue 17's target: > 0.95).
The client, helpers and model are benchmarks/serve.py's.

    PYTHONPATH=. python benchmarks/request_log.py                  # mini model, 256 requests x 8 tokens, 3 rounds
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
from pathlib import Path

from serve import ROOT, bench_client, build_model, free_port, make_prompts, start_server, stop_server

PRICE = "prices={bench: {input: 0.15, cached_input: 0.075, output: 0.6}}"


def one_round(a: argparse.Namespace, model_dir: Path, prompts: list, work: Path, logging_on: bool) -> dict:
    port = free_port()
    log_db = work / "requests.sqlite"
    extra = ["--request-log", str(log_db), "store_text=true", PRICE] if logging_on else ["--request-log", "off"]
    a.server_args = " ".join(f"'{x}'" for x in extra)
    proc = start_server(a, model_dir, port, work / "server.log")
    try:
        asyncio.run(bench_client(port, prompts[:16], a.output_len, float("inf"), a.max_concurrency, 0))  # warm-up
        results, duration = asyncio.run(bench_client(port, prompts, a.output_len, float("inf"),
                                                     a.max_concurrency, a.seed))
    finally:
        stop_server(proc)
    failed = [r["error"] for r in results if r["error"]]
    if failed:
        raise SystemExit(f"{len(failed)} request(s) failed: {failed[0]}")
    tokens = sum(r["output_tokens"] for r in results)
    return {"req_s": len(results) / duration, "tok_s": tokens / duration}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="mini", help="random-weight model size (default: mini)")
    p.add_argument("--tokenizer", type=Path, default=ROOT / "runs/default/sft/model")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from machine import cpu_name  # benchmarks/machine.py

    with tempfile.TemporaryDirectory(prefix="request_log_bench_") as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "bench", a.size, a.tokenizer, tie=False)
        prompts = make_prompts(model_dir, a.num_prompts, a.input_len, a.seed)
        print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}; "
              f"{a.num_prompts} streamed requests x {a.output_len} tokens, {a.max_concurrency} in flight, "
              f"{a.threads} threads", flush=True)
        runs: dict[bool, list[dict]] = {True: [], False: []}
        for i in range(a.rounds):
            for on in (True, False):
                r = one_round(a, model_dir, prompts, work, on)
                runs[on].append(r)
                print(f"round {i + 1} log {'on ' if on else 'off'}: {r['req_s']:7.1f} req/s {r['tok_s']:8.1f} tok/s",
                      flush=True)
        on = statistics.median(r["req_s"] for r in runs[True])
        off = statistics.median(r["req_s"] for r in runs[False])
        print(f"median: log on {on:.1f} req/s, off {off:.1f} req/s, ratio on/off {on / off:.3f}")


if __name__ == "__main__":
    main()
