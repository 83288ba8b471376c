"""improve: one turn of the improvement loop on the run's final model, with simulated users
(`llmcycle improve`, docs/improve.md); runs/<name>/improve/.

The final model is registered as `<run name>` v1 @production and served from the registry by the real HTTP
server on loopback, logging requests with their text. Simulated users ask fresh task prompts (the embedded
tasks with another seed, evaluation items left out), several samples each; a scripted judge gives thumbs up
to a correct answer and down to a wrong one through POST /v1/feedback. Then `Turn` runs: the exported pairs
train a DPO candidate from v1, `eval --compare` gates it, it is registered @challenger, and the server
(following the registry) splits traffic between the two while the users and the judge go on; the A/B
verdict promotes it or keeps v1. An undecided test ends with v1 kept, as a careful operator would.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmcycle.artifacts import atomic_write_json
from llmcycle.config import field_help as F
from llmcycle.lifecycle.stage import EARLIER, Stage

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section

log = logging.getLogger(__name__)


@dataclass
class ImproveStage:
    prompts: int = F(128, "fresh task prompts the simulated users ask before the turn")
    samples: int = F(8, "answers per prompt, sampled at temperature 1 (different answers make preference pairs)")
    ab_requests: int = F(600, "requests the users send during the A/B test (greedy answers, judged)")
    users: int = F(64, "simulated users (A/B assignment is sticky per user)")
    max_tokens: int = F(24, "tokens per answer at most")
    min_examples: int = F(8, "fewest preference pairs worth a training run")
    gate_limit: int = F(128, "items per metric in the gate's evaluations")
    threshold: float = F(0.02, "the gate's tolerance")
    challenger_weight: float = F(50.0, "the challenger's share of A/B traffic, percent")
    # a gentle step: a few dozen pairs overfit within a few epochs (measured: 40 steps on 10 pairs lost 0.03
    # exact match, and 12 steps at 1e-4 on 67 pairs 0.05 multiple-choice accuracy: the gate refused both)
    train: list[str] = field(default_factory=lambda: ["train.max_steps=8", "train.lr=5e-5", "train.batch_size=16",
                                                      "beta=0.1", "rpo_alpha=1.0", "eval.every=0", "eval.generate=0",
                                                      "data.eval=null", "checkpoint.every=6"])


def _user_items(n: int) -> list:
    """`n` fresh task items: the embedded tasks with seed 1, none of them an evaluation item."""
    from llmcycle.improve.export import EvalGuard, eval_texts
    from llmcycle.train.posttrain.synthetic import make_items

    guard = EvalGuard(eval_texts())
    seen, out = set(), []
    for it in make_items(seed=1, per_task=max(8, n // 2)):
        if it.prompt not in seen and not guard(it.prompt):
            seen.add(it.prompt)
            out.append(it)
    return out[:n]


async def _traffic(url: str, name: str, jobs: list[tuple[Any, str]], temperature: float, max_tokens: int) -> dict:
    """Send every (item, user) job as a chat request, judge the answer, post the feedback; counts."""
    import httpx

    from llmcycle.train.posttrain.evaluate import normalize_answer

    counts = {"requests": 0, "positive": 0, "errors": 0}
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        sem = asyncio.Semaphore(8)

        async def one(seed: int, item: Any, user: str) -> None:
            async with sem:  # a seed per request: the run's sampled answers are the same every time
                r = await client.post("/v1/chat/completions", json={
                    "model": name, "user": user, "temperature": temperature, "max_tokens": max_tokens,
                    "seed": seed, "messages": [{"role": "user", "content": item.prompt}]})
                if r.status_code != 200:
                    counts["errors"] += 1
                    return
                body = r.json()
                good = normalize_answer(body["choices"][0]["message"]["content"]) == normalize_answer(item.answer)
                f = await client.post("/v1/feedback", json={"request_id": body["id"], "thumbs": "up" if good else "down",
                                                             "user": user})
                counts["errors"] += f.status_code != 200
                counts["requests"] += 1
                counts["positive"] += good

        await asyncio.gather(*(one(i, item, user) for i, (item, user) in enumerate(jobs)))
    return counts


def run(lc: Lifecycle, resume: bool) -> dict:
    import time

    from llmcycle.improve.loop import ImproveConfig, Turn
    from llmcycle.improve.registry import Registry
    from llmcycle.monitor.request_log import RequestLog
    from llmcycle.serve.async_engine import AsyncLLMEngine
    from llmcycle.serve.engine import LLMEngine
    from llmcycle.serve.registered import RegisteredModels
    from llmcycle.serve.server import ServerState
    from llmcycle.serve.smoke import serve_in_thread

    cfg: ImproveStage = lc.stage_config("improve")
    d, name = lc.dir("improve"), lc.cfg.name
    db = d / "monitor.sqlite"
    reg = Registry(db)
    v1, _ = reg.register(name, lc.final_model(), description=f"llmcycle run {name}: the final model")
    if "production" not in reg.aliases(name).get(name, {}):
        reg.alias(name, "production", v1.version)
    items = _user_items(cfg.prompts + cfg.ab_requests)
    before_items, ab_items = items[:cfg.prompts], items[cfg.prompts:] or items
    users = [f"user-{i}" for i in range(cfg.users)]

    def engine(path: str) -> AsyncLLMEngine:
        return AsyncLLMEngine(LLMEngine(path, kv_cache_bytes=32 * 2**20))

    registered = RegisteredModels(reg, [name], engine, poll_s=0.2)
    registered.load()
    request_log = RequestLog(db, flush_interval=0.1)
    state = ServerState({}, request_log=request_log, store_text=True, registered=registered, drift_every_s=0)

    with serve_in_thread(state) as url:
        jobs = [(it, users[(i * cfg.samples + k) % len(users)]) for i, it in enumerate(before_items)
                for k in range(cfg.samples)]
        before = asyncio.run(_traffic(url, name, jobs, 1.0, cfg.max_tokens))
        request_log.flush()  # the export and the A/B report read the log
        ab_traffic: dict = {}

        def on_ab(turn: Turn) -> None:
            deadline = time.monotonic() + 120
            while len(registered.routes[name]["keys"]) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)  # the server picks the split up at its next read of the registry
            ab_jobs = [(ab_items[i % len(ab_items)], users[i % len(users)]) for i in range(cfg.ab_requests)]
            ab_traffic.update(asyncio.run(_traffic(url, name, ab_jobs, 0.0, cfg.max_tokens)))
            request_log.flush()  # the export and the A/B report read the log

        turn_cfg = ImproveConfig(name=name, out_dir=str(d / "turn"), db=str(db), min_examples=cfg.min_examples,
                                 train=list(cfg.train), gate_limit=cfg.gate_limit, threshold=cfg.threshold,
                                 challenger_weight=cfg.challenger_weight)
        rec = Turn(turn_cfg, reg, on_ab=on_ab).run()
        outcome = rec["status"]
        if outcome == "waiting for the A/B test":  # undecided: keep the production version
            reg.end_split(name)
            reg.remove_alias(name, "challenger")
            outcome = "kept production (no significant difference)"
    state.monitor.close()
    steps = rec["steps"]
    gate = steps.get("gate", {}).get("metrics", {})
    decide = steps.get("decide", {}).get("metrics", {})
    summary = {
        "name": name, "before": before, "prompts": len(before_items), "samples": cfg.samples, "ab_traffic": ab_traffic, "outcome": outcome,
        "production": reg.resolve(name).version, "export": steps.get("export", {}).get("metrics", {}),
        "gate": gate, "ab_report": decide.get("report"),
        "steps": {k: "undecided: production kept, split ended" if v["status"] == "waiting for the A/B test" else v["status"]
                  for k, v in steps.items()},
    }
    atomic_write_json(d / "improve.json", summary, default=str)
    metrics = {"outcome": outcome, "production_version": summary["production"],
               "positive_before": before["positive"] / max(before["requests"], 1),
               "preference_pairs": summary["export"].get("preference_pairs", 0)}
    if gate:
        metrics.update({"gate_exact_match_before": gate["production"]["exact_match"],
                        "gate_exact_match_after": gate["candidate"]["exact_match"]})
    return metrics


def report(run: Records) -> list[Section]:
    path = run.dir("improve") / "improve.json"
    if not path.is_file():
        return []
    s = json.loads(path.read_text())
    before = s["before"]
    blocks: list[Block] = [("p", (
        f"The final model registered as `{s['name']}` v1 @production and served from the registry. Simulated users "
        f"asked {s.get('prompts', '?')} fresh task questions, {s.get('samples', '?')} times each at temperature 1 "
        f"({before['requests']} answers); a scripted judge rated each answer through /v1/feedback (thumbs up when "
        f"correct): {before['positive']} up. Outcome of the turn: **{s['outcome']}**; production: "
        f"v{s['production']}."))]
    blocks.append(("table", ["step", "status"], [[k, v] for k, v in s["steps"].items()]))
    e = s.get("export") or {}
    if e:
        blocks.append(("p", f"Feedback export: {e.get('preference_pairs', 0)} preference pairs and "
                            f"{e.get('sft_examples', 0)} SFT examples from {e.get('rated_answers', 0)} rated answers; "
                            f"{e.get('dropped_eval_overlap', 0)} dropped as evaluation items."))
        if "needed" in e:
            blocks.append(("p", f"Too little feedback to train: {e['needed']} pairs needed. A pair is an answer "
                                "rated up and another rated down for the same question; a model that answers "
                                "nothing right (or everything) makes none."))
    g = s.get("gate") or {}
    if g:
        rows = [[m, g["production"].get(m), g["candidate"].get(m)] for m in ("heldout_bpb", "mc_accuracy", "exact_match")]
        blocks.append(("table", ["gate metric", "production (v1)", "candidate"], rows))
        if g.get("failed"):
            blocks.append(("p", "Refused by the gate: " + "; ".join(g["failed"])))
    ab = s.get("ab_report")
    if ab:
        blocks.append(("p", f"A/B test, {s.get('ab_traffic', {}).get('requests', '?')} greedy answers to new questions, "
                            "split per user, each judged:"))
        blocks.append(("table", ["variant", "requests", "rated", "positive rate", "errors", "latency p50 (s)"],
                       [[v["variant"], v["requests"], v["rated"], v["positive_rate"], v["errors"], v["latency_p50_s"]]
                        for v in ab["variants"]]))
        for c in ab["comparisons"]:
            p = (c.get("positive") or {}).get("p_value")
            blocks.append(("p", f"v{c['variant']} against v{c['control']}: {c['verdict']}"
                                + (f" (positive feedback p = {p:.3g})" if p is not None else "")))
    return [("Improvement loop (feedback -> DPO -> gate -> A/B -> promote)", blocks)]


STAGE = Stage("improve", run, config=ImproveStage, inputs=EARLIER,
              headline=lambda r: {k: (r.get("metrics") or {}).get(k) for k in ("outcome", "preference_pairs")},
              report=report)
