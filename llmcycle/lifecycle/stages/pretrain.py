"""pretrain: a causal LM on the data stage's shards and tokenizer (`llmcycle pretrain`), into
runs/<name>/pretrain/model/."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from llmcycle import svg
from llmcycle.lifecycle.stage import Stage, metrics_named
from llmcycle.report import read_curves
from llmcycle.train.config import PretrainConfig

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section


def configure(lc: Lifecycle, cfg: PretrainConfig) -> PretrainConfig:
    cfg = dataclasses.replace(cfg, out_dir=str(lc.dir("pretrain")))
    if "data" in lc.stages:  # train on what the data stage wrote: its shards and its tokenizer
        d = lc.dir("data")
        cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, train_shards=str(d / "train"), val_shards=str(d / "val")),
            tokenizer=dataclasses.replace(cfg.tokenizer, path=str(d / "tokenizer")))
    return cfg


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.train.pretrain.loop import pretrain

    return pretrain(lc.stage_config("pretrain"), resume=resume)


def summary(record: dict) -> list[tuple[str, str]]:
    m = record.get("metrics") or {}
    return [("held-out bits/byte", f"{m.get('val_bpb', float('nan')):.3f} "
                                   f"(unigram baseline {m.get('unigram_bpb', float('nan')):.3f})")] if m else []


def report(run: Records) -> list[Section]:
    """Held-out bits per byte against the unigram baseline, and the loss curves."""
    pre = run.metrics("pretrain")
    if not pre:
        return []
    blocks: list[Block] = [("table", ["steps", "held-out loss", "held-out bits/byte", "unigram baseline bits/byte"],
                            [[pre.get("steps", pre.get("step")), pre.get("val_loss"), pre.get("val_bpb"),
                              pre.get("unigram_bpb")]])]
    curves = read_curves(run.dir("pretrain") / "metrics.jsonl", "val_loss")
    if curves:
        blocks.append(("chart", svg.line_chart(curves, title="Pre-training loss", x_label="step",
                                               y_label="loss (nats/token)")))
    return [("Pre-training", blocks)]


STAGE = Stage("pretrain", run, config=PretrainConfig, configure=configure, inputs=("data",), produces_model=True,
              headline=metrics_named("val_loss"), summary=summary, report=report)
