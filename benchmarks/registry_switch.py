"""Switching the served model under load: moving a registry alias (`llmcycle serve --registered`, the server
switches live) against what a user without a registry does, stopping the server and starting it on the new
model.

Both runs serve the same two random-weight models (the second is the first with noise added) under the same
closed-loop load: `--clients` clients each sending one short chat request after another for `--seconds`.
A third of the way in the model changes (the alias moves to v2, or the server is stopped with SIGTERM,
which drains, and started on v2 on the same port); two thirds in, it changes back. The script prints, for
each way: requests answered and failed attempts (a refused connection is retried after 50 ms), the longest time with no answer completing (the gap a user sees),
and how long after the change answers came from the new model (read from the request log's `variant` for
the registry; the first answer after the restart for the other). Peer: the restart, i.e. llmcycle (or vLLM,
or llama.cpp's server) without live switching.

    PYTHONPATH=. python benchmarks/registry_switch.py               # mini models, 4 clients, 30 s each way
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from pathlib import Path

from serve import ROOT, build_model, free_port, launch_server, stop_server

PROMPT = [{"role": "user", "content": "Write a function that adds two numbers."}]


def noisy_copy(src: Path, dst: Path) -> Path:
    """`src` with N(0, 0.01) added to every weight: another model with the same tokenizer."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g).to(v.dtype) for k, v in weights.items()},
              str(dst / "model.safetensors"))
    return dst


def serve(args: list[str], port: int, log: Path, threads: int) -> subprocess.Popen:
    return launch_server([*args, "--threads", str(threads), "drift_every_s=0"], port, log)


