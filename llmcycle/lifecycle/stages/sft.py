"""sft: supervised fine-tuning of the previous stage's model (`llmcycle sft`), into runs/<name>/sft/model/.

Also the pieces every stage that trains the previous model shares (dpo uses them): its configuration
filled in by the graph, and its report section from the trainer's own held-out numbers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmcycle import svg
from llmcycle.lifecycle.stage import PREVIOUS_MODEL, Stage, metrics_named
from llmcycle.report import read_curves
from llmcycle.train.config import SFTConfig

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section


def from_previous_model(stage: str) -> Callable[[Lifecycle, Any], Any]:
    """A `configure` for a stage that trains the previous model: its out_dir and model set by the graph."""

    def configure(lc: Lifecycle, cfg: Any) -> Any:
        return dataclasses.replace(cfg, out_dir=str(lc.dir(stage)), model=str(lc.previous_model(stage)))

    return configure


def trainer_report(stage: str) -> Callable[[Records], list[Section]]:
    """A `report` for a post-training stage: the trainer's held-out numbers and its loss curves."""

    def report(run: Records) -> list[Section]:
        m = run.metrics(stage)
        scalars = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return []
        blocks: list[Block] = [("table", ["metric", "value"], [[k, v] for k, v in sorted(scalars.items())])]
        curves = read_curves(run.dir(stage) / "metrics.jsonl", "eval_loss")
        if curves:
            blocks.append(("chart", svg.line_chart(curves, title=f"{stage.upper()} loss", x_label="step",
                                                   y_label="loss")))
        return [(f"{stage.upper()} (held-out, as the trainer measured it)", blocks)]

    return report


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.train.posttrain.sft import sft

    return sft(lc.stage_config("sft"), resume=resume)


STAGE = Stage("sft", run, config=SFTConfig, configure=from_previous_model("sft"), inputs=PREVIOUS_MODEL,
              produces_model=True, headline=metrics_named("eval_loss", "eval_exact_match"),
              report=trainer_report("sft"))
