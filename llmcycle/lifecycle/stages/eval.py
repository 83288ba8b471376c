"""eval: suite v1 (`llmcycle eval`) on every model stage of the run; one `<stage>.json` per model in
runs/<name>/eval/, the table in the record."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmcycle import svg
from llmcycle.artifacts import atomic_write_json
from llmcycle.config import field_help as F
from llmcycle.lifecycle.stage import EARLIER, Stage

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section

log = logging.getLogger(__name__)


@dataclass
class EvalStage:
    limit: int = F(400, "held-out items per metric (multiple choice, exact match; the embedded held-out set has "
                        "357: all of them) and at most as many held-out sequences for bits per byte")


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.eval.suite import evaluate_model

    by_stage = {}
    for s in lc.model_stages():
        result, _ = evaluate_model(lc.dir(s) / "model", limit=lc.stage_config("eval").limit)
        atomic_write_json(lc.dir("eval") / f"{s}.json", result, default=str)
        by_stage[s] = result["metrics"]
        log.info(f"[eval] {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items()))
    return {"by_stage": by_stage}


def headline(record: dict) -> dict:
    by_stage = (record.get("metrics") or {}).get("by_stage") or {}
    return {"models evaluated": ", ".join(by_stage) or "none"}


def summary(record: dict) -> list[tuple[str, str]]:
    by_stage = (record.get("metrics") or {}).get("by_stage") or {}
    lines = []
    for metric in ("mc_accuracy", "exact_match", "heldout_bpb"):
        values = [(s, m[metric]) for s, m in by_stage.items() if metric in m]
        if values:
            lines.append((f"{metric} by stage", " -> ".join(f"{s} {v:.3f}" for s, v in values)))
    return lines


def report(run: Records) -> list[Section]:
    """The suite on every model side by side, what the decontamination check found, accuracy and bpb charts."""
    per_stage = run.metrics("eval").get("by_stage") or {}
    if not per_stage:
        return []
    stages = list(per_stage)
    names = sorted({k for m in per_stage.values() for k, v in m.items() if isinstance(v, (int, float))})
    blocks: list[Block] = [
        ("p", "`llmcycle eval` suite v1 on every model of the run: held-out bits per byte on the held-out shards, "
              "multiple choice by log-likelihood and greedy exact match on the held-out embedded tasks "
              f"(docs/eval.md). Per-stage details: `{run.dir('eval')}/<stage>.json`."),
        ("table", ["metric", *stages], [[n, *(per_stage[s].get(n) for s in stages)] for n in names]),
    ]
    contamination = []
    for s in stages:
        path = run.dir("eval") / f"{s}.json"
        found_in = (json.loads(path.read_text()).get("decontamination") or {}) if path.is_file() else {}
        where = found_in.get("sources") or {}
        named = {k: ", ".join(v) if isinstance(v, list) else str(v) for k, v in where.items()}
        contamination += [[s, f"{source}: {named[source]}" if source in named else source, found_in.get("items"),
                           found["prompts"],
                           found.get("prompt_and_answer")]
                          for source, found in found_in.items() if isinstance(found, dict) and "prompts" in found]
    if contamination:
        blocks.append(("p", "Decontamination: held-out evaluation items whose prompt (and prompt followed by its "
                            "answer) occur verbatim, as tokens, in each model's training data:"))
        blocks.append(("table", ["model", "training data", "items", "prompt found", "prompt + answer found"],
                       contamination))
    accuracy = [n for n in ("mc_accuracy", "exact_match", "win_rate") if n in names]
    if accuracy:
        blocks.append(("chart", svg.grouped_bar_chart(accuracy, {s: [per_stage[s].get(n) for n in accuracy]
                                                                  for s in stages}, title="Task accuracy by stage")))
    if "heldout_bpb" in names:
        labels, values = stages[:], [per_stage[s].get("heldout_bpb") for s in stages]
        unigram = run.metrics("pretrain").get("unigram_bpb")
        if unigram is not None:
            labels.append("unigram baseline")
            values.append(unigram)
        blocks.append(("chart", svg.bar_chart(labels, values, title="Held-out bits per byte (lower is better)")))
    return [("Evaluation by stage", blocks)]


STAGE = Stage("eval", run, config=EvalStage, inputs=EARLIER, headline=headline, summary=summary, report=report)
