"""The stages of `llmcycle run`, in graph order: one module per stage, each defining its `Stage`.

A new stage is a module here (or anywhere) and one entry in STAGES, at its place in the order."""

from __future__ import annotations

from llmcycle.lifecycle.stage import Stage
from llmcycle.lifecycle.stages import data, dpo, improve, optimize, pretrain, quantize, report, serve, sft
from llmcycle.lifecycle.stages import eval as evaluation

STAGES: list[Stage] = [
    data.STAGE,
    pretrain.STAGE,
    sft.STAGE,
    dpo.STAGE,
    optimize.STAGE,  # after sft, whose run it repeats with LoRA; after dpo, as its coming parts take the final model
    quantize.STAGE,  # the final model (the last model stage before it) quantized, evaluated, probed
    evaluation.STAGE,
    serve.STAGE,
    improve.STAGE,  # one turn of feedback -> DPO -> gate -> A/B -> promote on the final model, simulated users
    report.STAGE,
]


def names() -> list[str]:
    return [s.name for s in STAGES]


def get(name: str) -> Stage:
    """The stage named `name` (KeyError for none)."""
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(name)