async def load(port: int, model: str, clients: int, seconds: float, max_tokens: int) -> list[dict]:
    """Closed-loop clients; every request as {start, end, ok, id}."""
    import httpx

    out: list[dict] = []
    stop = time.monotonic() + seconds

    async def client(c: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            t0 = time.monotonic()
            try:
                r = await c.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={
                    "model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True})
                ok, rid = r.status_code == 200, r.json().get("id") if r.status_code == 200 else None
            except httpx.HTTPError:
                ok, rid = False, None
                await asyncio.sleep(0.05)  # connection refused: a real client retries after a moment
            out.append({"start": t0, "end": time.monotonic(), "ok": ok, "id": rid})

    async with httpx.AsyncClient(timeout=60) as c:
        await asyncio.gather(*(client(c) for _ in range(clients)))
    return out


def longest_gap(results: list[dict], t0: float, t1: float) -> float:
    """The longest stretch in [t0, t1] with no successful answer completing."""
    ends = sorted([t0, *(r["end"] for r in results if r["ok"] and t0 <= r["end"] <= t1), t1])
    return max(b - a for a, b in zip(ends, ends[1:]))


def run_registry(a: argparse.Namespace, work: Path, m1: Path, m2: Path) -> dict:
    from llmcycle.improve.registry import Registry
    from llmcycle.monitor.store import LogStore

    db = work / "registry" / "monitor.sqlite"
    reg = Registry(db)
    reg.register("bench", m1)
    reg.register("bench", m2)
    reg.alias("bench", "production", 1)
    port = free_port()
    proc = serve(["--registered", "bench", "--request-log", str(db), "registry_poll_s=0.5"], port,
                 work / "registry.log", a.threads)
    moves: list[tuple[float, int]] = []

    async def main() -> list[dict]:
        async def mover() -> None:
            for frac, version in ((1 / 3, 2), (2 / 3, 1)):
                await asyncio.sleep(max(0.0, start + frac * a.seconds - time.monotonic()))
                moves.append((time.monotonic(), version))
                await asyncio.to_thread(reg.alias, "bench", "production", version)
        start = time.monotonic()
        results, _ = await asyncio.gather(load(port, "bench", a.clients, a.seconds, a.max_tokens), mover())
        return results

    try:
        results = asyncio.run(main())
    finally:
        stop_server(proc)
    variant = {r["request_id"]: r["variant"] for r in LogStore(db).rows("SELECT request_id, variant FROM requests")}
    switch = []
    for t, version in moves:  # the first answer from the new version after the move, counted from the move
        firsts = [r["end"] for r in results if r["ok"] and r["end"] >= t and variant.get(r["id"]) == str(version)]
        switch.append(min(firsts) - t if firsts else float("nan"))
    return summarize(results, moves, switch)


def run_restart(a: argparse.Namespace, work: Path, m1: Path, m2: Path) -> dict:
    port = free_port()
    procs = [serve([f"bench={m1}", "--request-log", "off"], port, work / "restart.log", a.threads)]
    moves: list[tuple[float, int]] = []

    async def main() -> list[dict]:
        async def restarter() -> None:
            for frac, model, version in ((1 / 3, m2, 2), (2 / 3, m1, 1)):
                await asyncio.sleep(max(0.0, start + frac * a.seconds - time.monotonic()))
                moves.append((time.monotonic(), version))
                await asyncio.to_thread(stop_server, procs[-1])  # SIGTERM: drains what runs, then exits
                procs.append(await asyncio.to_thread(serve, [f"bench={model}", "--request-log", "off"], port,
                                                     work / "restart.log", a.threads))
        start = time.monotonic()
        results, _ = await asyncio.gather(load(port, "bench", a.clients, a.seconds, a.max_tokens), restarter())
        return results

    try:
        results = asyncio.run(main())
    finally:
        stop_server(procs[-1])
    switch = []
    for t, _ in moves:  # after a restart every answer is the new model's: the first one after the move
        firsts = [r["end"] for r in results if r["ok"] and r["start"] >= t]
        switch.append(min(firsts) - t if firsts else float("nan"))
    return summarize(results, moves, switch)


def summarize(results: list[dict], moves: list[tuple[float, int]], switch: list[float]) -> dict:
    t0, t1 = min(r["start"] for r in results), max(r["end"] for r in results)
    ok = [r for r in results if r["ok"]]
    return {"answered": len(ok), "failed": len(results) - len(ok), "requests_per_s": len(ok) / (t1 - t0),
            "longest_gap_s": longest_gap(results, t0, t1), "switch_s": switch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="mini", help="model size (llmcycle's sizes; default mini)")
    p.add_argument("--tokenizer", default=str(ROOT / "runs/default/data/tokenizer"),
                   help="tokenizer directory (default: the default run's; trained on the spot when missing)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    from machine import cpu_name  # benchmarks/machine.py

    print(f"machine: {cpu_name()}, {len(os.sched_getaffinity(0))} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        m1 = build_model(work / "m1", a.size, Path(a.tokenizer), tie=False)
        m2 = noisy_copy(m1, work / "m2")
        rows = {"registry alias (live)": run_registry(a, work, m1, m2),
                "restart on the new model": run_restart(a, work, m1, m2)}
    print(f"\n{a.clients} closed-loop clients, {a.seconds:g} s each way, {a.max_tokens} tokens per answer; the model "
          "changes at 1/3 and back at 2/3")
    print(f"{'way':<26} {'answered':>8} {'failed':>6} {'req/s':>7} {'longest gap (s)':>16} {'new model after (s)':>20}")
    for name, r in rows.items():
        print(f"{name:<26} {r['answered']:>8} {r['failed']:>6} {r['requests_per_s']:>7.2f} {r['longest_gap_s']:>16.2f} "
              f"{', '.join(f'{s:.2f}' for s in r['switch_s']):>20}")
    live, restart = rows.values()
    print(f"\nlongest gap, restart / live: {restart['longest_gap_s'] / max(live['longest_gap_s'], 1e-9):.1f}x; "
          f"failed requests: {live['failed']} live vs {restart['failed']} restart")


if __name__ == "__main__":
    main()
