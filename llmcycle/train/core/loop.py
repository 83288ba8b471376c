"""The loop shape the offline trainers share (sft, reward, the DPO family), and its parts PPO and GRPO reuse:
logging a step, the held-out evaluation before training, evaluating and checkpointing after a step."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from llmcycle.progress import progress
from llmcycle.train.core.loader import EpochLoader
from llmcycle.train.core.session import Session

log = logging.getLogger(__name__)


def log_step(session: Session, bar, record: dict) -> None:
    session.metrics.write(record)
    bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss",) if k in record}, refresh=False)
    bar.update(1)


def first_evaluation(s: Session, evaluate: Callable[[], dict], describe: Callable[[int, dict], str]) -> dict:
    """Held-out metrics of the starting model (read back from the checkpoint when resuming)."""
    if s.state is not None:
        return s.state["extra"].get("first_eval", {})
    m = evaluate()
    if m:
        s.metrics.write({"step": 0, "eval": True, **m})
        log.info(describe(0, m))
    return m


def evaluate_and_checkpoint(s: Session, bar, position: int, max_steps: int, eval_every: int,
                            evaluate: Callable[[], dict], describe: Callable[[int, dict], str], loader_state: dict,
                            extra_state: dict, eval_record: dict | None = None) -> dict:
    """After step (or iteration) `position`: held-out metrics every `eval_every` and at the end, then a
    checkpoint when one is due. Returns the metrics when it evaluated, else {}."""
    metrics: dict = {}
    if eval_every and (position % eval_every == 0 or position == max_steps):
        metrics = evaluate()
        if metrics:
            s.metrics.write({"step": s.step_count, **(eval_record or {}), "eval": True, **metrics})
            bar.write(describe(position, metrics))
    if s.should_save(max_steps, position):
        s.save(loader_state, extra_state)
    return metrics


def train_loop(s: Session, desc: str, max_steps: int, loader: EpochLoader, micro_batches: Callable[[list[int]], list],
               count: Callable[[Any], float], loss_fn: Callable[[Any], tuple[torch.Tensor, dict]],
               evaluate: Callable[[], dict], eval_every: int, describe: Callable[[int, dict], str],
               extra_state: dict) -> dict:
    """The offline loop: step, log, evaluate every `eval_every` steps and at the end, checkpoint. Returns the
    last held-out metrics."""
    last_eval: dict = {}
    bar = progress(total=max_steps, initial=s.step_count, desc=desc, unit="step", disable=not s.dist.is_main)
    while s.step_count < max_steps:
        lr = s.set_lr(max_steps)
        t0 = time.perf_counter()
        record = s.step(micro_batches(loader.next_step()), count, loss_fn)
        record.update(step=s.step_count, lr=lr, epoch=round(loader.epoch + loader.cursor / loader.n, 4),
                      step_seconds=round(time.perf_counter() - t0, 5))
        log_step(s, bar, record)
        last_eval = evaluate_and_checkpoint(s, bar, s.step_count, max_steps, eval_every, evaluate, describe,
                                            loader.state_dict(), extra_state) or last_eval
    bar.close()
    return last_eval or evaluate()  # resumed at the end already: still report where the model stands

