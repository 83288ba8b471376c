"""`llmcycle improve NAME`: one turn of the improvement loop, gated, resumable.

    export  feedback and labels -> preferences.jsonl / sft.jsonl              (improve/export.py)
    train   DPO (or SFT) from NAME@production on them                            (llmcycle dpo / sft)
    gate    `llmcycle eval --compare production candidate`: a worse candidate is refused, never registered
    register  the candidate as NAME's next version, aliased @challenger         (improve/registry.py)
    ab      NAME's traffic split production / challenger (servers switch live)
    decide  the A/B report's verdict: better -> @production moves to the challenger; worse -> the split
            ends and @challenger goes; otherwise the turn waits for traffic (run the command again)

Every step leaves its record in `<out_dir>/improve.json` (status, seconds, metrics). A second call skips
the steps done under the same turn (same recipe, same production version) and resumes an interrupted
training from its checkpoints, as `llmcycle run` does; `--promote` decides for the challenger without
waiting for the test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from llmcycle.artifacts.io import atomic_write_json
from llmcycle.config import field_help as F
from llmcycle.errors import LlmcycleError

log = logging.getLogger(__name__)
STEPS = ("export", "train", "gate", "register", "ab", "decide")
RECORD = "improve.json"


@dataclass
class ImproveConfig:
    name: str = F("", "the registry name to improve (its production alias is the starting model)")
    out_dir: str | None = F(None, "where the turn's data, model and record go (null: runs/improve/NAME)")
    db: str | None = F(None, "the monitor's database (null: the default request log)")
    method: Literal["dpo", "sft"] = F("dpo", "dpo on the preference pairs, or sft on the highly rated answers")
    min_examples: int = F(16, "fewest pairs (dpo) or examples (sft) worth a training run")
    train: list[str] = F([], "key=value overrides of the dpo/sft recipe (e.g. train.max_steps=40)")
    heldout: str | None = F(None, "held-out shards for the gate (null: from the model's lineage)")
    gate_limit: int = F(128, "items per metric in the gate's evaluations")
    threshold: float = F(0.02, "the gate's tolerance (llmcycle eval --threshold)")
    challenger_weight: float = F(10.0, "the challenger's share of traffic in the A/B test, in percent")
    alpha: float = F(0.05, "the A/B test's significance level")
    min_effect: float = F(0.05, "smallest change of the positive-feedback rate worth detecting")
    eval_files: list[str] = F([], "more evaluation sets (JSONL) kept out of the exported data")

    def directory(self) -> Path:
        return Path(self.out_dir or f"runs/improve/{self.name}")


class Turn:
    """One turn of the loop for `cfg.name`; `run()` does the steps not yet done and returns the record."""

    def __init__(self, cfg: ImproveConfig, registry: Any = None, promote: bool = False,
                 on_ab: Callable[[Turn], None] | None = None) -> None:
        from llmcycle.improve.cli import default_db
        from llmcycle.improve.registry import Registry

        if not cfg.name:
            raise LlmcycleError("improve: which registry name? (llmcycle improve NAME)")
        self.cfg, self.promote, self.on_ab = cfg, promote, on_ab
        self.registry = registry or Registry(cfg.db or default_db())
        self.dir = cfg.directory()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record = self._load_record()

    def _key(self, production: str) -> str:
        """What a turn is: the production version it starts from and how it trains. The decision's settings
        (alpha, min_effect) and where things are (db, out_dir spelled another way) may change between calls."""
        c = self.cfg
        body = json.dumps({"name": c.name, "production": production, "method": c.method, "train": c.train,
                           "min_examples": c.min_examples, "gate": [c.heldout, c.gate_limit, c.threshold],
                           "challenger_weight": c.challenger_weight}, sort_keys=True, default=str)
        return hashlib.sha256(body.encode()).hexdigest()

    def _load_record(self) -> dict:
        path = self.dir / RECORD
        production = self.registry.resolve(f"{self.cfg.name}@production")
        key = self._key(production.content_hash)
        rec = json.loads(path.read_text()) if path.is_file() else {}
        finished = rec.get("status") in ("promoted", "rejected", "refused")
        if rec and not finished and rec.get("key") != key and rec["steps"].get("ab", {}).get("status") == "done" \
                and self.registry.split(self.cfg.name) is not None:
            raise LlmcycleError(
                f"a turn of {self.cfg.name} is under way with other settings: its A/B test (v{rec['production']} "
                f"against the challenger) is running. Decide it first (llmcycle improve {self.cfg.name} with the "
                f"same settings, --promote, or llmcycle ab end {self.cfg.name}).")
        if rec.get("key") != key or finished:
            rec = {"key": key, "name": self.cfg.name, "production": production.version, "status": "running",
                   "started": time.time(), "steps": {}}
        return rec

    def _save(self) -> None:
        atomic_write_json(self.dir / RECORD, self.record, default=str)

    def run(self) -> dict:
        steps = {"export": self._export, "train": self._train, "gate": self._gate, "register": self._register,
                 "ab": self._ab, "decide": self._decide}
        for name in STEPS:
            done = self.record["steps"].get(name, {})
            if done.get("status") == "done":
                continue
            log.info("[improve %s] %s", self.cfg.name, name)
            t0 = time.time()
            resume = done.get("status") == "running"
            self.record["steps"][name] = {"status": "running", "started": t0}
            self._save()
            status, metrics = steps[name](resume)
            self.record["steps"][name] = {"status": status, "seconds": time.time() - t0, "metrics": metrics}
            self._save()
            if status != "done":  # refused by the gate, too little data, waiting for the test, rejected
                self.record["status"] = status
                self._save()
                return self.record
        self.record["status"] = self.record["steps"]["decide"]["metrics"]["outcome"]
        self._save()
        return self.record

    # ---- the steps: each returns (status, metrics) ---------------------------------------------------

    def _export(self, resume: bool) -> tuple[str, dict]:
        from llmcycle.improve.export import export_feedback

        counts = export_feedback(self.registry.store, self.dir / "feedback", eval_files=self.cfg.eval_files)
        have = counts["preference_pairs"] if self.cfg.method == "dpo" else counts["sft_examples"]
        if have < self.cfg.min_examples:
            return "too little feedback", {**counts, "have": have, "needed": self.cfg.min_examples}
        return "done", counts

    def _train(self, resume: bool) -> tuple[str, dict]:
        from llmcycle.config import load_config
        from llmcycle.train.config import DPOConfig, SFTConfig

        production = self.registry.version(self.cfg.name, self.record["production"])
        if not resume:  # a new turn: an earlier turn's checkpoints are not this one's (its model is registered)
            shutil.rmtree(self.dir / "train", ignore_errors=True)
        data = "preferences.jsonl" if self.cfg.method == "dpo" else "sft.jsonl"
        overrides = [f"model={production.path}", f"out_dir={self.dir / 'train'}",
                     f"data.train={self.dir / 'feedback' / data}", *self.cfg.train]
        if self.cfg.method == "dpo":
            from llmcycle.train.posttrain.dpo import dpo

            metrics = dpo(load_config(DPOConfig, None, overrides), resume=resume)
        else:
            from llmcycle.train.posttrain.sft import sft

            metrics = sft(load_config(SFTConfig, None, overrides), resume=resume)
        return "done", {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def _gate(self, resume: bool) -> tuple[str, dict]:
        from llmcycle.eval.cli import gate
        from llmcycle.eval.suite import evaluate_model

        production = self.registry.version(self.cfg.name, self.record["production"])
        candidate = self.dir / "train" / "model"
        a, _ = evaluate_model(production.path, self.cfg.heldout, limit=self.cfg.gate_limit, decontam=False)
        b, _ = evaluate_model(candidate, self.cfg.heldout, limit=self.cfg.gate_limit, decontam=False)
        atomic_write_json(self.dir / "train" / "eval.json", b)  # beside the model: the registry records it
        failed = gate(a["metrics"], b["metrics"], self.cfg.threshold)
        metrics = {"production": a["metrics"], "candidate": b["metrics"], "failed": failed}
        return ("refused", metrics) if failed else ("done", metrics)

    def _register(self, resume: bool) -> tuple[str, dict]:
        v, _ = self.registry.register(self.cfg.name, self.dir / "train" / "model",
                                      description=f"improve turn from {self.cfg.name}@{self.record['production']}")
        self.registry.alias(self.cfg.name, "challenger", v.version)
        return "done", {"version": v.version, "content_hash": v.content_hash}

    def _ab(self, resume: bool) -> tuple[str, dict]:
        w = self.cfg.challenger_weight
        self.registry.set_split(self.cfg.name, {"production": 100.0 - w, "challenger": w})
        return "done", {"split": {"production": 100.0 - w, "challenger": w},
                        "started": self.registry.split(self.cfg.name)["started"]}

    def _decide(self, resume: bool) -> tuple[str, dict]:
        from llmcycle.improve.abtest import ab_report

        if self.on_ab is not None:
            self.on_ab(self)  # `llmcycle run`: simulated users send the test's traffic here
        name = self.cfg.name
        challenger = self.record["steps"]["register"]["metrics"]["version"]
        production = self.record["production"]
        try:
            report = ab_report(self.registry.store, name, self.record["steps"]["ab"]["metrics"]["started"],
                               self.cfg.alpha, control=str(production), min_effect=self.cfg.min_effect)
        except LlmcycleError:  # no A/B traffic for the production version yet
            report = None
        cmp = next((c for c in report["comparisons"] if c["variant"] == str(challenger)), None) if report else None
        decision = cmp["decision"] if cmp else "insufficient"
        metrics = {"report": report, "decision": decision, "forced": self.promote}
        if decision == "better" or self.promote:
            self.registry.alias(name, "production", challenger)
            self.registry.end_split(name)
            self.registry.remove_alias(name, "challenger")  # it is production now
            return "done", {**metrics, "outcome": "promoted"}
        if decision == "worse":
            self.registry.end_split(name)
            self.registry.remove_alias(name, "challenger")
            return "done", {**metrics, "outcome": "rejected"}
        return "waiting for the A/B test", metrics


# ---- the command -----------------------------------------------------------------------------------


def add_improve_arguments(p: argparse.ArgumentParser) -> None:
    from llmcycle.improve.cli import _db_arg

    p.description = ("One turn of the improvement loop for a registry name: export feedback -> DPO (or SFT) "
                     "from NAME@production -> the eval gate (a worse model is refused) -> register as "
                     "@challenger -> A/B test -> promote when the test says so. Run it again to resume or to "
                     "decide once the test has traffic. See docs/improve.md.")
    from llmcycle.cli import _options_epilog

    p.epilog = _options_epilog(ImproveConfig).replace("recipe keys", "settings", 1) + (
        "\nA setting starting with train. overrides the dpo/sft recipe: train.beta=0.2, train.train.max_steps=40 "
        "(that recipe's own train.max_steps).")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("name", help="a registry name with a production alias (llmcycle registry alias NAME production N)")
    p.add_argument("items", nargs="*", metavar="key=value",
                   help="settings (below), e.g. method=sft min_examples=32 challenger_weight=20 train.beta=0.2")
    p.add_argument("--out-dir", default=None, help="where the turn goes (default: runs/improve/NAME)")
    p.add_argument("--promote", action="store_true", help="promote the challenger without waiting for the test")
    _db_arg(p)
    p.set_defaults(func=improve_main)


def improve_main(args: argparse.Namespace) -> int:
    from llmcycle.config import load_config

    train = [i.removeprefix("train.") for i in args.items if i.startswith("train.")]
    rest = [i for i in args.items if not i.startswith("train.")]
    cfg = load_config(ImproveConfig, None, [f"name={args.name}", *rest])
    cfg.train, cfg.out_dir, cfg.db = train, args.out_dir, args.db
    rec = Turn(cfg, promote=args.promote).run()
    print(f"improve {cfg.name}: {rec['status']}")
    export = rec["steps"].get("export", {}).get("metrics", {})
    if rec["status"] == "too little feedback":
        what = "preference pairs" if cfg.method == "dpo" else "SFT examples"
        print(f"  {export.get('have')} {what} from {export.get('rated_answers')} rated answers; {export.get('needed')} "
              "needed. A pair needs an answer rated up and another rated down for the same prompt, logged with its "
              "text (serve store_text=true); collect more feedback (POST /v1/feedback, /label), or lower "
              "min_examples.")
    if rec["status"] == "waiting for the A/B test":
        print(f"  the A/B test runs on live traffic: run `llmcycle improve {cfg.name}` again to decide "
              f"(llmcycle ab report {cfg.name} shows where it stands), or --promote")
    for step, r in rec["steps"].items():
        print(f"  {step:<9} {r['status']}" + (f"  ({r['seconds']:.0f} s)" if "seconds" in r else ""))
    decide = rec["steps"].get("decide", {}).get("metrics", {})
    if decide.get("report"):
        from llmcycle.improve.abtest import format_ab_report

        print(format_ab_report(decide["report"]))
    gate = rec["steps"].get("gate", {}).get("metrics", {})
    for line in gate.get("failed", []):
        print(f"  gate: {line}")
    return 1 if rec["status"] == "refused" else 0
