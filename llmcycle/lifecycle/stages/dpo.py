"""dpo: preference tuning of the previous stage's model (`llmcycle dpo`), into runs/<name>/dpo/model/."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmcycle.lifecycle.stage import PREVIOUS_MODEL, Stage, metrics_named
from llmcycle.lifecycle.stages.sft import from_previous_model, trainer_report
from llmcycle.train.config import DPOConfig

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.train.posttrain.dpo import dpo

    return dpo(lc.stage_config("dpo"), resume=resume)


STAGE = Stage("dpo", run, config=DPOConfig, configure=from_previous_model("dpo"), inputs=PREVIOUS_MODEL,
              produces_model=True, headline=metrics_named("eval_rewards/accuracies", "eval_exact_match"),
              report=trainer_report("dpo"))
